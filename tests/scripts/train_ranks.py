"""Train a tiny LLaMA with SSTokenCallback for two steps and write what each rank selected (JSON).

Run as `python train_ranks.py OUT PER_DEVICE_BATCH` or under `accelerate launch --num_processes 2 --cpu`.
"""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tools.tiny import build_model, build_tokenizer
from tests.conftest import prompt_completion_rows


class KeptTokens(TrainerCallback):
    """Per sample (keyed by its token ids): the target positions kept, read from each micro-batch's selection."""

    def __init__(self, sstoken: SSTokenCallback) -> None:
        self.sstoken, self.kept = sstoken, {}

    def on_substep_end(self, args, state, control, **kwargs):
        self.record()

    def on_step_end(self, args, state, control, **kwargs):
        self.record()

    def record(self):
        s = self.sstoken.last_selection
        for row in range(s.input_ids.size(0)):
            real = s.labels[row] != -100
            key = " ".join(map(str, s.input_ids[row][s.input_ids[row] != 0].tolist()))
            self.kept[key] = [t for t in range(s.keep.size(1)) if s.keep[row, t]]
            assert real[1:].sum() >= len(self.kept[key])


def main(out: str, per_device: int) -> None:
    rows = prompt_completion_rows(32)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in prompt_completion_rows(200, seed=1)], 300)
    sstoken = SSTokenCallback(SSTokenConfig(select_ratio=0.6))
    kept = KeptTokens(sstoken)
    trainer = SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(
            output_dir=out + "-trainer",
            max_steps=2,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            max_grad_norm=0.0,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            bf16=False,
            seed=0,
            save_strategy="no",
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
        callbacks=[sstoken, kept],
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    weights = {n: p.detach().tolist() for n, p in trainer.model.named_parameters() if p.requires_grad}
    logs = [{k: v for k, v in log.items() if k.startswith(("loss", "sstoken/"))} for log in trainer.state.log_history]
    with open(f"{out}-rank{rank}.json", "w") as f:
        json.dump({"kept": kept.kept, "weights": weights, "logs": logs}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]))
