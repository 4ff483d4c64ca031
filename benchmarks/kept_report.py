"""Learned beside kept, per regime and method, from real_sft's results: python -m benchmarks.kept_report [FILE].

Learned: held-out exact match (where replies are checkable) and answer loss. Kept (benchmarks/kept_probe.py): the
share of the real-knowledge probes the base answered right still right, and the NLL per token of the base's own
replies to held-out chat prompts (the base row gives its own). Means over the seeds each method ran (named). Further
files (other training settings: a lower learning rate, a smaller rank, fewer steps) join the first, each method named
with the settings that differ ("full lr=0.00025"). With --plot PNG: answer loss against knowledge kept, one panel per
regime, one point per method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.noisy_report import markdown, summary

COLUMNS = {"accuracy": "exact match", "clean_loss": "answer loss", "knowledge_kept": "knowledge kept"}
COLUMNS["chat_drift"] = "chat drift (NLL)"


def cell(values: dict[str, dict[str, float]], key: str) -> str:
    if key not in values:
        return "-"
    spread = f" ± {values[key]['std']:.3f}" if values[key]["std"] else ""
    return f"{values[key]['mean']:.3f}{spread}"


def kept_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per regime: the base, then every method that reports what it kept, in the file's order."""
    rows = []
    for regime, part in report["regimes"].items():
        if part.get("base") and "chat_drift" in part["base"]:
            base = {k: {"mean": v, "std": 0.0} for k, v in part["base"].items()}
            rows.append([regime, "base", "-", *(cell(base, k) for k in COLUMNS), "-"])
        for name, entry in part["methods"].items():
            runs = [r for r in entry["seeds"].values() if "chat_drift" in r]
            if not runs:
                continue
            s = summary(runs)
            seeds = ",".join(k for k, r in entry["seeds"].items() if "chat_drift" in r)
            steps = f"{s['optimizer_steps']['mean']:.0f}"
            rows.append([regime, name, seeds, *(cell(s, k) for k in COLUMNS), steps])
    return rows


def kept_table(report: dict[str, Any]) -> str:
    return markdown(["regime", "method", "seeds", *COLUMNS.values(), "optimizer steps"], kept_rows(report))


def axis_end(losses: list[float], base_loss: float | None) -> float:
    """Where a panel's loss axis ends: past every method that beat the base (whose loss a worse one would stretch the
    axis to); every loss when no base is known or none beat it."""
    beat = [x for x in losses if base_loss is None or x < base_loss]
    top = max(beat or losses)
    return top + 0.15 * (top - min(losses)) + 0.05


def plot(report: dict[str, Any], path: Path) -> None:
    """Answer loss (learned, lower is better) against knowledge kept, a panel per regime, a point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = {
        r: p for r, p in report["regimes"].items() if any("chat_drift" in m["summary"] for m in p["methods"].values())
    }
    names = list(dict.fromkeys(n for p in regimes.values() for n in p["methods"]))
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4.2), squeeze=False)
    for ax, (regime, part) in zip(axes[0], regimes.items(), strict=True):
        points = {n: e["summary"] for n, e in part["methods"].items() if "knowledge_kept" in e["summary"]}
        right = axis_end([s["clean_loss"]["mean"] for s in points.values()], (part.get("base") or {}).get("clean_loss"))
        for name, s in points.items():
            index = names.index(name)  # one colour and marker per method in every panel, named in the legend
            style = {"color": f"C{index % 10}", "marker": "osD^v"[index // 10 % 5], "label": name}
            loss, kept = s["clean_loss"]["mean"], s["knowledge_kept"]["mean"]
            if loss > right:  # learned less than the base knew: at the axis's end, its loss written beside
                style["marker"] = ">"
                ax.annotate(f"{loss:.2f}", (right, kept), textcoords="offset points", xytext=(-8, 8), fontsize=8)
            ax.scatter(min(loss, right), kept, s=45, **style)
        ax.set(title=regime, xlabel="held-out answer loss (learned; lower is better)", ylabel="knowledge kept")
        ax.set_ylim(-0.05, 1.05)
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def merged(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The first report with every other's methods added, each named with the training settings that differ."""
    first = {
        **reports[0],
        "regimes": {r: {**p, "methods": dict(p["methods"])} for r, p in reports[0]["regimes"].items()},
    }
    for other in reports[1:]:
        differ = [f"{k}={v}" for k, v in other["settings"].items() if first["settings"].get(k) != v and k != "train"]
        for regime, part in other["regimes"].items():
            target = first["regimes"].setdefault(regime, {"base": part.get("base"), "methods": {}})
            for name, entry in part["methods"].items():
                target["methods"][" ".join([name, *differ])] = entry
    return first


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", default=["benchmarks/results/real_sft_kept.json"])
    p.add_argument("--plot", help="write the learned-against-kept plot to this PNG")
    args = p.parse_args(argv)
    report = merged([json.loads(Path(f).read_text()) for f in args.files])
    print(kept_table(report))
    if args.plot:
        plot(report, Path(args.plot))


if __name__ == "__main__":
    main()
