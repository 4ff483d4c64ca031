"""Summary statistics and the printed table of the step-cost benchmark."""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

import peft
import torch
import transformers
import trl

from benchmarks.alternate import TurnCallback


def summarise(turns: dict[str, TurnCallback], warmup: int, baseline: str = "sft") -> dict[str, dict[str, Any]]:
    """Median and spread per variant, and ratios to plain SFT paired by round (step i of each variant)."""
    timed = {name: t.records[warmup:] for name, t in turns.items()}
    base = timed.get(baseline, [])
    out: dict[str, dict[str, Any]] = {}
    for name, records in timed.items():
        if not records:
            out[name] = {"steps": 0}
            continue
        secs = [r.seconds for r in records]
        row: dict[str, Any] = {"steps": len(records), "step_s": spread(secs)}
        row["peak_bytes"] = max(r.peak_bytes for r in records)
        row["step_extra_bytes"] = max(r.peak_bytes - r.start_bytes for r in records)
        for key in ("score_s", "history_s", "collate_s"):
            row[key] = statistics.median(r.extra[key] for r in records)
        row["score_share_of_step"] = row["score_s"] / statistics.median(secs)
        if base:
            pairs = list(zip(records, base, strict=False))
            row["time_ratio"] = spread([r.seconds / b.seconds for r, b in pairs])
            row["history_ratio"] = spread([r.extra["history_s"] / b.seconds for r, b in pairs])
            row["peak_ratio"] = row["peak_bytes"] / max(b.peak_bytes for b in base)
            base_extra = max(b.peak_bytes - b.start_bytes for b in base)
            row["step_extra_ratio"] = row["step_extra_bytes"] / base_extra if base_extra > 0 else None
        out[name] = row
    return out


def spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}


def _range(s: dict[str, float] | None, digits: int = 3) -> str:
    return "-" if s is None else f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}, {s['q3']:.{digits}f}]"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: dict[str, dict[str, Any]], cuda: bool) -> str:
    """Markdown table; ratios are to plain SFT, time ratios paired by round: median [quartiles]."""
    mem = "peak allocated" if cuda else "peak RSS"
    head = (
        f"| variant | step s | x sft | {mem} | x sft | step's extra memory | x sft | scoring ms | scoring / step "
        "| history forward / sft step | collate ms |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, r in results.items():
        if not r.get("steps"):
            lines.append(f"| {name} | {r.get('error', 'no timed steps')} |" + " |" * 9)
            continue
        history = r.get("history_ratio")
        cells = [
            name,
            _range(r["step_s"]),
            _range(r.get("time_ratio")),
            f"{r['peak_bytes'] / 2**20:,.0f} MiB",
            _num(r.get("peak_ratio"), ".3f"),
            f"{r['step_extra_bytes'] / 2**20:,.0f} MiB",
            _num(r.get("step_extra_ratio"), ".3f"),
            _num(r["score_s"] * 1e3 or None, ".2f"),
            _num(100 * r["score_share_of_step"] or None, ".2f") + ("%" if r["score_s"] else ""),
            _num(history["median"] if history and r["history_s"] else None, ".3f"),
            f"{r['collate_s'] * 1e3:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    info["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info.update(transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__)
    return info


# Targets for an H200, LLaMA-3.1-8B shape, LoRA r 64, bf16, SDPA, 4 x 2048 tokens: (variant, field, at most).
TARGETS = {
    "online ssToken step <= 1.30x plain": ("online", "time_ratio", 1.30),
    "cached ssToken step <= 1.03x plain": ("cached", "time_ratio", 1.03),
    "scoring <= 0.5% of an online step": ("online", "score_share_of_step", 0.005),
    "online peak memory <= 1.05x plain": ("online", "peak_ratio", 1.05),
    "cached peak memory <= 1.05x plain": ("cached", "peak_ratio", 1.05),
}


def targets(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target with the measured value (a median where it is a spread) and whether it is met."""
    out = {}
    for label, (variant, field, limit) in TARGETS.items():
        value = results.get(variant, {}).get(field)
        if isinstance(value, dict):
            value = value["median"]
        out[label] = {"value": value, "limit": limit, "met": None if value is None else value <= limit}
    return out
