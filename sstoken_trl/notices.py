"""Third-party notices that say nothing to a user of this package, held back by where they come from.

- bitsandbytes, which PEFT imports whenever it is installed (`.[test]`, `.[qlora]`), tries at import, on CPUs with
  AVX512-BF16, to fetch a CPU 4-bit kernel from the Hugging Face Hub through the `kernels` package, and logs when
  that fails: `kernels` missing, a publisher that cannot be verified, the Hub offline, or whatever a later release
  says. That kernel concerns 4-bit weights on the CPU only. So bitsandbytes is imported here, before PEFT, and
  everything the `bitsandbytes` and `kernels` loggers say (and any warning their files raise) during that import is
  held back, whatever the wording; `four_bit_notice` says it once when a 4-bit model runs: on the CPU in this
  package's words. Anything they say after the import, in a run, shows as usual.
- transformers' FutureWarning on `is_gradient_checkpointing`, which PEFT reads when it wraps a model (this
  package reads `is_activation_checkpointing`). Filtered by its message and module, so other warnings still show.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

BNB_LOGGERS = ("bitsandbytes", "kernels")  # what bitsandbytes' import logs through, directly or by the kernel fetch
logger = logging.getLogger(__name__)
held: list[str] = []  # what the import of bitsandbytes said, one line each
_told = False


class _Hold(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def holding(loggers: Sequence[str]) -> Iterator[list[str]]:
    """Hold back what the named loggers (and their children) log, and warnings raised from files of packages by
    those names, while the block runs; yields the held lines. Other loggers and warnings pass through."""
    lines: list[str] = []
    handler = _Hold(lines)
    saved = [(logging.getLogger(name), logging.getLogger(name).propagate) for name in loggers]
    for log, _ in saved:
        log.addHandler(handler)
        log.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield lines
    finally:
        for log, propagate in saved:
            log.removeHandler(handler)
            log.propagate = propagate
    for warning in caught:
        if set(Path(warning.filename).parts) & set(loggers):
            lines.append(f"{warning.category.__name__}: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def import_quietly(module: str, loggers: Sequence[str]) -> list[str]:
    """Import `module` (if installed and not yet imported) with `holding(loggers)`; return what was held.

    An ImportError leaves it unimported, as PEFT's own `try: import bitsandbytes` does."""
    if module in sys.modules or importlib.util.find_spec(module) is None:
        return []
    with holding(loggers) as lines:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    return lines


def four_bit_notice(model: nn.Module) -> bool:
    """Say once, when the model has 4-bit weights and bitsandbytes' import said something, what it said now matters:
    on the CPU in this package's words (what is slower, how to fix it), elsewhere as bitsandbytes said it."""
    global _told
    devices = {p.device.type for p in model.parameters() if type(p).__name__ == "Params4bit"}
    if not devices or not held or _told:
        return False
    _told = True
    if "cpu" in devices:
        logger.warning(
            "ssToken: this model's 4-bit weights are on the CPU, and bitsandbytes could not set up its fast CPU 4-bit "
            "kernel when it was imported (it fetches one from the Hugging Face Hub through the `kernels` package), "
            "so 4-bit layers run its slower built-in CPU code: training works, more slowly. To use the kernel, "
            "`pip install 'kernels>=0.11.1'` and import bitsandbytes once with access to the Hub (it is then cached "
            "for offline runs); or train on a GPU. bitsandbytes said: %s",
            held[0].splitlines()[0],
        )
    else:
        logger.warning("ssToken: bitsandbytes said this when it was imported: %s", " | ".join(held))
    return True


def install() -> None:
    """Import bitsandbytes with its import-time notices held, and filter the one transformers warning (idempotent);
    runs when `sstoken_trl` is imported, before PEFT imports bitsandbytes."""
    held.extend(import_quietly("bitsandbytes", BNB_LOGGERS))
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )


install()
