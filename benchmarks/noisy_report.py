"""Tables and the plot of the noisy-SFT benchmark; python -m benchmarks.noisy_report [FILE]: the README's tables."""

from __future__ import annotations

import argparse
import json
import re
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
ORDER = ("full", "dft", "entropy_weighted", "sstoken_g0.5", "sstoken_soft", "recommended", "hard_truncation", "oracle")
RECOMMENDED, PEERS = "recommended", ("full", "dft")  # the README's bar: at least as good as each peer
LEVEL = 0.0005  # a difference smaller than the three decimals shown is level
PLAIN = re.compile(r"full(_x\d+)?")  # plain SFT: full, and full_x2 ... trained for that many times the steps


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


def plain_partner(methods: dict[str, dict[str, Any]], name: str) -> str | None:
    """The plain-SFT method with the fewest total optimizer steps at least those of `name` (equal compute)."""
    steps = methods[name]["summary"]["optimizer_steps"]["mean"]
    plain = sorted(
        (methods[n]["summary"]["optimizer_steps"]["mean"], n)
        for n in methods
        if PLAIN.fullmatch(n) and methods[n]["summary"]["optimizer_steps"]["mean"] >= steps - 1e-9
    )
    return plain[0][1] if plain else None


def compute_table(methods: dict[str, dict[str, Any]], keys: dict[str, str] | None = None) -> str:
    """Markdown table of each method beside full SFT (equal steps per run) and beside plain SFT given the same
    total optimizer steps (equal compute: run 1 and reference runs counted); mean over seeds, differences of means.
    """
    keys = keys or {"accuracy": "exact match", "clean_loss": "clean loss"}
    names = " / ".join(keys.values())
    header = (
        f"| method | optimizer steps | {' | '.join(keys.values())} | vs full, equal steps ({names}) "
        f"| plain SFT at equal compute | vs it ({names}) | train s |"
    )
    lines = [header, "|---|" + "---|" * (len(keys) + 5)]
    mean = {n: {k: v["mean"] for k, v in m["summary"].items()} for n, m in methods.items()}

    def delta(name: str, other: str | None) -> str:
        if other is None or other not in mean:
            return "-"
        return " / ".join(f"{mean[name][k] - mean[other][k]:+.3f}" for k in keys)

    for name in methods:
        partner = plain_partner(methods, name)
        seconds = mean[name].get("total_train_seconds", mean[name]["train_seconds"])
        cells = [f"{mean[name]['optimizer_steps']:.0f}", *(f"{mean[name][k]:.3f}" for k in keys)]
        cells += [delta(name, FULL), partner or "-", delta(name, partner), f"{seconds:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def versus(mean: dict[str, float], other: dict[str, float]) -> str:
    """`mean` against `other` on exact match and clean loss: the differences, and whether it is at least as good on
    both (exact match not lower, clean loss not higher, by more than LEVEL: the precision shown)."""
    gain, loss = mean["accuracy"] - other["accuracy"], mean["clean_loss"] - other["clean_loss"]
    worse = [name for name, bad in (("exact match", gain < -LEVEL), ("loss", loss > LEVEL)) if bad]
    return f"{gain:+.3f} / {loss:+.3f} ({'at least as good' if not worse else 'worse: ' + ', '.join(worse)})"


def summary_tables(regimes: dict[str, dict[str, Any]]) -> str:
    """The README's tables: regimes x methods (ORDER), mean ± std over seeds; the recommendation against its peers."""
    names = [n for n in ORDER if any(n in p["methods"] for p in regimes.values())]
    rows, versus_rows = [], []
    for regime, part in regimes.items():
        s = {n: m["summary"] for n, m in part["methods"].items()}
        cell = "{0[accuracy][mean]:.3f} ± {0[accuracy][std]:.3f} / {0[clean_loss][mean]:.3f}"
        rows.append([regime, *(cell.format(s[n]) if n in s else "-" for n in names)])
        if all(n in s for n in (RECOMMENDED, *PEERS)):
            mean = {n: {k: s[n][k]["mean"] for k in ("accuracy", "clean_loss")} for n in (RECOMMENDED, *PEERS)}
            versus_rows.append([regime, *(versus(mean[RECOMMENDED], mean[p]) for p in PEERS)])
    header = ["regime", *(f"{RECOMMENDED} vs {p}" for p in PEERS)]
    return markdown(["regime", *names], rows) + "\n\n" + markdown(header, versus_rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("file", nargs="?", default="benchmarks/results/noisy_sft.json")
    print(summary_tables(json.loads(Path(p.parse_args(argv).file).read_text())["regimes"]))


if __name__ == "__main__":
    main()
