"""The max_steps a run's warm-up ratios are shares of, kept across resumes.

`select_warmup_ratio` and `rel_warmup_ratio` are shares of max_steps. A run resumed with another max_steps would
move its warm-up boundaries: with a larger one, back into the warm-up after selection has already run. A run
therefore keeps the max_steps it started with as the base of its warm-up ratios: each checkpoint records it
(`sstoken_warmup.json`), a resumed run reads it back, and a warning says when it differs from the max_steps the
run resumes with. Warm-ups given in steps (`rel_warmup_steps`) do not depend on it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.trl_internals import resume_checkpoint

logger = logging.getLogger(__name__)

WARMUP_FILE = "sstoken_warmup.json"


def uses_base(config: SSTokenConfig) -> bool:
    """Whether a warm-up is a share of max_steps."""
    return bool(config.select_warmup_ratio or config.rel_warmup_ratio)


def warmup_base(config: SSTokenConfig, max_steps: int, global_step: int) -> int:
    """The max_steps the warm-up ratios resolve against: the recorded one when the run resumes (global_step > 0),
    else `max_steps`."""
    if global_step == 0 or not uses_base(config):
        return max_steps
    resume_folder = resume_checkpoint()
    path = resume_folder / WARMUP_FILE
    if not path.is_file():
        logger.warning(
            "Resuming from %s, which holds no %s (not saved by an ssToken run of this version): the warm-up "
            "ratios are shares of this run's max_steps=%d, %s.",
            resume_folder,
            WARMUP_FILE,
            max_steps,
            describe(config, max_steps),
        )
        return max_steps
    base = int(json.loads(path.read_text())["max_steps"])
    if base != max_steps:
        logger.warning(
            "Resuming with max_steps=%d a run that started with max_steps=%d: the warm-ups keep the steps the "
            "run started with, %s (this run's max_steps would give %s).",
            max_steps,
            base,
            describe(config, base),
            describe(config, max_steps),
        )
    return base


def save_warmup_base(folder: Path, max_steps: int) -> None:
    """Record the base of the warm-up ratios in a checkpoint folder."""
    (Path(folder) / WARMUP_FILE).write_text(json.dumps({"max_steps": max_steps}))


def describe(config: SSTokenConfig, max_steps: int) -> str:
    """The warm-up lengths in optimizer steps, for messages."""
    return (
        f"a selection warm-up of {config.select_warmup(max_steps)} steps and a REL warm-up of "
        f"{config.rel_warmup(max_steps)} steps"
    )
