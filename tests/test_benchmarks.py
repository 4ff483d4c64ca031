"""The benchmark scripts run end to end at a minimal size and write the fields the README reads (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json

from benchmarks import noisy_sft, step_cost


def test_step_cost_writes_every_variant(tmp_path):
    out = tmp_path / "step_cost.json"
    argv = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "48", "--prompt-len", "16"]
    step_cost.main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["machine"]["cpu_count"]
    variants = report["variants"]
    assert list(variants) == ["sft", "online", "cached", "output_attentions"]
    for row in variants.values():
        assert "error" not in row and row["steps"] == 2
        for key in ("step_s", "time_ratio", "peak_bytes", "peak_ratio", "step_extra_bytes", "score_s", "collate_s"):
            assert key in row
    assert variants["sft"]["time_ratio"]["median"] == 1.0
    assert variants["online"]["score_s"] > 0 and variants["online"]["history_s"] > 0
    assert variants["cached"]["score_s"] > 0 and variants["output_attentions"]["score_s"] > 0
    assert variants["sft"]["score_s"] == 0


def test_noisy_sft_reports_quality_and_drops(tmp_path):
    out = tmp_path / "noisy.json"
    argv = ["--seeds", "0", "--train", "48", "--steps", "3", "--base-steps", "4", "--ref-steps", "2", "--eval", "12"]
    noisy_sft.main([*argv, "--batch", "8", "--out", str(out)])
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert list(methods) == [*noisy_sft.METHODS, noisy_sft.CEILING]
    for name, result in methods.items():
        assert len(result["seeds"]) == 1
        summary = result["summary"]
        assert 0 <= summary["accuracy"]["mean"] <= 1 and summary["clean_loss"]["mean"] > 0
        assert 0 <= summary["corrupted_dropped_share"]["mean"] <= 1
        if name not in ("full", noisy_sft.CEILING):
            assert summary["clean_dropped_share"]["mean"] + summary["corrupted_dropped_share"]["mean"] > 0
    assert methods["full"]["summary"]["corrupted_dropped_share"]["mean"] == 0
    assert 0 < report["corrupted_share_of_response_tokens"] < 1
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0
