"""Under real FSDP2 sharding (torch's fully_shard per decoder layer, CPU mesh, gloo, 2 processes) ssToken selects
what one unsharded process selects on the same global batch, and gives the same loss and LoRA gradients.

One spawn of tests/scripts/fsdp_ranks.py runs every case: history base / ema / snapshot / model, gamma 0 / 0.5 / 1,
padded and packed rows. accelerate cannot be used for this on CPU (its FSDP switch engages only on accelerator
process types), so the script drives the project's hook, selective forward and history sources itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fsdp_ranks.py"
HISTORIES = ("base", "ema", "snapshot", "model")
CASES = [f"{h}, gamma {g}, {layout}" for h in HISTORIES for g in (0.0, 0.5, 1.0) for layout in ("padded", "packed")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp") / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launch, str(SCRIPT), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(f"{out}-rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_every_case_ran(ranks):
    for rank in ranks:
        assert list(rank["cases"]) == CASES


@pytest.mark.parametrize("case", CASES)
def test_sharded_selection_loss_and_grads_equal_one_process(ranks, case):
    whole = ranks[0]["cases"][case]["whole"]
    parts = [rank["cases"][case]["sharded"] for rank in ranks]
    # Each rank selected its own samples, and together exactly the samples of the global batch.
    assert set(parts[0]["samples"]).isdisjoint(parts[1]["samples"])
    sharded = {**parts[0]["samples"], **parts[1]["samples"]}
    assert sharded.keys() == whole["samples"].keys() and len(sharded) == 8
    for key, ref in whole["samples"].items():
        got = sharded[key]
        assert got["kept"] == ref["kept"], key
        torch.testing.assert_close(torch.tensor(got["rel"]), torch.tensor(ref["rel"]), atol=1e-9, rtol=0)
        torch.testing.assert_close(torch.tensor(got["attn_score"]), torch.tensor(ref["attn_score"]), atol=1e-6, rtol=0)
    # Something was dropped, and the signals the case uses are not trivially zero.
    n_kept = sum(len(s["kept"]) for s in whole["samples"].values())
    n_targets = sum(len(s["rel"]) for s in whole["samples"].values())
    assert 0 < n_kept < n_targets
    gamma = float(case.split("gamma ")[1].split(",")[0])
    rel_used = gamma > 0
    attn_used = gamma < 1
    assert any(any(v != 0 for v in s["rel"]) for s in whole["samples"].values()) == rel_used
    assert any(any(v != 0 for v in s["attn_score"]) for s in whole["samples"].values()) == attn_used
    # Loss over the global batch (log-probs are fp32 in TRL's fused head) and every LoRA gradient (fp64).
    for part in parts:
        assert abs(part["loss"] - whole["loss"]) < 1e-6 * whole["loss"]
        assert part["grads"].keys() == whole["grads"].keys() and len(whole["grads"]) > 0
        for name, grad in whole["grads"].items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(part["grads"][name], grad, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("case", [c for c in CASES if "gamma 1.0" not in c])
def test_the_score_ran_on_gathered_weights(ranks, case):
    """During the score the scored layer's q weight is a whole tensor; between forwards it is a DTensor shard."""
    for rank in ranks:
        between = rank["between_forwards"]
        assert between["dtensor"] and between["local"] == [32, 64]
        gathered = rank["cases"][case]["gathered"]
        assert gathered == [{"dtensor": False, "shape": [64, 64]}]


def test_the_history_model_was_sharded(ranks):
    assert all(rank["history_model_sharded"] for rank in ranks)


def test_an_ema_of_weights_gathered_with_the_root_is_refused(ranks):
    for rank in ranks:
        message = rank["root_weights_refusal"]
        assert "embed_tokens" in message and "gathered with the root module" in message, message
