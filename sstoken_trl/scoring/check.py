"""The on-the-spot check for a family outside the tested set: AttnScore against the layer's own eager attention.

On the first scored micro-batch, the scored layer's registry call (its q, k, v, mask and keyword arguments) is
replayed, under no_grad, through the eager attention function of the layer's own modeling file, which returns
the attention probabilities; their head-averaged mass on prompt keys must equal AttnScore on every real token.
One layer, one micro-batch, once per run. The mask is the one the model built for that layer when it is a 4-D
tensor (eager and sdpa); otherwise (flash: 2-D or none; flex: a block mask) causal / padding / document / window
masks are rebuilt from the batch layout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from sstoken_trl.adapters.dispatch import eager_attention
from sstoken_trl.scoring.attn_score import AttnCall, key_mask
from sstoken_trl.scoring.layout import Layout

logger = logging.getLogger(__name__)

# Largest |AttnScore - eager prompt mass| accepted, by the lowest precision the layer computes in (q, k, autocast).
# The eager map is computed from logits in that dtype and rounded to it; AttnScore accumulates in fp32. On the 27
# tested families (tiny random models, padded and packed rows; tests/scripts/check_agreement.py): fp32 <= 1.2e-7,
# bf16 <= 2.0e-3.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@dataclass(frozen=True)
class CheckResult:
    layer: int
    max_diff: float
    mean_diff: float
    tolerance: float
    mask: str  # "model" (the layer's own 4-D mask) or "layout" (rebuilt from the batch layout)
    seconds: float
    map_bytes: int  # the (B, H, T, T) attention map the check materialises

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance

    def figures(self) -> str:
        return (
            f"max |diff| {self.max_diff:.2e}, mean {self.mean_diff:.2e}, tolerance {self.tolerance:.0e} "
            f"(mask: {self.mask}; {self.seconds * 1e3:.1f} ms, eager map {self.map_bytes / 2**20:.1f} MiB)"
        )


def eager_mask(call: AttnCall, layout: Layout) -> tuple[torch.Tensor, str]:
    """An additive (B, 1, T, T) mask for the eager replay, and where it came from."""
    mask, dtype = call.attention_mask, call.query.dtype
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        if mask.dtype != torch.bool:
            return mask, "model"
        allowed, source = mask, "model"
    else:
        allowed, source = key_mask(layout, call.sliding_window), "layout"
    zero = torch.zeros((), dtype=dtype, device=call.query.device)
    return zero.masked_fill(~allowed, torch.finfo(dtype).min), source


def eager_prompt_mass(module: nn.Module, call: AttnCall, layout: Layout) -> tuple[torch.Tensor, str, int]:
    """(B, T) head-averaged prompt mass of the layer's own eager attention probabilities for this call."""
    eager = eager_attention(module)
    if eager is None or call.value is None:
        raise ValueError(
            f"{type(module).__name__}'s modeling file has no eager_attention_forward: ssToken cannot check its "
            "AttnScore on the spot. Train it with gamma=1 or a selector that uses no attention."
        )
    mask, source = eager_mask(call, layout)
    kwargs = {**call.kwargs, "dropout": 0.0}
    with torch.no_grad():
        weights = eager(module, call.query, call.key, call.value, mask, **kwargs)[1]
    batch, heads, length = call.query.size(0), call.query.size(1), layout.real.size(1)
    if not isinstance(weights, torch.Tensor) or weights.shape != (batch, heads, length, length):
        raise ValueError(
            f"{type(module).__name__}'s eager attention returned no (B, H, T, T) attention probabilities "
            f"(got {getattr(weights, 'shape', type(weights).__name__)}): ssToken cannot check its AttnScore on the "
            "spot. Train it with gamma=1 or a selector that uses no attention."
        )
    mass = (weights.float() * layout.prompt[:, None, None, :]).sum(-1).mean(1)
    return mass, source, weights.numel() * weights.element_size()


def compute_dtypes(call: AttnCall) -> set[torch.dtype]:
    """The dtypes the layer's attention is computed in: its q and k, and the autocast dtype when autocast is on."""
    device = call.query.device.type
    dtypes = {call.query.dtype, call.key.dtype}
    if torch.is_autocast_enabled(device):
        dtypes.add(torch.get_autocast_dtype(device))
    return dtypes


def check_attn_score(module: nn.Module, call: AttnCall, layout: Layout, score: torch.Tensor, layer: int) -> CheckResult:
    """Compare `score` (B, T) with the layer's eager prompt mass on real tokens; log the figures, raise beyond the
    tolerance of the call's dtype."""
    sync = torch.cuda.synchronize if call.query.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    expected, source, map_bytes = eager_prompt_mass(module, call, layout)
    diff = (score - expected)[layout.real].abs()
    sync()
    result = CheckResult(
        layer=layer,
        max_diff=diff.max().item() if diff.numel() else 0.0,
        mean_diff=diff.mean().item() if diff.numel() else 0.0,
        tolerance=max(TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16]) for dtype in compute_dtypes(call)),
        mask=source,
        seconds=time.perf_counter() - start,
        map_bytes=map_bytes,
    )
    model_type = getattr(module.config, "model_type", "?")
    if not result.passed:
        raise ValueError(
            f"AttnScore of decoder layer {layer} ({type(module).__name__}, model_type={model_type!r}, not among the "
            f"tested families) differs from that layer's own eager attention probabilities: {result.figures()}. "
            "The layer computes something ssToken's score does not see. Pick another attn_layer, or train with "
            "gamma=1 or a selector that uses no attention (full, random, rho1, loss_truncation); please report it."
        )
    logger.warning(
        "ssToken: model_type=%r is not among the tested families; AttnScore of decoder layer %d was checked against "
        "that layer's own eager attention on the first scored micro-batch and agrees: %s.",
        model_type,
        layer,
        result.figures(),
    )
    return result
