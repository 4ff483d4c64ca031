"""How well the audit finds known noise: the real-model benchmark's regimes, where each corrupted token is known.

    python -m benchmarks.audit_quality --seeds 0 1                       # every regime, ~10 min each on 2 cores
    python -m benchmarks.audit_quality --report --write-docs             # the tables, into README and docs/audit.md

Per regime and seed (benchmarks/real_sft.py's data, model and training settings): SmolLM2-135M-Instruct is
fine-tuned with the recommended selection (LoRA, 40 steps x 8, one epoch) and its run record on (audit_dir); then
every training sample is audited with the trained adapter. Each signal ranks the samples (a sample's score is its
most suspect token's) and the tokens:
  surprise       L_cur - H_cur under the trained adapter (the audit's default with an adapter)
  surprise_base  L_base - H_base under the base model (the default without one: no training needed)
  loss, base_loss, rel (-REL = L_cur - L_base)
  run            the run's record: a token's left-out value summed over the times its sample was judged, over those
                 times (samples seen only in the selection warm-up score 0)
Figures: precision at k of the sample ranking, k = the number of corrupted samples (recall at that k is the same
number), beside a random ranking's (k / n, the share of corrupted samples); the token AUROC over response tokens
(corrupted vs clean), beside a random one's (0.5); the share of clean samples whose score passes 3 nats (false alarms).
On clean regimes (nothing corrupted) it reports how many samples pass 3 nats, and the top samples with their spans.
The toy regimes (toy_overconfident, toy_calibrated: benchmarks/noisy_sft.py at its default sizes, 2000 samples of
letters, 30% of answer letters substituted or inserted) run the same recorded training and audit on its small model.
Results merge into --out per (regime, seed); `python -m benchmarks.audit_quality --report` prints the tables.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import noisy_sft, real_sft
from benchmarks.noisy_task import Sample, build_tokenizer
from benchmarks.real_task import ChatSample
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.audit.ranking import SampleAudit
from sstoken_trl.audit.run_record import token_values
from sstoken_trl.audit.scan import audit_batch
from sstoken_trl.config import RECOMMENDED
from sstoken_trl.trl_internals import DataCollatorForLanguageModeling

NOISY = ("corrupted", "wrong", "new_facts_noisy", "sums_noisy", "toy_overconfident", "toy_calibrated")
TOY = {"toy_overconfident": "overconfident", "toy_calibrated": "calibrated"}  # regimes of benchmarks/noisy_sft
TINY_TOY = ["--train", "48", "--steps", "4", "--base-steps", "4", "--eval", "8", "--batch", "8"]
CLEAN = ("clean", "new_facts", "sums")
SIGNALS = ("surprise", "surprise_base", "loss", "base_loss", "rel", "run")
THRESHOLD = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", default=",".join(NOISY + CLEAN))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--train", type=int, help="training samples (default: steps x batch, one epoch)")
    p.add_argument("--eval", type=int, default=80, help="held-out prompts the training prompts avoid")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaMA with the real tokenizer (tests)")
    p.add_argument("--runs-dir", default=str(real_sft.ROOT / ".bases" / "real_sft_runs"))
    p.add_argument("--out", default="benchmarks/results/audit_quality.json")
    p.add_argument("--report", action="store_true", help="print the tables of --out and stop")
    p.add_argument("--write-docs", action="store_true", help="with --report: rewrite the tables of README, docs")
    args = p.parse_args(argv)
    unknown = set(args.regimes.split(",")) - set(NOISY + CLEAN)
    if unknown:
        p.error(f"unknown regimes {sorted(unknown)}; choose from {list(NOISY + CLEAN)}")
    args.train = args.train or args.steps * args.batch
    return args


# --- the measures ---------------------------------------------------------------------------------------------------


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney); None without both kinds."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    rank_sum = sum(r for r, p in zip(ranks, positive, strict=True) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def precision_at_k(scores: list[float], positive: list[bool]) -> float | None:
    """Share of corrupted samples among the top k, k = the number of corrupted ones (ties: the lower index first)."""
    k = sum(positive)
    if not k:
        return None
    top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return sum(positive[i] for i in top) / k


# --- one regime and seed --------------------------------------------------------------------------------------------


def audit_training_set(model: torch.nn.Module, samples: list[ChatSample], pad_id: int) -> list[SampleAudit]:
    collate = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    out = []
    for start in range(0, len(samples), 16):
        chunk = samples[start : start + 16]
        out += audit_batch(model, collate([s.row() for s in chunk]), range(start, start + len(chunk)), "surprise")
    return out


def run_figures(record_dir: Path, samples: list[ChatSample]) -> tuple[list[list[float]], list[int]]:
    """(per sample, each token's figure in the run's record (0 where never left out or never judged); the indices
    of the samples the selection judged)."""
    values = token_values(record_dir)
    out = []
    for i, s in enumerate(samples):
        judged, sums = values.get(i, (0, {}))
        out.append([sums.get(j, 0.0) / judged if judged else 0.0 for j in range(len(s.input_ids))])
    return out, sorted(values)


def measure(
    audits: list[SampleAudit], run: list[list[float]], samples: list[ChatSample], tokenizer: Any
) -> dict[str, Any]:
    """Every signal's figures against the known corruptions; the top samples of each signal."""
    bad_sample = [any(s.corrupted) for s in samples]
    result: dict[str, Any] = {"samples": len(samples), "corrupted_samples": sum(bad_sample), "signals": {}}
    for name in SIGNALS:
        token_scores, token_bad, sample_scores = [], [], []
        for audit, s, figures in zip(audits, samples, run, strict=True):
            start = len(s.prompt)
            values = figures[start:] if name == "run" else audit.suspicion[name][start:]
            token_scores += values
            token_bad += s.corrupted
            sample_scores.append(max(values))
        clean_scores = [v for v, bad in zip(sample_scores, bad_sample, strict=True) if not bad]
        top = sorted(range(len(samples)), key=lambda i: (-sample_scores[i], i))[:5]
        result["signals"][name] = {
            "precision_at_k": precision_at_k(sample_scores, bad_sample),
            "token_auroc": auroc(token_scores, token_bad),
            "sample_auroc": auroc(sample_scores, bad_sample),
            "false_alarm_share": sum(v > THRESHOLD for v in clean_scores) / max(len(clean_scores), 1),
            "top": [top_entry(i, sample_scores[i], samples[i], audits[i], name, run[i], tokenizer) for i in top],
        }
    result["run_samples_with_left_out_tokens"] = sum(any(figures) for figures in run)
    result["random_precision_at_k"] = sum(bad_sample) / len(samples)
    return result


def top_entry(
    i: int, score: float, sample: ChatSample, audit: SampleAudit, name: str, figures: list[float], tokenizer: Any
) -> dict[str, Any]:
    """A top sample as the report shows it: index, score, whether it is corrupted, its response, its top token."""
    start = len(sample.prompt)
    values = figures[start:] if name == "run" else audit.suspicion[name][start:]
    worst = max(range(len(values)), key=lambda j: values[j])
    return {
        "index": i,
        "score": round(score, 3),
        "corrupted": any(sample.corrupted),
        "response": tokenizer.decode(sample.response, skip_special_tokens=True),
        "token": tokenizer.decode([sample.response[worst]]),
        "content_token": bool(getattr(sample, "content", None) and sample.content[worst]),
    }


def audit_regime(regime: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One regime of the real-model benchmark (or of the toy one, TOY) and seed: train with the record, audit."""
    if regime in TOY:
        return toy_regime(regime, seed, args)
    model, tokenizer = real_sft.load(real_sft.model_folder(args))
    task = real_sft.task_for(regime, tokenizer)
    samples = real_sft.training_data(task, regime, args, seed)
    lr = args.lr * task.LR_SCALE
    return recorded_audit(model, tokenizer, samples, (args.steps, args.batch, lr, seed), noisy_sft.lora(args))


def toy_regime(regime: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The toy benchmark's regime (benchmarks/noisy_sft.py, its default sizes): its base, then the same audit."""
    toy = noisy_sft.parse_args([*(TINY_TOY if args.tiny else []), "--base-cache", f"{args.runs_dir}/toy_bases"])
    name = TOY[regime]
    with tempfile.TemporaryDirectory(prefix="sstoken-audit-toy-") as tmp:
        noisy_sft.train_base(name, toy, tmp)
        model = noisy_sft.fresh(torch.load(f"{tmp}/base-{name}.pt"))
    samples, _ = noisy_sft.fine_tune_data(name, toy, seed)
    training = (toy.steps, toy.batch, toy.lr, seed)
    return recorded_audit(model, build_tokenizer(), samples, training, noisy_sft.lora(toy))


def recorded_audit(
    model: torch.nn.Module, tokenizer: Any, samples: list[Sample], training: tuple, lora: Any
) -> dict[str, Any]:
    """Train `model` on `samples` with the recommendation and its record on ((steps, batch, lr, seed) of
    `training`), then audit every training sample with the trained adapter; every signal measured."""
    steps, batch, lr, seed = training
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sstoken-audit-") as tmp:
        config = SSTokenConfig(**{**RECOMMENDED, "seed": seed, "audit_dir": f"{tmp}/record"})
        sft = noisy_sft.sft_args(f"{tmp}/out", steps, batch, lr, seed)
        rows = [s.row() for s in samples]
        trainer = noisy_sft.train(model, rows, sft, tokenizer, peft_config=lora, callbacks=[SSTokenCallback(config)])
        train_seconds = time.perf_counter() - t0
        run, judged = run_figures(Path(tmp) / "record", samples)
    t1 = time.perf_counter()
    audits = audit_training_set(trainer.model.eval(), samples, tokenizer.pad_token_id)
    result = measure(audits, run, samples, tokenizer)
    result["run_judged"] = judged
    subset = [audits[i] for i in judged], [run[i] for i in judged], [samples[i] for i in judged]
    result["run_judged_figures"] = measure(*subset, tokenizer)["signals"]["run"]
    result["run_judged_figures"].pop("top")  # its indices count within the judged samples
    result["run_judged_random_precision_at_k"] = sum(any(samples[i].corrupted) for i in judged) / max(len(judged), 1)
    result.update(train_seconds=train_seconds, audit_seconds=time.perf_counter() - t1)
    return result


# --- the results file and the tables --------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def figures(report: dict[str, Any], regime: str, name: str, key: str) -> list[float]:
    """A figure of one signal over the seeds of a regime ("run_judged": the run's record over the samples it judged,
    "random_judged": a random ranking of those)."""
    seeds = report["regimes"].get(regime, {}).values()
    if name == "random_judged":
        return [r["run_judged_random_precision_at_k"] for r in seeds if "run_judged_figures" in r]
    found = [
        r["run_judged_figures"] if name == "run_judged" else r["signals"][name]
        for r in seeds
        if name != "run_judged" or "run_judged_figures" in r
    ]
    return [f[key] for f in found if f.get(key) is not None]


def tables(report: dict[str, Any]) -> str:
    """Precision at k and token AUROC per noisy regime and signal (mean ± std over seeds), then the clean regimes'
    false alarms."""
    noisy = [r for r in NOISY if r in report["regimes"]]
    clean = [r for r in CLEAN if r in report["regimes"]]
    lines = ["| signal | " + " | ".join(f"{r}: P@k / token AUROC" for r in noisy) + " |"]
    lines.append("|---|" + "---|" * len(noisy))
    for name in SIGNALS:
        cells = [
            " / ".join(mean_std(figures(report, r, name, key)) for key in ("precision_at_k", "token_auroc"))
            for r in noisy
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    judged = [
        " / ".join(mean_std(figures(report, r, "run_judged", k)) for k in ("precision_at_k", "token_auroc"))
        for r in noisy
    ]
    lines.append("| run, over the samples it judged | " + " | ".join(judged) + " |")
    randoms = [mean_std([s["random_precision_at_k"] for s in report["regimes"][r].values()]) + " / 0.50" for r in noisy]
    lines.append("| random ranking | " + " | ".join(randoms) + " |")
    randoms = [mean_std(figures(report, r, "random_judged", "")) + " / 0.50" for r in noisy]
    lines.append("| random ranking of the judged samples | " + " | ".join(randoms) + " |")
    lines.append("| oracle | " + " | ".join("1.00 / 1.00" for _ in noisy) + " |")
    if clean:
        lines += ["", "| signal | " + " | ".join(f"{r}: share of samples above 3 nats" for r in clean) + " |"]
        lines.append("|---|" + "---|" * len(clean))
        for name in SIGNALS:
            lines.append(
                f"| {name} | "
                + " | ".join(mean_std(figures(report, r, name, "false_alarm_share")) for r in clean)
                + " |"
            )
    return "\n".join(lines)


SUMMARY_SIGNALS = {"surprise": "surprise (adapter)", "surprise_base": "surprise (base)", "run": "run's record"}


def summary_table(report: dict[str, Any]) -> str:
    """The README's table: per noisy regime, P@k / token AUROC of the main signals beside a random ranking's."""
    noisy = [r for r in NOISY if r in report["regimes"]]
    lines = ["| regime | " + " | ".join(SUMMARY_SIGNALS.values()) + " | random ranking |", "|---|---|---|---|---|"]
    for r in noisy:
        cells = [
            " / ".join(f"{statistics.fmean(v):.2f}" if (v := figures(report, r, name, key)) else "-" for key in KEYS)
            for name in SUMMARY_SIGNALS
        ]
        random_k = statistics.fmean(s["random_precision_at_k"] for s in report["regimes"][r].values())
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {random_k:.2f} / 0.50 |")
    return "\n".join(lines)


def false_alarm_table(report: dict[str, Any]) -> str:
    """Per signal and noisy regime: the share of the clean samples whose score passes 3 nats (mean ± std)."""
    noisy = [r for r in NOISY if r in report["regimes"]]
    lines = ["| signal | " + " | ".join(noisy) + " |", "|---|" + "---|" * len(noisy)]
    for name in SIGNALS:
        lines.append(
            f"| {name} | " + " | ".join(mean_std(figures(report, r, name, "false_alarm_share")) for r in noisy) + " |"
        )
    return "\n".join(lines)


KEYS = ("precision_at_k", "token_auroc")
BLOCKS = {
    "README.md": [("audit-summary", summary_table)],
    "docs/audit.md": [("audit-table", tables), ("audit-false-alarms", false_alarm_table)],
}


def write_blocks(report: dict[str, Any], root: Path = real_sft.ROOT) -> None:
    """Rewrite the generated tables of the README and of docs/audit.md from `report`."""
    for name, blocks in BLOCKS.items():
        path = root / name
        text = path.read_text(encoding="utf-8")
        for marker, render in blocks:
            start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
            head, rest = text.split(start, 1)
            text = head + start + render(report) + "\n" + end + rest.split(end, 1)[1]
        path.write_text(text, encoding="utf-8")


def block(name: str, marker: str) -> str:
    """A generated table as it stands in README.md or docs/audit.md."""
    text = (real_sft.ROOT / name).read_text(encoding="utf-8")
    return text.split(f"<!-- {marker}:start -->\n", 1)[1].split(f"\n<!-- {marker}:end -->", 1)[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"benchmark": "audit_quality", "regimes": {}}
    if args.report:
        print(tables(report))
        if args.write_docs:
            write_blocks(report)
        return report
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    real_sft.model_folder(args)
    report["settings"] = {k: getattr(args, k) for k in ("steps", "batch", "lr", "lora_r", "noise", "train", "tiny")}
    report["model"] = "tiny random LLaMA" if args.tiny else Path(real_sft.GGUF).name
    out.parent.mkdir(parents=True, exist_ok=True)
    for regime in args.regimes.split(","):
        for seed in args.seeds:
            random.seed(seed)
            result = audit_regime(regime, seed, args)
            report["regimes"].setdefault(regime, {})[str(seed)] = result
            out.write_text(json.dumps(report, indent=2))
            s = result["signals"]
            print(
                f"{regime} seed {seed}: P@k surprise {s['surprise']['precision_at_k']}, run "
                f"{s['run']['precision_at_k']}, token AUROC surprise {s['surprise']['token_auroc']}, "
                f"{result['train_seconds']:.0f} s training, {result['audit_seconds']:.0f} s audit",
                flush=True,
            )
    print(tables(report))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
