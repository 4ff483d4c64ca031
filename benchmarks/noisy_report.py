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
    lines = ["| method | " + " | ".join(COLUMNS.values()) + " | train s |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    if base is not None:
        cells = [f"{base[k]:.3f}" if k in base else "-" for k in COLUMNS]
        lines.append("| base (no fine-tuning) | " + " | ".join(cells) + " | - |")
    for name, result in methods.items():
        s = result["summary"]
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['train_seconds']['mean']:.0f} |")
    return "\n".join(lines)


def plot(methods: dict[str, dict[str, Any]], path: Path) -> bool:
    """Bar per method (mean) with a dot per seed, four panels; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(methods)
    panels = ["accuracy", "clean_loss", "corrupted_dropped_share", "eos_dropped_share"]
    titles = ["held-out exact match", "loss on clean data", "corrupted tokens dropped", "</s> tokens dropped"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for ax, key, title in zip(axes, panels, titles, strict=True):
        ax.bar(range(len(names)), [methods[n]["summary"][key]["mean"] for n in names], color="#9db4d0")
        for i, n in enumerate(names):
            seeds = [r[key] for r in methods[n]["seeds"]]
            ax.scatter([i] * len(seeds), seeds, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
