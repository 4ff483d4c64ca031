"""Build an SFTTrainer with history="cache" on each rank; with `sharded`, as if FSDP / ZeRO-3 sharded the model.

Run as `accelerate launch --num_processes 2 cache_ranks.py OUT {sharded,ddp}`. Each rank writes OUT-rank{r}.txt
when it gets past training: with `sharded` no rank may get there, and none may hang.
"""

from __future__ import annotations

import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

import sstoken_trl.integration.guards as guards
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tools.tiny import build_model, build_tokenizer
from tests.conftest import cpu_sft_args, prompt_completion_rows


def main(out: str, mode: str) -> None:
    if mode == "sharded":  # the one fact FSDP / ZeRO-3 would change for ssToken; gloo on CPU runs neither
        guards.shards_parameters = lambda trainer: True
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in prompt_completion_rows(200, seed=1)], 300)
    config = SSTokenConfig(history="cache", history_cache_dir=out + "-cache")
    trainer = SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(**cpu_sft_args(output_dir=out + "-trainer", per_device_train_batch_size=2)),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        callbacks=[SSTokenCallback(config)],
    )
    trainer.train()
    with open(f"{out}-rank{trainer.accelerator.process_index}.txt", "w") as f:
        f.write(str(trainer.state.log_history[-1]["train_loss"]))
    # Leave the process group before exit: a gloo group torn down by the interpreter can abort a rank.
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
