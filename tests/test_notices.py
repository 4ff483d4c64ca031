"""Third-party notices held back by where they come from, not by their wording; the 4-bit CPU notice in our words."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from sstoken_trl import notices
from tests.test_cli import _command

FAKE_PACKAGE = """
import logging, warnings
logging.getLogger(__name__ + ".backends.cpu").warning("Whatever a %s release says", "future")
logging.getLogger("fake_kernels").warning("could not reach the hub")
logging.getLogger("unrelated_pkg").warning("an unrelated warning")
warnings.warn("a warning raised from the package's own file", UserWarning)
"""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_import_holds_whatever_its_loggers_say_and_nothing_else(tmp_path, monkeypatch):
    package = tmp_path / "fake_bnb_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(FAKE_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    shown = _Collect()
    logging.getLogger().addHandler(shown)
    try:
        with warnings.catch_warnings(record=True) as passed:
            warnings.simplefilter("always")
            held = notices.import_quietly("fake_bnb_pkg", ("fake_bnb_pkg", "fake_kernels"))
    finally:
        logging.getLogger().removeHandler(shown)
        sys.modules.pop("fake_bnb_pkg", None)
    assert held == [
        "fake_bnb_pkg.backends.cpu: Whatever a future release says",
        "fake_kernels: could not reach the hub",
        "UserWarning: a warning raised from the package's own file",
    ]
    assert shown.lines == ["an unrelated warning"] and passed == []
    assert logging.getLogger("fake_bnb_pkg").propagate and not logging.getLogger("fake_bnb_pkg").handlers
    assert notices.import_quietly("fake_bnb_pkg_missing", ("x",)) == []  # not installed: nothing to import


def _hide_kernels(tmp_path) -> dict[str, str]:
    """An environment where `import kernels` fails as if the package were not installed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['kernels'] = None  # not installed\n")
    return {"PYTHONPATH": str(site)}


CAUSES = ["hub_unreachable", "hub_offline", "kernels_missing"]


def _environment(cause: str, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if cause == "hub_offline":
        env["HF_HUB_OFFLINE"] = "1"
    if cause == "kernels_missing":
        env.update(_hide_kernels(tmp_path))
    return env


@pytest.mark.parametrize("cause", CAUSES)
def test_importing_the_package_prints_nothing_whatever_the_kernel_fetch_says(cause, tmp_path):
    env = _environment(cause, tmp_path)
    ours = "import json, sstoken_trl; from sstoken_trl import notices; print(json.dumps(notices.held))"
    done = subprocess.run([sys.executable, "-c", ours], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    held = json.loads(done.stdout)
    # Without this package, bitsandbytes prints at import exactly when there is something to hold (on this CPU).
    plain = subprocess.run(
        [sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, env=env, timeout=300
    )
    assert bool(held) == ("gemm_4bit_forward" in plain.stderr), (held, plain.stderr)
    if held and cause == "kernels_missing":
        assert "kernels" in held[0]


@pytest.mark.parametrize("command", ["sstoken-train", "sstoken-inspect"])
def test_help_without_kernels_prints_no_third_party_line(command, tmp_path):
    env = {**os.environ, **_hide_kernels(tmp_path)}
    done = subprocess.run([_command(command), "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "usage:" in done.stdout and "kernels" not in done.stdout


def test_four_bit_weights_on_the_cpu_are_told_once_in_our_words(monkeypatch, caplog):
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(notices, "held", ["bitsandbytes.backends.cpu.ops: Failed to load a kernel: no network"])
    monkeypatch.setattr(notices, "_told", False)
    four_bit = nn.Sequential(bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32))
    with caplog.at_level(logging.WARNING, logger="sstoken_trl.notices"):
        assert not notices.four_bit_notice(nn.Linear(16, 16))  # no 4-bit weights: nothing to say
        assert notices.four_bit_notice(four_bit)
        assert not notices.four_bit_notice(four_bit)  # once
    [message] = [r.getMessage() for r in caplog.records]
    assert "4-bit weights are on the CPU" in message and "slower" in message and "pip install" in message
    assert message.endswith("bitsandbytes said: bitsandbytes.backends.cpu.ops: Failed to load a kernel: no network")
    monkeypatch.setattr(notices, "_told", False)
    monkeypatch.setattr(notices, "held", [])
    assert not notices.four_bit_notice(four_bit)  # the import said nothing: nothing to tell


def test_four_bit_weights_elsewhere_hear_what_the_import_said(monkeypatch, caplog):
    class Params4bit(nn.Parameter):  # bitsandbytes' 4-bit parameter, as the notice recognises it, on another device
        pass

    model = nn.Module()
    model.weight = Params4bit(torch.empty(4, device="meta"))
    monkeypatch.setattr(notices, "held", ["bitsandbytes.cextension: a CUDA setup note", "kernels: another"])
    monkeypatch.setattr(notices, "_told", False)
    with caplog.at_level(logging.WARNING, logger="sstoken_trl.notices"):
        assert notices.four_bit_notice(model)
    [message] = [r.getMessage() for r in caplog.records]
    assert message.endswith("imported: bitsandbytes.cextension: a CUDA setup note | kernels: another")


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
