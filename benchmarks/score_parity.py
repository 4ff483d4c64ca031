"""AttnScore parity against transformers' eager `output_attentions`, and which SDPA kernel the score ran.

A random-initialised LLaMA (the attention shape of the measured model, two layers) scores right-padded,
left-padded and packed (padding-free) rows with each `attn_backend`; the reference is the last layer's
attention map returned by eager attention with `output_attentions=True`, summed over prompt keys and averaged
over heads. The SDPA backend's score call is then replayed on the same q and k under torch.profiler (which
`scaled_dot_product_attention` kernels ran) and under `sdpa_kernel` restricted to one backend at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from benchmarks.step_cost import LLAMA
from benchmarks.variants import prompt_mass
from sstoken_trl.config import SSTokenConfig
from sstoken_trl.data.spans import IGNORE_INDEX
from sstoken_trl.scoring.hook import hook_scoring_layer
from sstoken_trl.scoring.layout import batch_layout

LAYOUTS = ("right_padded", "left_padded", "packed")
Replay = tuple[Callable[..., Any], tuple]  # a score function and the arguments of one of its calls
KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def parity_model(attention: dict[str, int], device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Two decoder layers with the given attention shape (hidden_size, heads, kv heads, head_dim), small vocab."""
    config = AutoConfig.for_model(
        "llama", **LLAMA, **attention, num_hidden_layers=2, vocab_size=1024, max_position_embeddings=8192
    )
    config.intermediate_size = 2 * config.hidden_size
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def parity_batch(kind: str, rows: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids, labels and attention_mask (padded) or position_ids (packed); a quarter of each sample is prompt."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1024, (rows, seq_len), generator=g)
    labels = ids.clone()
    if kind == "packed":  # documents of 3/8, 1/4 and 3/8 of the row, each with its own prompt
        bounds = [0, 3 * seq_len // 8, 5 * seq_len // 8, seq_len]
        position_ids = torch.cat([torch.arange(e - s) for s, e in zip(bounds, bounds[1:], strict=False)])
        for s, e in zip(bounds, bounds[1:], strict=False):
            labels[:, s : s + (e - s) // 4] = IGNORE_INDEX
        position_ids = position_ids.expand(rows, -1)
        return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": position_ids.to(device)}
    lengths = torch.linspace(seq_len // 2, seq_len, rows).long()
    mask = torch.zeros(rows, seq_len, dtype=torch.long)
    for r, n in enumerate(lengths.tolist()):
        span = slice(0, n) if kind == "right_padded" else slice(seq_len - n, seq_len)
        mask[r, span] = 1
        start = span.start
        labels[r, start : start + n // 4] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    ids[mask == 0] = 0
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def reference_score(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) prompt mass of the last layer's map from eager attention with output_attentions=True."""
    layout = batch_layout(batch["labels"], batch.get("attention_mask"), batch.get("position_ids"))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(**inputs, use_cache=False, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    return prompt_mass(maps[-1], layout).float()


def hook_score(model: PreTrainedModel, batch: dict[str, torch.Tensor], backend: str) -> tuple[torch.Tensor, Replay]:
    """(B, T) AttnScore from the ssToken hook during an sdpa forward; its score function and the arguments it got."""
    layout = batch_layout(batch["labels"], batch.get("attention_mask"), batch.get("position_ids"))
    hook = hook_scoring_layer(model, SSTokenConfig(attn_backend=backend))
    seen: list[tuple] = []
    score_fn = hook.score_fn

    def recording(*args: Any) -> torch.Tensor:
        seen.append(args)
        return score_fn(*args)

    hook.score_fn = recording
    try:
        hook.arm(layout)
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        score = hook.take().float()
    finally:
        hook.remove()
    return score, (score_fn, seen[0])


def sdpa_ops(fn: Callable[..., Any], args: tuple, device: torch.device) -> list[str]:
    """Names of the aten scaled_dot_product_attention kernels one call of `fn` ran."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, torch.no_grad():
        fn(*args)
    return sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name and e.name.startswith("aten::_")})


def kernel_support(fn: Callable[..., Any], args: tuple) -> dict[str, str]:
    """For each SDPA backend alone: 'ok', or why the score could not run on it."""
    out = {}
    for name, backend in KERNELS.items():
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                fn(*args)
            out[name] = "ok"
        except RuntimeError as err:
            out[name] = "fails: " + (str(err).splitlines() or [""])[0][:60]
    return out


def score_memory(fn: Callable[..., Any], args: tuple, device: torch.device) -> int | None:
    """Bytes the score call allocates above what is already allocated (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        fn(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def run_parity(
    attention: dict[str, int], rows: int, seq_len: int, device: torch.device, dtype: torch.dtype, tolerance: float
) -> list[dict[str, Any]]:
    """One row per (layout, backend) with the max abs difference to the reference; one row on SDPA kernels."""
    model = parity_model(attention, device, dtype)
    out = []
    replay: Replay | None = None
    for kind in LAYOUTS:
        batch = parity_batch(kind, 1 if kind == "packed" else rows, seq_len, device)
        real = batch_layout(batch["labels"], batch.get("attention_mask"), batch.get("position_ids")).real
        reference = reference_score(model, batch)
        for backend in ("sdpa", "eager"):
            score, call = hook_score(model, batch, backend)
            diff = (score - reference)[real].abs().max().item()
            status = "ok" if diff <= tolerance else "fail"
            shape = tuple(batch["input_ids"].shape)
            detail = f"max |score - eager output_attentions| {diff:.2e} (tolerance {tolerance:g}), rows x T {shape}"
            out.append({"case": f"{kind}, {backend}", "status": status, "max_abs_diff": diff, "detail": detail})
            if backend == "sdpa" and kind == "right_padded":
                replay = call
    fn, args = replay
    ran = sdpa_ops(fn, args, device)
    support = kernel_support(fn, args)
    extra = score_memory(fn, args, device)
    math = any("math" in name for name in ran)
    status = "n/a" if not ran else ("fail" if device.type == "cuda" and math else "ok")
    b, t = args[0].query.size(0), args[0].query.size(2)
    memory = ""
    if extra is not None:
        memory = f"; score's extra memory {extra / 2**20:,.1f} MiB (one bool B x T x T: {b * t * t / 2**20:,.0f} MiB)"
    detail = f"ran {', '.join(ran) or 'no SDPA kernel'}; alone: " + ", ".join(f"{k} {v}" for k, v in support.items())
    out.append({"case": "sdpa kernel of the score", "status": status, "kernels": ran, "support": support,
                "score_extra_bytes": extra, "detail": detail + memory})  # fmt: skip
    return out
