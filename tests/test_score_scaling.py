"""The long-context scoring benchmark runs end to end at a minimal size and prints its table."""

from __future__ import annotations

import json

from benchmarks import score_scaling


def test_score_scaling_runs_at_minimal_size(tmp_path, capsys):
    out = tmp_path / "rows.json"
    score_scaling.main(["--seq-lens", "128", "256", "512", "--step-max", "256", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["seq_len"] for r in rows] == [128, 256, 512]
    assert [r["measured_step"] for r in rows] == [True, True, False]
    assert all(r["score_mib"] >= 0 and r["step_mib"] > 0 for r in rows)
    assert "| 512 |" in capsys.readouterr().out
