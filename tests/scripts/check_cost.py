"""What the on-the-spot check costs: its time against an SFT step of the same run, and the attention map it builds.

A random-initialised model of a family outside the tested set (Seed-OSS, LLaMA-like) trains a few real SFTTrainer
steps with SSTokenCallback (LoRA, history = base); the check runs once, on the first scored micro-batch, and times
itself. Prints the check's time, the mean step time without it, their ratio, and the size of the (B, H, T, T)
eager map the check materialises (its extra memory is that map, plus its fp32 softmax when the model is in half
precision). CPU by default:

    PYTHONPATH=$PWD python tests/scripts/check_cost.py --hidden 512 --heads 8 --layers 4 --words 512 --batch 4
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tools.tiny import build_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--words", type=int, default=512, help="words per sample (about 2.4 tokens each)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    rows = [
        {
            "prompt": " ".join(rng.choices(WORDS, k=args.words // 4)),
            "completion": " " + " ".join(rng.choices(WORDS, k=args.words - args.words // 4)),
        }
        for _ in range(args.batch * args.steps)
    ]
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows[:8]], vocab_size=300)
    config = AutoConfig.for_model(
        "seed_oss",
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 4),
        head_dim=args.hidden // args.heads,
        max_position_embeddings=4 * args.words,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    sstoken, steps = SSTokenCallback(SSTokenConfig()), StepTimes()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir="/tmp/sstoken-check-cost",
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            max_length=4 * args.words,
            learning_rate=1e-4,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=args.steps,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, target_modules="all-linear"),
        callbacks=[sstoken, steps],
    )
    trainer.train()
    result = sstoken.selective_forward.hook.check_result
    later = steps.times[1:]  # step 1 holds the check; the later steps run without it
    step = sum(later) / len(later)
    print(
        f"shape: hidden {args.hidden}, {args.heads} heads, {args.layers} layers, batch {args.batch}, words/row "
        f"{args.words}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"check: {result.seconds * 1e3:.1f} ms once ({result.max_diff:.1e} max |diff|); SFT step without it: "
        f"{step * 1e3:.0f} ms; check / step = {result.seconds / step:.3f}; "
        f"step 1 with it: {steps.times[0] * 1e3:.0f} ms"
    )
    print(f"eager map materialised by the check: {result.map_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
