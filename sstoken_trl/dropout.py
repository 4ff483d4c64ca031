"""Run a module with its dropout layers off, leaving every other layer's mode alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def dropout_off(module: nn.Module) -> Iterator[None]:
    """Put the dropout layers inside `module` (LoRA dropout included) in eval mode, then restore them.

    Only dropout is switched: other layers keep their mode (4-bit layers, for one, repack weights in eval mode).
    """
    dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    for m in dropouts:
        m.training = False
    try:
        yield
    finally:
        for m in dropouts:
            m.training = True
