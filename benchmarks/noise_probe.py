"""When, during plain SFT, does each per-token signal tell corrupted response tokens from clean ones?

    python -m benchmarks.noise_probe --workers 2 --base-cache .bases
    python -m benchmarks.noise_probe --seeds 0 --at 0.3 0.5 --noise 0.1

Plain LoRA SFT on every token (the method `full` of benchmarks.noisy_sft, same task, bases and settings; every
option of `python -m benchmarks.noisy_sft` is accepted) in the corrupted regimes. At each share of the steps in
`--at`, every signal is computed on the first `--probe` training samples (as trained on, corruptions included) and
its AUROC printed: the chance that a random corrupted token scores above a random clean one (0.5: no information,
1: a perfect detector). `</s>` is left out (never corrupted). Signals, each oriented so that higher = more suspect:
  l_cur         L_cur, the current model's loss (what a selection after a warm-up mostly reads)
  neg_rel       -REL = L_cur - L_his, the paper's Eq. 3 against the base
  neg_rel_clip  the same with L_his clipped at log(vocab size) (his_loss_clip 1, the recommended REL)
  excess        L_cur - H_cur: surprise beyond the model's own entropy at that position
  margin        log p_max - log p_token: how far the token is from the model's first choice
  rise          L_cur now minus L_cur at the previous probe (the first probe: minus the base's loss)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from benchmarks import noisy_sft
from benchmarks.noisy_task import PAD, VOCAB, Sample, build_tokenizer

SIGNALS = ("l_cur", "neg_rel", "neg_rel_clip", "excess", "margin", "rise")
CORRUPTED_REGIMES = ("overconfident", "calibrated")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(this probe's arguments, the noisy_sft settings it trains with)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--at", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0])
    p.add_argument("--probe", type=int, default=600, help="training samples the signals are computed on")
    p.add_argument("--out", default="benchmarks/results/noise_probe.json")
    own, rest = p.parse_known_args(argv)
    if any(not 0 < share <= 1 for share in own.at):
        p.error(f"--at {own.at}: every share of the steps must be in (0, 1]")
    settings = noisy_sft.parse_args(["--regimes", ",".join(CORRUPTED_REGIMES), *rest])  # a given --regimes wins
    if "redundant" in settings.regimes.split(","):
        p.error("the probe reads corrupted tokens: choose --regimes among overconfident, calibrated")
    return own, settings


@torch.no_grad()
def token_stats(model: torch.nn.Module, samples: list[Sample], batch_size: int = 128) -> list[dict[str, torch.Tensor]]:
    """Per sample, over its response tokens but the last (</s>): loss, entropy and the best log-prob."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), width), PAD)
        for i, s in enumerate(chunk):
            ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        logp = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits.float().log_softmax(-1)
        for i, s in enumerate(chunk):
            first, last = len(s.prompt) - 1, len(s.input_ids) - 2  # target positions of the response but </s>
            lp, target = logp[i, first:last], ids[i, first + 1 : last + 1]
            out.append(
                {
                    "loss": -lp.gather(-1, target[:, None])[:, 0],
                    "entropy": -(lp.exp() * lp).sum(-1),
                    "best": lp.max(-1).values,
                }
            )
    model.train(was_training)
    return out


def signals(cur: list[dict[str, torch.Tensor]], base: list[dict[str, torch.Tensor]], before: torch.Tensor) -> dict:
    """Every signal over the probed tokens, flattened in sample order."""
    l_cur = torch.cat([c["loss"] for c in cur])
    l_his = torch.cat([b["loss"] for b in base])
    return {
        "l_cur": l_cur,
        "neg_rel": l_cur - l_his,
        "neg_rel_clip": l_cur - l_his.clamp(max=math.log(len(VOCAB))),
        "excess": l_cur - torch.cat([c["entropy"] for c in cur]),
        "margin": torch.cat([c["best"] for c in cur]) + l_cur,
        "rise": l_cur - before,
    }


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U over n_pos * n_neg)."""
    values, inverse = torch.unique(score.double(), return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(values)).double()
    mean_rank = torch.cumsum(counts, 0) - (counts - 1) / 2  # 1-based mean rank of each distinct value
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    rank_sum = mean_rank[inverse][positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class Probe(TrainerCallback):
    """At the chosen optimizer steps, the AUROC of every signal on the probed training samples."""

    def __init__(self, samples: list[Sample], base_stats: list[dict[str, torch.Tensor]], steps: dict[int, float]):
        self.samples, self.base_stats, self.steps = samples, base_stats, steps
        self.corrupted = torch.tensor([c for s in samples for c in s.corrupted[:-1]])
        self.before = torch.cat([b["loss"] for b in base_stats])
        self.auroc: dict[str, dict[str, float]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step not in self.steps:
            return
        values = signals(token_stats(model, self.samples), self.base_stats, self.before)
        self.before = values["l_cur"]
        share = f"{self.steps[state.global_step]:g}"
        self.auroc[share] = {name: auroc(value, self.corrupted) for name, value in values.items()}


def probe_run(job: tuple[str, int, argparse.Namespace, argparse.Namespace, str]) -> dict[str, dict[str, float]]:
    """Plain SFT of one regime and seed with the probe attached: {share of steps: {signal: AUROC}}."""
    regime, seed, own, args, tmp = job
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows, _ = noisy_sft.fine_tune_data(regime, args, seed)
    probed = rows[: own.probe]
    state = torch.load(f"{tmp}/base-{regime}.pt")
    steps = {max(1, round(share * args.steps)): share for share in own.at}
    probe = Probe(probed, token_stats(noisy_sft.fresh(state), probed), steps)
    sft = noisy_sft.sft_args(f"{tmp}/probe-{regime}-{seed}", args.steps, args.batch, args.lr, seed)
    model, data = noisy_sft.fresh(state), [s.row() for s in rows]
    noisy_sft.train(model, data, sft, build_tokenizer(), peft_config=noisy_sft.lora(args), callbacks=[probe])
    print(f"{regime} seed {seed}: " + ", ".join(f"{k} l_cur {v['l_cur']:.3f}" for k, v in probe.auroc.items()))
    return probe.auroc


def table(runs: list[dict[str, dict[str, float]]]) -> str:
    """Markdown: a row per signal, a column per share of the steps, mean ± std of the AUROC over seeds."""
    shares = list(runs[0])
    lines = ["| signal | " + " | ".join(f"at {s}" for s in shares) + " |", "|---|" + "---|" * len(shares)]
    for name in SIGNALS:
        cells = []
        for share in shares:
            values = [run[share][name] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    own, args = parse_args(argv)
    warnings.filterwarnings("ignore")
    regimes = args.regimes.split(",")
    with tempfile.TemporaryDirectory(prefix="sstoken-probe-") as tmp:
        for regime in regimes:
            noisy_sft.train_base(regime, args, tmp)
        jobs = [(regime, seed, own, args, tmp) for regime in regimes for seed in args.seeds]
        if args.workers > 1:
            with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
                runs = pool.map(probe_run, jobs, chunksize=1)
        else:
            runs = [probe_run(job) for job in jobs]
    report: dict[str, Any] = {"benchmark": "noise_probe", "settings": {**vars(args), **vars(own)}, "regimes": {}}
    for i, regime in enumerate(regimes):
        mine = runs[i * len(args.seeds) : (i + 1) * len(args.seeds)]
        report["regimes"][regime] = mine
        print(f"\n## {regime}: AUROC of corrupted vs clean response tokens, by share of the steps trained\n")
        print(table(mine))
    out = Path(own.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{args.noise:.0%} of letters corrupted, seeds {args.seeds}; wrote {out}")
    return report


if __name__ == "__main__":
    main()
