"""The two third-party notices filtered at import: only those, and the bitsandbytes one shown when it matters."""

from __future__ import annotations

import logging
import warnings

from sstoken_trl import notices

NOTICE = notices.KERNEL_NOTICE + ": %s. Please make sure you already `pip install kernels`"


def _bnb_record(cause: BaseException) -> logging.LogRecord:
    """A record as bitsandbytes' CPU backend logs it (`logger.warning(msg, exc)`)."""
    logger = logging.getLogger(notices.BNB_CPU_LOGGER)
    return logger.makeRecord(notices.BNB_CPU_LOGGER, logging.WARNING, "ops.py", 253, NOTICE, (cause,), None)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_only_the_missing_kernels_notice_is_held_and_replayed_once():
    logger = logging.getLogger(notices.BNB_CPU_LOGGER)
    notices.replay_kernel_notice()  # whatever the import of bitsandbytes held, before the handler below
    collect = _Collect()
    logger.addHandler(collect)
    try:
        missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
        logger.handle(_bnb_record(missing))
        assert collect.records == []  # held back
        broken = RuntimeError("kernel build failed")  # `kernels` installed but failing: a real problem
        other = ModuleNotFoundError("No module named 'torch_x'", name="torch_x")
        logger.handle(_bnb_record(broken))
        logger.handle(_bnb_record(other))
        logger.warning("another bitsandbytes warning")
        assert [r.args for r in collect.records] == [(broken,), (other,), ()]  # shown
        notices.replay_kernel_notice()  # a 4-bit model runs on the CPU: now it matters
        assert [r.args for r in collect.records][3:] == [(missing,)]
        notices.replay_kernel_notice()  # once
        assert len(collect.records) == 4
    finally:
        logger.removeHandler(collect)


def test_only_the_is_gradient_checkpointing_warning_is_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notices.install()
        deprecated = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
        for module, message in [
            ("transformers.modeling_utils", deprecated),  # ignored
            ("transformers.modeling_utils", "`other_property` is deprecated"),
            ("sstoken_trl.something", deprecated),  # raised by other code: shown
        ]:
            warnings.warn_explicit(message, FutureWarning, "f.py", 1, module=module)
    assert [(str(w.message)) for w in caught] == ["`other_property` is deprecated", deprecated]
