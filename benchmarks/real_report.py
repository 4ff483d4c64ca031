"""Tables of the real-model benchmark from its results JSON: python -m benchmarks.real_report [FILE]."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.noisy_report import compute_table, plain_partner

DROPS = {
    "corrupted_dropped_share": "flagged dropped",
    "clean_dropped_share": "other dropped",
    "eos_dropped_share": "end dropped",
}


def drop_table(methods: dict[str, dict[str, Any]]) -> str:
    """Share of flagged (corrupted, wrong or filler) / other / end response tokens each method left untrained."""
    lines = ["| method | " + " | ".join(DROPS.values()) + " |", "|---|" + "---|" * len(DROPS)]
    for name, entry in methods.items():
        lines.append(f"| {name} | " + " | ".join(f"{entry['summary'][k]['mean']:.2f}" for k in DROPS) + " |")
    return "\n".join(lines)


def overview(report: dict[str, Any]) -> str:
    """One row per method, per regime: exact match / clean loss, and in brackets the difference to plain SFT at
    equal compute (full for one run, full_x2 for two)."""
    regimes = {r: p["methods"] for r, p in report["regimes"].items() if p["methods"]}
    names = list(dict.fromkeys(n for methods in regimes.values() for n in methods))
    lines = ["| method | " + " | ".join(regimes) + " |", "|---|" + "---|" * len(regimes)]
    for name in names:
        cells = []
        for methods in regimes.values():
            if name not in methods:
                cells.append("-")
                continue
            mean = {k: v["mean"] for k, v in methods[name]["summary"].items()}
            cell = f"{mean['accuracy']:.3f} / {mean['clean_loss']:.3f}"
            partner = plain_partner(methods, name)
            if partner and partner != name:
                other = methods[partner]["summary"]
                cell += (
                    f" ({mean['accuracy'] - other['accuracy']['mean']:+.3f} / "
                    f"{mean['clean_loss'] - other['clean_loss']['mean']:+.3f} vs {partner})"
                )
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    for regime, part in report["regimes"].items():
        methods = part["methods"]
        if not methods:
            continue
        seeds = sorted({seed for m in methods.values() for seed in m["seeds"]})
        flagged = next(iter(methods.values()))["summary"]["flagged_share"]["mean"]
        base = part.get("base")
        base_text = f"base exact match {base['accuracy']:.3f}, clean loss {base['clean_loss']:.3f}; " if base else ""
        print(f"\n## {regime}: {flagged:.1%} of response tokens flagged; {base_text}seeds {', '.join(seeds)}\n")
        print(compute_table(methods))
        print()
        print(drop_table(methods))
    print("\n## all regimes: exact match / clean loss (difference to plain SFT at equal compute)\n")
    print(overview(report))
    print(
        f"\n{report['model']}, LoRA r{s['lora_r']}, {s['steps']} steps x {s['batch']} per run, lr {s['lr']}, "
        f"noise {s['noise']}, rho {s['select_ratio']} where a method sets none; {s['eval']} clean held-out prompts; "
        "mean over seeds; differences of means"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("file", nargs="?", default="benchmarks/results/real_sft.json")
    print_report(json.loads(Path(p.parse_args(argv).file).read_text()))


if __name__ == "__main__":
    main()
