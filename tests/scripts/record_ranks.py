"""Train a tiny LLaMA for two steps with the run's record on (SSTokenConfig.audit_dir), as one process or under
`accelerate launch --num_processes 2`: `python record_ranks.py AUDIT_DIR OUT PER_DEVICE_BATCH`."""

from __future__ import annotations

import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tools.tiny import build_model, build_tokenizer
from tests.conftest import prompt_completion_rows


def main(audit_dir: str, out: str, per_device: int) -> None:
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in prompt_completion_rows(200, seed=1)], 300)
    trainer = SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(
            output_dir=out,
            max_steps=2,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            bf16=False,
            seed=0,
            save_strategy="no",
        ),
        train_dataset=Dataset.from_list(prompt_completion_rows(32)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
        callbacks=[SSTokenCallback(SSTokenConfig(select_ratio=0.6, audit_dir=audit_dir))],
    )
    trainer.train()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
