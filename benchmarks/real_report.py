"""Tables of the real-model benchmark from its results JSON: python -m benchmarks.real_report [FILE]."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.noisy_report import ORDER, PEERS, RECOMMENDED, compute_table, markdown, plain_partner, versus

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


def seed_table(report: dict[str, Any], seed: str) -> str:
    """Regimes x methods (ORDER) of one seed: exact match / clean loss."""
    regimes = report["regimes"]
    names = [n for n in ORDER if any(seed in p["methods"].get(n, {}).get("seeds", {}) for p in regimes.values())]
    rows = []
    for regime, part in regimes.items():
        runs = {n: part["methods"][n]["seeds"].get(seed) for n in names if n in part["methods"]}
        rows.append(
            [regime, *(f"{r['accuracy']:.3f} / {r['clean_loss']:.3f}" if r else "-" for r in map(runs.get, names))]
        )
    return markdown(["regime", *names], rows)


def _mean(methods: dict[str, Any], name: str, seeds: list[str]) -> dict[str, float] | None:
    runs = [methods.get(name, {}).get("seeds", {}).get(seed) for seed in seeds]
    if not seeds or not all(runs):
        return None
    return {k: sum(r[k] for r in runs) / len(runs) for k in ("accuracy", "clean_loss")}


def mean_table(report: dict[str, Any], seeds: list[str]) -> str:
    """Regimes x the recommendation and its peers (PEERS), mean over the `seeds` each ran (named where not all), and
    the recommendation against each peer on the seeds both ran, at equal steps (= equal compute: each is one run of
    the same steps)."""
    rows = []
    for regime, part in report["regimes"].items():
        methods = part["methods"]
        ran = {n: [s for s in seeds if s in methods.get(n, {}).get("seeds", {})] for n in (*PEERS, RECOMMENDED)}
        if not ran[RECOMMENDED]:
            continue
        cells, versus_cells = [], []
        for name in (*PEERS, RECOMMENDED):
            mean = _mean(methods, name, ran[name])
            note = "" if ran[name] == seeds else f" (seed {', '.join(ran[name])})"
            cells.append(f"{mean['accuracy']:.3f} / {mean['clean_loss']:.3f}{note}" if mean else "-")
        for peer in PEERS:
            both = [s for s in ran[RECOMMENDED] if s in ran[peer]]
            pair = _mean(methods, RECOMMENDED, both), _mean(methods, peer, both)
            note = "" if both == seeds else f" (seed {', '.join(both)})"
            versus_cells.append(versus(*pair) + note if pair[0] and pair[1] else "-")
        rows.append([regime, *cells, *versus_cells])
    header = ["regime", *PEERS, RECOMMENDED, *(f"{RECOMMENDED} vs {p}" for p in PEERS)]
    return markdown(header, rows)


def print_summary(report: dict[str, Any]) -> None:
    """The README's tables: every method at seed 0, and the recommendation against its peers over every seed."""
    seeds = sorted({s for p in report["regimes"].values() for m in p["methods"].values() for s in m["seeds"]})
    print("## exact match / clean loss, seed 0\n")
    print(seed_table(report, "0"))
    print(f"\n## mean over seeds {', '.join(seeds)}: the recommendation against full SFT and DFT\n")
    print(mean_table(report, seeds))


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
    p.add_argument("--summary", action="store_true", help="only the README's tables")
    args = p.parse_args(argv)
    report = json.loads(Path(args.file).read_text())
    if args.summary:
        print_summary(report)
    else:
        print_report(report)


if __name__ == "__main__":
    main()
