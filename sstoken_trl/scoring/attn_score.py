"""AttnScore(x_i): head-averaged attention mass that token i's query puts on prompt tokens (paper Eq. 7).

Two backends compute the same number from one layer's post-RoPE q and k, with the layer's own scaling, sliding
window, logit softcap and attention sinks (whatever the layer passes to transformers' attention function):
- "sdpa": each document of each row on its own (its real tokens only), one query head at a time, through
  fused attention whose value vector is the prompt indicator, so output row i IS the mass on prompt keys. Memory
  O(T) per row: no (T, T) tensor of any dtype. Layers with a softcap or sinks (which fused attention cannot apply)
  go through softmax logits in query chunks of bounded size instead. Accumulates in fp32 whatever the model dtype.
- "eager": the paper's materialised softmax(QK^T * scaling) summed over prompt columns, (B, H, T, T).
Both mask causally, within a document, real keys only, and the layer's sliding window if it has one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sstoken_trl.scoring.layout import Layout

LOGIT_CHUNK_ELEMENTS = 1 << 22  # logits per query chunk on the softcap / sinks path (16 MiB in fp32)


@dataclass(frozen=True)
class AttnCall:
    """What one attention layer hands to its attention function: post-RoPE q (B, H, T, d), k (B, H_kv, T, d)."""

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    sliding_window: int | None = None  # keys j with i - window < j <= i
    softcap: float | None = None  # logits -> softcap * tanh(logits / softcap)
    sinks: torch.Tensor | None = None  # (H,) one extra logit per head in the softmax denominator
    value: torch.Tensor | None = None  # the rest of the call, to replay it through the layer's eager function
    attention_mask: Any = field(default=None, compare=False)  # as the model built it for its implementation
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False)


def key_mask(layout: Layout, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend to key j (eager backend only)."""
    t = layout.doc.size(1)
    pos = torch.arange(t, device=layout.doc.device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    allowed = allowed[None] & (layout.doc[:, :, None] == layout.doc[:, None, :]) & layout.real[:, None, :]
    # Padding queries may see nothing; let them see themselves so no row is empty (their score is dropped).
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=pos.device)
    return allowed[:, None]


def documents(layout: Layout) -> Iterator[tuple[int, slice | torch.Tensor]]:
    """(row, positions) of every document's real tokens: a slice when contiguous (padding, packing), else indices.

    One host transfer of the (B, T) layout per batch.
    """
    real, doc = layout.real.cpu(), layout.doc.cpu()
    for row in range(real.size(0)):
        positions = real[row].nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        counts = torch.unique_consecutive(doc[row, positions], return_counts=True)[1].tolist()
        for part in positions.split(counts):
            start, stop = int(part[0]), int(part[-1]) + 1
            yield row, slice(start, stop) if stop - start == part.numel() else part.to(layout.real.device)


def _band(queries: range, keys: range, window: int | None, device: torch.device) -> torch.Tensor:
    """(len(queries), len(keys)) bool: causal, and within the window when there is one."""
    q = torch.arange(queries.start, queries.stop, device=device)[:, None]
    k = torch.arange(keys.start, keys.stop, device=device)[None, :]
    allowed = k <= q
    return allowed if window is None else allowed & (k > q - window)


def _key_range(queries: range, window: int | None) -> range:
    return range(0 if window is None else max(0, queries.start - window + 1), queries.stop)


def _document_score_sdpa(q: torch.Tensor, k: torch.Tensor, prompt: torch.Tensor, call: AttnCall) -> torch.Tensor:
    """(L,) for one document: q (H, L, d), k (H_kv, L, d), prompt (L,) bool. One query head at a time."""
    length, group = q.size(1), q.size(0) // k.size(0)
    # With a window, query chunks of the window's size see at most two windows of keys: memory O(window * L).
    chunk = length if call.sliding_window is None else max(1, call.sliding_window)
    total = torch.zeros(length, dtype=torch.float32, device=q.device)
    v = prompt.float()[None, None, :, None].expand(1, 1, length, q.size(-1)).contiguous()
    for head in range(q.size(0)):
        qh = q[head].float()[None, None]
        kh = k[head // group].float()[None, None]
        for start in range(0, length, chunk):
            queries = range(start, min(length, start + chunk))
            keys = _key_range(queries, call.sliding_window)
            if call.sliding_window is None:
                out = F.scaled_dot_product_attention(qh, kh, v, is_causal=True, scale=call.scaling)
            else:
                out = F.scaled_dot_product_attention(
                    qh[:, :, queries.start : queries.stop],
                    kh[:, :, keys.start : keys.stop],
                    v[:, :, keys.start : keys.stop],
                    attn_mask=_band(queries, keys, call.sliding_window, q.device),
                    scale=call.scaling,
                )
            total[queries.start : queries.stop] += out[0, 0, :, 0]
    return total / q.size(0)


def _document_score_logits(q: torch.Tensor, k: torch.Tensor, prompt: torch.Tensor, call: AttnCall) -> torch.Tensor:
    """(L,) for one document from softmax logits (softcap, sinks), in query chunks of bounded size."""
    heads, length, dim = q.shape
    qg = q.float().view(k.size(0), heads // k.size(0), length, dim)  # (H_kv, group, L, d)
    kf = k.float()[:, None]
    span = length if call.sliding_window is None else min(length, 2 * call.sliding_window)
    chunk = max(1, min(length, LOGIT_CHUNK_ELEMENTS // (heads * span)))
    out = torch.empty(length, dtype=torch.float32, device=q.device)
    for start in range(0, length, chunk):
        queries = range(start, min(length, start + chunk))
        keys = _key_range(queries, call.sliding_window)
        logits = qg[:, :, queries.start : queries.stop] @ kf[..., keys.start : keys.stop, :].transpose(-1, -2)
        logits = (logits * call.scaling).flatten(0, 1)  # (H, chunk, keys)
        if call.softcap is not None:
            logits = torch.tanh(logits / call.softcap) * call.softcap
        logits = logits.masked_fill(~_band(queries, keys, call.sliding_window, q.device), float("-inf"))
        if call.sinks is not None:
            sink = call.sinks.float()[:, None, None].expand(-1, logits.size(1), 1)
            logits = torch.cat([logits, sink], dim=-1)
        probs = logits.softmax(dim=-1)[..., : len(keys)]
        out[queries.start : queries.stop] = (probs * prompt[keys.start : keys.stop]).sum(-1).mean(0)
    return out


def attn_score_sdpa(call: AttnCall, layout: Layout) -> torch.Tensor:
    """(B, T) prompt attention mass per query; extra memory O(T) per row, in fp32."""
    fused = call.softcap is None and call.sinks is None
    score_document = _document_score_sdpa if fused else _document_score_logits
    score = torch.zeros(layout.real.shape, dtype=torch.float32, device=layout.real.device)
    for row, positions in documents(layout):
        q, k = call.query[row][:, positions], call.key[row][:, positions]
        score[row, positions] = score_document(q, k, layout.prompt[row, positions], call)
    return score


def attn_score_eager(call: AttnCall, layout: Layout) -> torch.Tensor:
    """(B, T) prompt attention mass per query, from the materialised attention map (B, H, T, T)."""
    q, k = call.query.float(), call.key.float()
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * call.scaling
    if call.softcap is not None:
        logits = torch.tanh(logits / call.softcap) * call.softcap
    logits = logits.masked_fill(~key_mask(layout, call.sliding_window), float("-inf"))
    if call.sinks is not None:
        sink = call.sinks.float()[None, :, None, None].expand(*logits.shape[:-1], 1)
        logits = torch.cat([logits, sink], dim=-1)
    probs = logits.softmax(dim=-1)[..., : k.size(2)]
    return (probs * layout.prompt[:, None, None, :]).sum(-1).mean(dim=1) * layout.real


BACKENDS = {"sdpa": attn_score_sdpa, "eager": attn_score_eager}
