"""Run a module with its dropout layers off, leaving every other layer's mode alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def _drops_out(module: nn.Module) -> bool:
    """A dropout layer, or an attention module whose forward applies `attention_dropout` while training."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    rate = getattr(module, "attention_dropout", None)
    return isinstance(rate, float) and rate > 0.0


@contextmanager
def dropout_off(module: nn.Module) -> Iterator[None]:
    """Put the dropout inside `module` (LoRA dropout and attention dropout included) in eval mode, then restore it.

    Only dropout is switched: dropout layers, and attention modules with `attention_dropout` > 0 (transformers
    applies it as a functional dropout that reads the module's own `training` flag; the flag is set on that module
    alone, not on its projections). Other layers keep their mode (4-bit layers, for one, repack weights in eval mode).
    """
    dropouts = [m for m in module.modules() if m.training and _drops_out(m)]
    for m in dropouts:
        m.training = False
    try:
        yield
    finally:
        for m in dropouts:
            m.training = True
