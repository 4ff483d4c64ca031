"""Two processes (gloo, CPU) under `accelerate launch` train exactly as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_ranks.py"


def run(args: list[str], out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, str(SCRIPT), str(one), "4"], one)
    # accelerate's torch.distributed launcher; the trainer's use_cpu makes the process group gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run([*launch, str(SCRIPT), str(two), "2"], two)
    single = json.loads(Path(f"{one}-rank0.json").read_text())
    ranks = [json.loads(Path(f"{two}-rank{r}.json").read_text()) for r in (0, 1)]

    # Selection is per sample: every sample keeps the same target positions, whichever rank saw it.
    assert set(ranks[0]["kept"]).isdisjoint(ranks[1]["kept"])
    assert {**ranks[0]["kept"], **ranks[1]["kept"]} == single["kept"]
    # The loss is normalised by the kept tokens of all ranks: same loss, same statistics, same weights.
    for rank in ranks:
        for a, b in zip(rank["logs"], single["logs"], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert abs(a[key] - b[key]) < 1e-5, key
        for name, value in single["weights"].items():
            torch.testing.assert_close(torch.tensor(rank["weights"][name]), torch.tensor(value), atol=1e-5, rtol=0)
