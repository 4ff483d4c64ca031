"""Two third-party notices that say nothing to a user of this package, filtered narrowly at import.

- bitsandbytes (imported by PEFT whenever it is installed, e.g. by `.[test]`) logs on every import, on CPUs with
  AVX512-BF16, that its optional CPU 4-bit kernel package `kernels` is not installed. Only that record is held back
  (not one about a `kernels` that is installed but fails); `replay_kernel_notice` shows it when a 4-bit model does
  run on the CPU, where it matters.
- transformers' FutureWarning on `is_gradient_checkpointing`, which PEFT reads when it wraps a model (this
  package reads `is_activation_checkpointing`). Filtered by its message and module, so other warnings still show.
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _MissingKernelsNotice(logging.Filter):
    """Holds back bitsandbytes' notice that the optional `kernels` package is not installed."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        missing = isinstance(cause, ModuleNotFoundError) and cause.name == "kernels"
        if str(record.msg).startswith(KERNEL_NOTICE) and missing:
            self.held.append(record)
            return False
        return True


_kernels_notice = _MissingKernelsNotice()


def install() -> None:
    """Install both filters (idempotent); runs when `sstoken_trl` is imported, before PEFT imports bitsandbytes."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if _kernels_notice not in logger.filters:
        logger.addFilter(_kernels_notice)
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )


def replay_kernel_notice() -> None:
    """Show the held bitsandbytes notice (once): call it when 4-bit weights run on the CPU."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    held, _kernels_notice.held = _kernels_notice.held, []
    logger.removeFilter(_kernels_notice)
    try:
        for record in held:
            logger.handle(record)
    finally:
        logger.addFilter(_kernels_notice)


install()
