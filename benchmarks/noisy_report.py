"""Tables and the plot of the noisy-SFT benchmark."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

COLUMNS = {
    "accuracy": "exact match",
    "clean_loss": "clean loss",
    "letter_accuracy": "letter acc.",
    "clean_loss_eos": "</s> loss",
    "corrupted_dropped_share": "corrupted dropped",
    "clean_dropped_share": "clean dropped",
    "eos_dropped_share": "</s> dropped",
}
FULL, ORACLE = "full", "oracle"


def gap_closed(methods: dict[str, dict[str, Any]], name: str, key: str) -> float | None:
    """(method - full) / (oracle - full) on the seed means of `key`; None without both references."""
    if FULL not in methods or ORACLE not in methods:
        return None
    mean = {n: methods[n]["summary"][key]["mean"] for n in (name, FULL, ORACLE)}
    gap = mean[ORACLE] - mean[FULL]
    return (mean[name] - mean[FULL]) / gap if abs(gap) > 1e-9 else None


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over seeds of every number a run reports."""
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, int | float):
            values = [r[key] for r in runs]
            out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def table(methods: dict[str, dict[str, Any]], base: dict[str, float] | None = None) -> str:
    """Markdown table, mean ± std over seeds; `base` (one evaluation, no training) first when given."""
    extra = ["gap closed (exact match)", "gap closed (loss)", "train s"]
    header = "| method | " + " | ".join([*COLUMNS.values(), *extra]) + " |"
    lines = [header, "|---|" + "---|" * (len(COLUMNS) + len(extra))]
    if base is not None:
        cells = [f"{base[k]:.3f}" if k in base else "-" for k in COLUMNS]
        lines.append("| base (no fine-tuning) | " + " | ".join(cells) + " | - | - | - |")
    for name, result in methods.items():
        s = result["summary"]
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in COLUMNS]
        gaps = [gap_closed(methods, name, k) for k in ("accuracy", "clean_loss")]
        cells += ["-" if g is None else f"{g:.2f}" for g in gaps]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['train_seconds']['mean']:.0f} |")
    return "\n".join(lines)


def plot(regimes: dict[str, dict[str, Any]], path: Path) -> bool:
    """Per regime a row of four panels, a bar per method (mean) with a dot per seed; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = ["accuracy", "clean_loss", "corrupted_dropped_share", "eos_dropped_share"]
    titles = ["held-out exact match", "loss on clean data", "corrupted (filler) dropped", "</s> tokens dropped"]
    fig, axes = plt.subplots(len(regimes), len(panels), figsize=(4 * len(panels), 4 * len(regimes)), squeeze=False)
    for row, (regime, part) in zip(axes, regimes.items(), strict=True):
        _panels(row, regime, part["methods"], panels, titles)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _panels(axes: Any, regime: str, methods: dict[str, dict[str, Any]], panels: list[str], titles: list[str]) -> None:
    names = list(methods)
    for ax, key, title in zip(axes, panels, titles, strict=True):
        ax.bar(range(len(names)), [methods[n]["summary"][key]["mean"] for n in names], color="#9db4d0")
        for i, n in enumerate(names):
            seeds = [r[key] for r in methods[n]["seeds"]]
            ax.scatter([i] * len(seeds), seeds, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"{regime}: {title}", fontsize=9)
