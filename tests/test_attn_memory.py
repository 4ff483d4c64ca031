"""The sdpa backend's scoring memory is O(T) per row, and it accumulates in fp32 whatever the model dtype."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sstoken_trl.scoring.attn_score import AttnCall, attn_score_eager, attn_score_sdpa
from sstoken_trl.scoring.layout import batch_layout

HEADS, KV_HEADS, DIM = 4, 2, 16


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns (a math-kernel SDPA fallback would show its (T, T) maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def long_batch(layout: str, t: int, dtype=torch.float32, seed: int = 0):
    """Two rows (or one packed row of two documents) of length about t with 10% prompt, and the AttnCall."""
    g = torch.Generator().manual_seed(seed)
    rows = 1 if layout == "packed" else 2
    labels = torch.randint(3, 90, (rows, t), generator=g)
    mask = torch.ones(rows, t, dtype=torch.long)
    position_ids = None
    if layout == "packed":
        half = t // 2
        position_ids = torch.cat([torch.arange(half), torch.arange(t - half)])[None]
        labels[0, : half // 10] = labels[0, half : half + half // 10] = -100
        mask = None
    else:
        labels[:, : t // 10] = -100
        pad = t // 4
        if layout == "right":
            mask[1, -pad:], labels[1, -pad:] = 0, -100
        else:
            mask[1, :pad] = 0
            labels[1, : pad + t // 10] = -100
    q = (torch.randn(rows, HEADS, t, DIM, generator=g) * 2).to(dtype)
    k = (torch.randn(rows, KV_HEADS, t, DIM, generator=g) * 2).to(dtype)
    return AttnCall(q, k, DIM**-0.5), batch_layout(labels, mask, position_ids)


@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("layout_name", ["right", "left", "packed"])
def test_sdpa_scoring_has_no_t_by_t_tensor_and_grows_linearly(layout_name, window):
    largest = {}
    for t in (512, 1024):
        call, layout = long_batch(layout_name, t)
        call = AttnCall(call.query, call.key, call.scaling, window)
        with LargestTensor() as probe:
            score = attn_score_sdpa(call, layout)
        largest[t] = probe.numel
        torch.testing.assert_close(score, attn_score_eager(call, layout), atol=1e-5, rtol=0)
    assert largest[1024] < 1024 * 1024 // 8  # far below one (T, T) map
    assert largest[1024] <= 2 * largest[512] + 64  # linear in T, not quadratic


def test_softcap_and_sinks_path_is_chunked_and_exact(monkeypatch):
    monkeypatch.setattr("sstoken_trl.scoring.attn_score.LOGIT_CHUNK_ELEMENTS", 4 * 1024 * 32)  # chunks of 32 queries
    call, layout = long_batch("left", 1024)
    sinks = torch.randn(HEADS, generator=torch.Generator().manual_seed(2))
    call = AttnCall(call.query, call.key, call.scaling, None, softcap=3.0, sinks=sinks)
    with LargestTensor() as probe:
        score = attn_score_sdpa(call, layout)
    assert probe.numel <= 4 * 32 * 1025
    torch.testing.assert_close(score, attn_score_eager(call, layout), atol=1e-5, rtol=0)


def test_bf16_scores_accumulate_in_fp32_without_ties():
    # bf16 output would round each mass to 8 bits of mantissa: many equal scores, errors ~1e-3.
    call, layout = long_batch("right", 512, dtype=torch.bfloat16)
    score = attn_score_sdpa(call, layout)
    reference = attn_score_eager(AttnCall(call.query.float(), call.key.float(), call.scaling), layout)
    torch.testing.assert_close(score, reference, atol=1e-5, rtol=0)
    assert score.dtype == torch.float32
    values = score[0, 100:]
    assert values.unique().numel() == values.numel()
