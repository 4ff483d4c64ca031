"""History sources: where L_his comes from, one file each, and the registry from name to source.

- "base": the trained model with its PEFT adapters disabled (base.py)
- "model": a separate frozen model (model.py)
- "ema": an EMA of the trained weights, paper Eq. 4 (ema.py)
- "snapshot": the trained weights at the end of the selection warm-up (snapshot.py)
- "cache": the base model's per-token losses, computed once and stored on disk (cache.py)
"""

from __future__ import annotations

from collections.abc import Callable

from sstoken_trl.history.base import BaseHistory
from sstoken_trl.history.cache import CacheHistory
from sstoken_trl.history.ema import EMAHistory
from sstoken_trl.history.model import ModelHistory
from sstoken_trl.history.snapshot import SnapshotHistory
from sstoken_trl.history.source import Forward, HistoryContext, HistorySource

HISTORY_SOURCES: dict[str, Callable[[HistoryContext], HistorySource]] = {
    "base": BaseHistory.from_context,
    "model": ModelHistory.from_context,
    "ema": EMAHistory.from_context,
    "snapshot": SnapshotHistory.from_context,
    "cache": CacheHistory.from_context,
}


def build_history(context: HistoryContext) -> HistorySource:
    """The source `context.config.history` names, built for this model (and trainer)."""
    return HISTORY_SOURCES[context.config.history](context)


__all__ = [
    "HISTORY_SOURCES",
    "BaseHistory",
    "CacheHistory",
    "EMAHistory",
    "Forward",
    "HistoryContext",
    "HistorySource",
    "ModelHistory",
    "SnapshotHistory",
    "build_history",
]
