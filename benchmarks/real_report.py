"""Tables of the real-model benchmark from its results JSON: python -m benchmarks.real_report [FILE]."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.kept_report import kept_table
from benchmarks.noisy_report import (
    ORDER,
    PEERS,
    RECOMMENDED,
    compute_table,
    markdown,
    plain_partner,
    summary,
    versus,
)

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
            cell = f"{_accuracy(mean)} / {mean['clean_loss']:.3f}"
            partner = plain_partner(methods, name)
            if partner and partner != name:
                other = {k: v["mean"] for k, v in methods[partner]["summary"].items()}
                gain = f"{mean['accuracy'] - other['accuracy']:+.3f}" if "accuracy" in mean else "-"
                cell += f" ({gain} / {mean['clean_loss'] - other['clean_loss']:+.3f} vs {partner})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _accuracy(mean: dict[str, float]) -> str:
    """Exact match, or `-` in a regime whose replies are not checkable (chat)."""
    return f"{mean['accuracy']:.3f}" if "accuracy" in mean else "-"


def _ran(methods: dict[str, Any], name: str, seeds: list[str]) -> list[str]:
    """Those of `seeds` that `name` ran."""
    return [s for s in seeds if s in methods.get(name, {}).get("seeds", {})]


def _note(ran: list[str], seeds: list[str]) -> str:
    """Names the seeds a figure stands on where they are not all of `seeds`."""
    return "" if ran == seeds else f" (seed {', '.join(ran)})"


def _summary(methods: dict[str, Any], name: str, ran: list[str]) -> dict[str, dict[str, float]]:
    return summary([methods[name]["seeds"][s] for s in ran])


def method_table(report: dict[str, Any], seeds: list[str]) -> str:
    """Regimes x methods (ORDER): exact match (± std over seeds, where more than one) / clean loss, means over the
    `seeds` each ran (named where not all); `-` where it ran none."""
    regimes = report["regimes"]
    names = [n for n in ORDER if any(_ran(p["methods"], n, seeds) for p in regimes.values())]
    rows = []
    for regime, part in regimes.items():
        cells = []
        for name in names:
            ran = _ran(part["methods"], name, seeds)
            if not ran:
                cells.append("-")
                continue
            s = _summary(part["methods"], name, ran)
            spread = f" ± {s['accuracy']['std']:.3f}" if len(ran) > 1 and "accuracy" in s else ""
            accuracy = _accuracy({k: v["mean"] for k, v in s.items()})
            cells.append(f"{accuracy}{spread} / {s['clean_loss']['mean']:.3f}{_note(ran, seeds)}")
        rows.append([regime, *cells])
    return markdown(["regime", *names], rows)


def versus_table(report: dict[str, Any], seeds: list[str]) -> str:
    """The recommendation against each peer (PEERS) per regime, means over the seeds both ran (named where not all),
    at equal steps (= equal compute: each is one run of the same steps)."""
    rows = []
    for regime, part in report["regimes"].items():
        methods = part["methods"]
        cells = []
        for peer in PEERS:
            both = [s for s in _ran(methods, RECOMMENDED, seeds) if s in _ran(methods, peer, seeds)]
            if not both:
                cells.append("-")
                continue
            mean = {n: {k: v["mean"] for k, v in _summary(methods, n, both).items()} for n in (RECOMMENDED, peer)}
            checkable = "accuracy" in mean[peer]  # a regime without exact match (chat) has no comparison here
            cells.append(versus(mean[RECOMMENDED], mean[peer]) + _note(both, seeds) if checkable else "-")
        if any(c != "-" for c in cells):
            rows.append([regime, *cells])
    return markdown(["regime", *(f"{RECOMMENDED} vs {p}" for p in PEERS)], rows)


def print_summary(report: dict[str, Any]) -> None:
    """The README's tables: every method, and the recommendation against its peers, over every seed."""
    seeds = sorted({s for p in report["regimes"].values() for m in p["methods"].values() for s in m["seeds"]})
    print(f"## exact match ± std / clean loss, mean over seeds {', '.join(seeds)}\n")
    print(method_table(report, seeds))
    print("\n## the recommendation against full SFT and DFT (equal steps = equal compute)\n")
    print(versus_table(report, seeds))


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    for regime, part in report["regimes"].items():
        methods = part["methods"]
        if not methods:
            continue
        seeds = sorted({seed for m in methods.values() for seed in m["seeds"]})
        flagged = next(iter(methods.values()))["summary"]["flagged_share"]["mean"]
        base = part.get("base")
        base_text = f"base exact match {_accuracy(base)}, clean loss {base['clean_loss']:.3f}; " if base else ""
        print(f"\n## {regime}: {flagged:.1%} of response tokens flagged; {base_text}seeds {', '.join(seeds)}\n")
        first = next(iter(methods.values()))["summary"]
        print(compute_table(methods, None if "accuracy" in first else {"clean_loss": "answer loss"}))
        print()
        print(drop_table(methods))
    if any("chat_drift" in m["summary"] for p in report["regimes"].values() for m in p["methods"].values()):
        print("\n## learned and kept (benchmarks/kept_probe.py), mean ± std over seeds\n")
        print(kept_table(report))
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
    p.add_argument("--summary", action="store_true", help="only the README's tables")
    args = p.parse_args(argv)
    report = json.loads(Path(args.file).read_text())
    if args.summary:
        print_summary(report)
    else:
        print_report(report)


if __name__ == "__main__":
    main()
