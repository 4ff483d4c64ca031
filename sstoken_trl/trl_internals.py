"""Everything ssToken knows about TRL, transformers and accelerate internals, in one place.

A TRL or transformers upgrade means checking this file. Read off trl 1.16 and transformers 5.x:
- callbacks are not handed the trainer, and `Trainer.train` keeps the checkpoint it resumes from in a local;
  both are found on the call stack;
- SFTTrainer's default loss runs the model with `fused_lm_head=True`, a forward TRL installs on the instance
  of the model under PEFT, and its metrics live in `trainer._metrics`;
- checkpoints are saved as `output_dir/checkpoint-{global_step}`;
- accelerate's prepared data loaders delegate to the DataLoader they wrap, which holds the collate function;
- at the start of each optimizer step, `Trainer.get_batch_samples` fetches the step's micro-batches and counts
  their labels (`num_items_in_batch`) through `Trainer._get_num_items_in_batch`, before `on_step_begin` and with
  `state.global_step` already the step's (also on resume, after the skipped batches);
- TRL's own collator is not exported at the package top level.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

__all__ = [
    "DataCollatorForLanguageModeling",
    "add_fused_lm_head",
    "append_metric",
    "before_token_count",
    "check_fused_head",
    "check_loss_path",
    "checkpoint_folder",
    "collate_owner",
    "find_trainer",
    "fused_model",
    "has_fused_head",
    "resume_checkpoint",
    "set_metric",
    "training_columns",
]


def find_trainer() -> Trainer:
    """The Trainer whose callback event is running: callbacks are not handed the trainer itself."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    raise RuntimeError(
        "SSTokenCallback must be used as a callback of a TRL SFTTrainer; outside a trainer's event, "
        "pass it the trainer: SSTokenCallback(config, trainer=trainer)."
    )


def check_loss_path(trainer: Trainer) -> None:
    """Raise unless the trainer computes TRL's default NLL through the fused LM head."""
    if not isinstance(trainer, SFTTrainer):
        raise TypeError(f"SSTokenCallback needs a trl.SFTTrainer (or a subclass), got {type(trainer).__name__}.")
    args = trainer.args
    problems = []
    if args.loss_type != "nll":
        problems.append(f"loss_type={args.loss_type!r} (use 'nll')")
    if trainer.compute_loss_func is not None:
        problems.append("a compute_loss_func")
    if args.label_smoothing_factor:
        problems.append(f"label_smoothing_factor={args.label_smoothing_factor}")
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and getattr(parallelism, "sp_enabled", False):
        problems.append("sequence parallelism")
    if problems:
        raise ValueError(
            "ssToken selects tokens inside TRL's default SFT loss (mean NLL through the fused LM head); "
            f"this trainer is set up with {', '.join(problems)}, a loss path ssToken does not support."
        )


def fused_model(model: nn.Module) -> PreTrainedModel:
    """The model that carries TRL's fused LM head: the base model under PEFT, else the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def has_fused_head(model: nn.Module) -> bool:
    """Whether TRL's fused LM head replaced the forward of `model` (the model under PEFT)."""
    return "forward" in vars(fused_model(model))


def check_fused_head(trainer: Trainer) -> None:
    """Raise unless TRL's fused LM head (installed after Trainer.__init__) and its metrics store are there."""
    if not isinstance(getattr(trainer, "_metrics", None), dict):
        raise RuntimeError(
            "This TRL SFTTrainer keeps no `_metrics` store, where ssToken puts its statistics for the loggers: "
            "this version of sstoken-trl supports trl 1.16."
        )
    if not has_fused_head(trainer.model):
        raise RuntimeError(
            "TRL's fused LM head is not installed on the model: the installed TRL computes the SFT loss in a "
            "way this version of sstoken-trl does not know. Use trl 1.16."
        )


def append_metric(trainer: Trainer, name: str, value: float) -> None:
    """Add one value of a training metric: TRL averages them into the next log entry."""
    trainer._metrics["train"][name].append(value)


def set_metric(trainer: Trainer, name: str, value: float) -> None:
    """Log `value` as the metric's whole content (running totals)."""
    trainer._metrics["train"][name] = [value]


def collate_owner(dataloader: Any) -> Any:
    """The object holding the train collate function: accelerate's loaders wrap a DataLoader that has it."""
    return getattr(dataloader, "base_dataloader", dataloader)


def before_token_count(trainer: Trainer, mark: Callable[[list, int], None]) -> Callable[[], None]:
    """Call `mark(micro_batches, global_step)` on the micro-batches of each optimizer step just before the trainer
    counts their labels; the step is exact there, whatever the data loader fetched ahead. Returns the undo."""
    count = getattr(trainer, "_get_num_items_in_batch", None)
    fetch = getattr(type(trainer), "get_batch_samples", None)
    shape = count is not None and list(inspect.signature(count).parameters) == ["batch_samples", "device"]
    if not shape or fetch is None or "self._get_num_items_in_batch(" not in inspect.getsource(fetch):
        raise RuntimeError(
            "ssToken ends its selection warm-up at the moment the trainer counts the labels of an optimizer step "
            "(Trainer.get_batch_samples calling _get_num_items_in_batch(batch_samples, device)); this trainer "
            "counts them elsewhere. This version of sstoken-trl supports transformers 5.x as of 5.24; or train "
            "with select_warmup_ratio=0."
        )

    def marked_count(batch_samples: list, device: Any) -> Any:
        mark(batch_samples, trainer.state.global_step)
        return count(batch_samples, device)

    trainer._get_num_items_in_batch = marked_count
    return lambda: vars(trainer).pop("_get_num_items_in_batch", None)


def training_columns(trainer: Trainer) -> list[str] | None:
    """The dataset columns the trainer keeps for its model (None when it keeps every column)."""
    columns = getattr(trainer, "_signature_columns", None)
    return columns if trainer.args.remove_unused_columns and columns else None


def checkpoint_folder(args: Any, state: Any) -> Path:
    """The folder the trainer has just saved the checkpoint of `state.global_step` into (for `on_save`)."""
    folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    if not folder.is_dir():
        raise RuntimeError(
            f"ssToken stores its state next to the trainer's checkpoint, but {folder} does not exist "
            "(hyper-parameter search runs save elsewhere and are not supported with history='ema', 'snapshot' or "
            "'cache', nor with warm-up ratios)."
        )
    return folder


def resume_checkpoint() -> Path:
    """The checkpoint folder the running `Trainer.train` resumed from; raises when it resumed from none."""
    frame = inspect.currentframe()
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), Trainer) and "resume_from_checkpoint" in frame.f_locals:
            folder = frame.f_locals["resume_from_checkpoint"]
            if isinstance(folder, str | Path):
                return Path(folder)
        frame = frame.f_back
    raise RuntimeError(
        "Training starts at a global step above 0 but ssToken found no resume_from_checkpoint folder in "
        "Trainer.train: resume with trainer.train(resume_from_checkpoint=<folder or True>)."
    )
