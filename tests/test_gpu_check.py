"""The GPU acceptance command runs every part at tiny size on CPU (--dry-run) and reports each as table rows."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import gpu_check
from benchmarks.gpu_parts import ROW_FIELDS, SHARDED, compare_sharded, guarded

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["sft", "online", "cached"]
TARGETS = 5  # benchmarks/step_report.TARGETS
EXPECTED = (
    [("step cost, checkpointing on", v) for v in [*VARIANTS, "output_attentions"]]
    + [("score parity", f"{layout}, {backend}") for layout in ("right_padded", "left_padded", "packed")
       for backend in ("sdpa", "eager")]
    + [("score parity", "sdpa kernel of the score")]
    + [("qlora", "plain QLoRA"), ("qlora", "ssToken, history = 4-bit base")]
    + [("qlora", "recommended (one run, no history)")]
    + [("padding-free (packing)", "sdpa"), ("padding-free (packing)", "flash_attention_2")]
    + [("sharded (accelerate, 1 process)", engine) for engine in ("FSDP2", "DeepSpeed ZeRO-3")]
    + [("step cost, checkpointing off", v) for v in VARIANTS]
    + [("gradient checkpointing", v) for v in VARIANTS]
)  # fmt: skip


def test_dry_run_reports_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--dry-run", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    for r in rows:
        assert set(ROW_FIELDS) <= r.keys(), r
    cases = [(r["part"], r["case"]) for r in rows if not r["part"].startswith("targets")]
    assert cases == EXPECTED
    for gc in ("on", "off"):
        targets = [r for r in rows if r["part"] == f"targets, checkpointing {gc}"]
        assert len(targets) == TARGETS and all(r["status"] in ("met", "missed") for r in targets)
    by_case = {(r["part"], r["case"]): r for r in rows}
    flash = by_case[("padding-free (packing)", "flash_attention_2")]
    assert flash["status"] == ("ok" if importlib.util.find_spec("flash_attn") else "not installed")
    measured = [
        r for r in rows if r["part"] not in ("score parity", SHARDED) and not r["part"].startswith("targets")
        and r is not flash
    ]  # fmt: skip
    for r in measured:  # every trained case ran and was timed, and every parity and kernel check passed
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["peak_bytes"] > 0, r
    for part in ("step cost, checkpointing on", "step cost, checkpointing off"):
        assert by_case[(part, "sft")]["time_ratio"] == 1.0
        assert 0 < by_case[(part, "online")]["score_share"] < 1 and by_case[(part, "online")]["history_ratio"] > 0
    for r in rows:
        if r["part"] == "score parity" and "max_abs_diff" in r:
            assert r["status"] == "ok" and r["max_abs_diff"] < 1e-4, r
    kernel = by_case[("score parity", "sdpa kernel of the score")]
    assert kernel["kernels"] and all("scaled_dot_product" in k for k in kernel["kernels"])
    assert kernel["support"]["math"] == "ok"
    assert 0.5 < by_case[("padding-free (packing)", "sdpa")]["selected_fraction"] < 0.8
    check_sharded_rows(by_case)


def check_sharded_rows(by_case: dict) -> None:
    """On CPU accelerate does not engage FSDP (nor, where deepspeed imports, ZeRO-3): the launched recipe run is
    reported as not sharded, and still compared with the run without a launcher, which it must equal."""
    fsdp = by_case[(SHARDED, "FSDP2")]
    assert fsdp["status"] == "not sharded", fsdp
    assert fsdp["distributed_type"] in ("DistributedType.NO", "DistributedType.MULTI_CPU")
    assert not fsdp["trained_sharded"] and not fsdp["history_sharded"] and fsdp["history"] == "LlamaForCausalLM"
    assert fsdp["steps"] == gpu_check.DRY.steps and fsdp["keep_agreement"] == 1.0
    assert fsdp["log_rel_diff"] == 0.0 and fsdp["adapter_max_diff"] == 0.0
    zero3 = by_case[(SHARDED, "DeepSpeed ZeRO-3")]
    if importlib.util.find_spec("deepspeed") is None:
        assert zero3["status"] == "not installed", zero3
    else:  # DeepSpeed engages on CPU too: partitioned training and a history-model engine, equal to the plain run
        assert zero3["status"] == "ok" and zero3["distributed_type"] == "DistributedType.DEEPSPEED", zero3


def test_a_sharded_run_that_differs_fails_and_one_that_matches_passes(tmp_path):
    from safetensors.torch import save_file

    adapters = {}
    for name, value in (("plain", 1.0), ("same", 1.0 + 1e-6), ("other", 1.5)):
        adapters[name] = str(tmp_path / f"{name}.safetensors")
        save_file({"lora_A": torch.full((2, 2), value)}, adapters[name])

    def record(adapter: str, keep: list[bool], loss: float, sharded: bool = True) -> dict:
        logs = [{"loss": loss, "sstoken/selected_fraction": sum(keep) / len(keep)}]
        return {"distributed_type": "DistributedType.FSDP", "trained_sharded": sharded, "history_sharded": sharded,
                "history": "FSDPLlamaForCausalLM", "logs": logs, "keep": keep, "rel": [0.0] * len(keep),
                "attn_score": [0.0] * len(keep), "adapter": adapter}  # fmt: skip

    plain = record(adapters["plain"], [True, False, True, True], 2.0)
    assert compare_sharded("FSDP2", plain, record(adapters["same"], plain["keep"], 2.0), 1.0)["status"] == "ok"
    for other in (
        record(adapters["other"], plain["keep"], 2.0),  # trained to other weights
        record(adapters["same"], [True, True, False, True], 2.0),  # other tokens kept
        record(adapters["same"], plain["keep"], 2.1),  # other loss
    ):
        assert compare_sharded("FSDP2", plain, other, 1.0)["status"] == "fail"
    unsharded = record(adapters["same"], plain["keep"], 2.0, sharded=False)
    assert compare_sharded("FSDP2", plain, unsharded, 1.0)["status"] == "not sharded"


def test_a_failing_part_becomes_an_error_row_and_a_late_part_is_skipped(tmp_path):
    report = gpu_check.Report(tmp_path / "r.json", {"benchmark": "gpu_check"})

    def broken():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB\nmore text")

    gpu_check.run_part(report, "broken", time.monotonic() + 100, 0, broken)
    gpu_check.run_part(report, "late", time.monotonic() + 10, 60, lambda: [])
    gpu_check.run_part(report, "fine", time.monotonic() + 100, 0, lambda: [gpu_check.row("fine", "x", "ok")])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["part"], r["status"]) for r in rows] == [("broken", "error"), ("late", "skipped"), ("fine", "ok")]
    assert "OutOfMemoryError: CUDA out of memory" in rows[0]["detail"] and "test_gpu_check.py" in rows[0]["detail"]
    assert "time guard" in rows[1]["detail"]
    # Within a part, one failing case (e.g. flash-attn that imports but has no kernel) keeps the other cases.
    case = guarded("padding-free (packing)", "flash_attention_2", broken)
    assert case["status"] == "error" and set(ROW_FIELDS) <= case.keys()


def test_time_guard_stops_the_command_and_keeps_the_rows(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--time-limit", "1", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 124, done.stderr[-2000:]
    assert "time guard: stopped after 1 s" in done.stdout
    assert json.loads(out.read_text())["timed_out"].startswith("stopped by the time guard")


def test_readme_names_the_command_and_its_defaults():
    """The README's summary and docs/performance.md, where the command is described in full."""
    readme = "\n".join((ROOT / page).read_text(encoding="utf-8") for page in ("README.md", "docs/performance.md"))
    lines = re.findall(r"python -m benchmarks\.gpu_check(.*?)(?:`|$)", readme, flags=re.MULTILINE)
    assert lines
    for extra in lines:
        gpu_check.parse_args(shlex.split(extra))
    defaults = gpu_check.parse_args([])
    assert f"default `{defaults.out}`" in readme and f"({defaults.time_limit:.0f} s after start-up)" in readme
