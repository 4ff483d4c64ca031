"""The benchmark scripts run end to end at a minimal size and write the fields the README reads (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks import noise_probe, noisy_sft, step_cost


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


MINIMAL = ["--seeds", "0", "--train", "48", "--steps", "5", "--base-steps", "4", "--ref-steps", "2", "--eval", "12"]


@pytest.mark.parametrize("regime", noisy_sft.REGIMES)
def test_noisy_sft_reports_quality_and_drops(tmp_path, regime):
    out = tmp_path / "noisy.json"
    methods = [
        "full",
        "rho1",
        "token_cleaning_self",
        "recommended_one_run",
        "sstoken_g0.5",
        "recommended",
        "oracle_after_0.5",
        noisy_sft.ORACLE,
    ]
    noisy_sft.main([*MINIMAL, "--regimes", regime, "--methods", ",".join(methods), "--batch", "8", "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["regimes"]) == [regime]
    part = report["regimes"][regime]
    assert list(part["methods"]) == methods
    for name, result in part["methods"].items():
        assert len(result["seeds"]) == 1
        summary = result["summary"]
        assert 0 <= summary["accuracy"]["mean"] <= 1 and summary["clean_loss"]["mean"] > 0
        assert 0 <= summary["corrupted_dropped_share"]["mean"] <= 1
        if name not in ("full", "recommended", "oracle_after_0.5", noisy_sft.ORACLE):
            assert summary["clean_dropped_share"]["mean"] + summary["corrupted_dropped_share"]["mean"] > 0
    methods = part["methods"]
    assert methods["full"]["summary"]["corrupted_dropped_share"]["mean"] == 0
    assert methods["recommended"]["summary"]["eos_dropped_share"]["mean"] == 0  # the response end is protected
    assert methods["recommended_one_run"]["summary"]["eos_dropped_share"]["mean"] == 0
    assert methods[noisy_sft.ORACLE]["summary"]["corrupted_dropped_share"]["mean"] == 1  # masked, never trained
    late = methods["oracle_after_0.5"]["summary"]  # masked from step 3 of 5 on: some batches of every kind
    assert 0 < late["corrupted_dropped_share"]["mean"] < 1 and late["clean_dropped_share"]["mean"] == 0
    assert 0 < part["corrupted_share_of_response_tokens"] < 1
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0


def test_noisy_sft_help_documents_every_regime(capsys):
    with pytest.raises(SystemExit):
        noisy_sft.parse_args(["--help"])
    text = capsys.readouterr().out
    for regime in noisy_sft.REGIMES:
        assert f"  {regime} " in text


def test_noisy_sft_refuses_unknown_regimes_and_methods(capsys):
    for argv in (["--regimes", "noisy"], ["--methods", "full,magic"]):
        with pytest.raises(SystemExit):
            noisy_sft.parse_args(argv)
        assert "unknown" in capsys.readouterr().err


def test_noise_probe_auroc_matches_a_pairwise_count():
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 6, (40,), generator=gen).float()  # many ties
    positive = torch.rand(40, generator=gen) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in score[positive] for n in score[~positive]]
    assert noise_probe.auroc(score, positive) == pytest.approx(sum(pairs) / len(pairs))


def test_noise_probe_reports_every_signal_at_every_share(tmp_path):
    out = tmp_path / "probe.json"
    argv = [*MINIMAL, "--batch", "8", "--probe", "16", "--at", "0.4", "1.0", "--out", str(out)]
    noise_probe.main(argv)
    report = json.loads(out.read_text())
    assert list(report["regimes"]) == list(noise_probe.CORRUPTED_REGIMES)
    for runs in report["regimes"].values():
        assert len(runs) == 1 and list(runs[0]) == ["0.4", "1"]
        for values in runs[0].values():
            assert set(values) == set(noise_probe.SIGNALS) and all(0 <= v <= 1 for v in values.values())


def test_noise_probe_refuses_the_regime_without_corrupted_tokens():
    with pytest.raises(SystemExit):
        noise_probe.parse_args(["--regimes", "redundant"])
