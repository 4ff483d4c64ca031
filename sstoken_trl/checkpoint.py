"""Where ssToken keeps history state in a trainer checkpoint, and which checkpoint a run resumes from.

The trainer saves a checkpoint into `output_dir/checkpoint-{global_step}` and then calls `on_save`, so that
folder is known when saving. On resume, transformers loads weights, optimizer and trainer state from the
folder given to `Trainer.train(resume_from_checkpoint=...)` (which may lie anywhere, or be `True` for the last
one) but hands callbacks neither the folder nor the trainer. The resolved folder is a local of the trainer's
training loop, read here from the calling frames (as `find_trainer` finds the trainer).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def checkpoint_folder(args: Any, state: Any) -> Path:
    """The folder the trainer has just saved the checkpoint of `state.global_step` into (for `on_save`)."""
    folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    if not folder.is_dir():
        raise RuntimeError(
            f"ssToken stores its history state next to the trainer's checkpoint, but {folder} does not exist "
            "(hyper-parameter search runs save elsewhere and are not supported with history='ema' or 'cache')."
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
