"""Why the paper-exact ssToken can collapse: the forgetting loop, step by step, on a real model.

    python -m benchmarks.forgetting_loop --workers 2         # about 12 minutes on 2 cores; JSON + PNG
    python -m benchmarks.forgetting_loop --methods sstoken_g0.5,full --steps 20

SmolLM2-135M-Instruct learns word reversal (benchmarks/real_task.py) where every reply opens with one fixed phrase,
"Sure! Here are the words in reverse order:", and 30% of the answer words are substituted (the setting where the
paper-exact selection was seen to break the task). Each method trains the same data; after every micro-batch the
selection is read back and, per kind of response token (the phrase, clean answer words, substituted words, the end
token), the share dropped, the mean REL = L_his - L_cur and the mean L_cur are recorded per optimizer step.

The loop it looks for: a token the fixed quota leaves out is not trained, so its REL stays low (or turns negative as
the adapter moves away from the base) and it is left out again; nothing in the paper's rule notices that a token it
stopped training is not being learned, or is being forgotten. Which tokens fall into it depends on what the adapter
learns first (a reply phrase the base predicts, `</s>`, or the answer words): the per-kind shares say which. A
left-out token that still weighs `drop_weight` in the loss (the ssToken variant) keeps being trained, so the loop
cannot close. Measured: docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from benchmarks import noisy_sft, real_sft
from benchmarks.real_task import WORDS as NOUNS
from benchmarks.real_task import ChatSample, Part, ReversalTask, question, reversed_answer
from sstoken_trl import SSTokenCallback, SSTokenConfig

PHRASE = "Sure! Here are the words in reverse order:"
KINDS = ("phrase", "answer", "substituted", "end")
METHODS = ("full", "sstoken_g0.5", "sstoken_soft")


def phrase_samples(task: ReversalTask, n: int, noise: float, rng: random.Random) -> list[ChatSample]:
    """Reversal samples whose replies open with PHRASE; each answer word substituted with probability `noise`."""
    out = []
    for _ in range(n):
        words = tuple(rng.sample(NOUNS, rng.randint(3, 5)))
        parts = [Part(PHRASE + " ", scored=False)]
        for i, word in enumerate(reversed(words)):
            bad = rng.random() < noise
            said = rng.choice([w for w in NOUNS if w not in words]) if bad else word
            parts += [Part(", ")] if i else []
            parts.append(Part(said, flagged=bad, content=True))
        parts.append(Part("."))
        out.append(task.sample(question(words), parts, words=words, expected=reversed_answer(words), check="filler"))
    return out


class LoopMeter(TrainerCallback):
    """Per optimizer step and kind of response token: tokens seen, dropped, summed REL and summed L_cur."""

    def __init__(self, sstoken: SSTokenCallback, samples: list[ChatSample], pad: int, phrase_tokens: int) -> None:
        self.sstoken, self.pad, self.phrase_tokens = sstoken, pad, phrase_tokens
        self.samples = {tuple(s.input_ids): s for s in samples}
        self.steps: list[dict[str, dict[str, float]]] = []
        self.current = self._empty()
        self._seen: object = None

    @staticmethod
    def _empty() -> dict[str, dict[str, float]]:
        return {kind: {"tokens": 0, "dropped": 0, "rel": 0.0, "loss": 0.0} for kind in KINDS}

    def kind(self, sample: ChatSample, i: int) -> str:
        if i == len(sample.response) - 1:
            return "end"
        if i < self.phrase_tokens:
            return "phrase"
        return "substituted" if sample.corrupted[i] else "answer"

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.read()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.read()
        self.steps.append(self.current)
        self.current = self._empty()

    def read(self) -> None:
        selection = self.sstoken.last_selection
        if selection is None or selection is self._seen:
            return
        self._seen = selection
        left_out = ~selection.keep  # dropped, or kept at the reduced weight drop_weight
        drop_weight = self.sstoken.config.drop_weight
        if drop_weight > 0 and selection.weight is not None:
            left_out |= selection.weight == torch.tensor(drop_weight, dtype=selection.weight.dtype)
        for b, ids in enumerate(selection.input_ids.tolist()):
            while ids and ids[-1] == self.pad:
                ids.pop()
            sample = self.samples[tuple(ids)]
            start = len(sample.prompt) - 1  # target position predicting the first response token
            for i in range(len(sample.response)):
                entry = self.current[self.kind(sample, i)]
                entry["tokens"] += 1
                entry["dropped"] += bool(left_out[b, start + i])
                entry["rel"] += float(selection.rel[b, start + i])
                entry["loss"] += float(selection.loss[b, start + i])


def method_config(name: str) -> SSTokenConfig:
    return SSTokenConfig(**real_sft.METHODS[name].config)


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    folder = real_sft.model_folder(args)
    model, tokenizer = real_sft.load(folder)
    task = ReversalTask(tokenizer)
    samples = phrase_samples(task, args.steps * args.batch, args.noise, random.Random(args.seed))
    held = phrase_samples(task, args.eval, 0.0, random.Random(10_000))
    phrase_tokens = len(tokenizer(PHRASE, add_special_tokens=False)["input_ids"])
    config = method_config(name)
    if config.selector == "full":
        config = SSTokenConfig(gamma=1.0, select_ratio=1.0)  # plain SFT with REL read back (every token kept)
    sstoken = SSTokenCallback(config)
    meter = LoopMeter(sstoken, samples, tokenizer.pad_token_id, phrase_tokens)
    with tempfile.TemporaryDirectory(prefix="sstoken-loop-") as tmp:
        sft = noisy_sft.sft_args(tmp, args.steps, args.batch, args.lr, args.seed)
        rows = [s.row() for s in samples]
        lora = noisy_sft.lora(args)
        trainer = noisy_sft.train(model, rows, sft, tokenizer, peft_config=lora, callbacks=[sstoken, meter])
    return {"steps": meter.steps, **real_sft.evaluate(trainer.model, tokenizer, held)}


def per_step(result: dict[str, Any], kind: str, key: str) -> list[float]:
    """Per optimizer step: the dropped share, or the mean of `key`, of the tokens of `kind`."""
    out = []
    for step in result["steps"]:
        entry = step[kind]
        out.append(entry[key] / max(entry["tokens"], 1))
    return out


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (
        ("answer", "dropped", "clean answer words left out"),
        ("substituted", "dropped", "substituted words left out"),
        ("phrase", "dropped", "reply phrase left out"),
        ("answer", "loss", "clean answer words: L_cur"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (kind, key, title) in zip(axes, panels, strict=True):
        for name, result in report["methods"].items():
            label = f"{name} (exact match {result['accuracy']:.2f})"
            ax.plot(range(1, len(result["steps"]) + 1), per_step(result, kind, key), label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def table(report: dict[str, Any]) -> str:
    """Per method: held-out exact match / clean loss, and per kind the dropped share in the first and last quarter."""
    kinds = " | ".join(f"{k} dropped (first / last quarter)" for k in KINDS)
    lines = [f"| method | exact match | clean loss | {kinds} |", "|---|---|---|" + "---|" * len(KINDS)]
    for name, result in report["methods"].items():
        cells = []
        for kind in KINDS:
            dropped = per_step(result, kind, "dropped")
            quarter = max(len(dropped) // 4, 1)
            first, last = sum(dropped[:quarter]) / quarter, sum(dropped[-quarter:]) / quarter
            cells.append(f"{first:.2f} / {last:.2f}")
        lines.append(f"| {name} | {result['accuracy']:.3f} | {result['clean_loss']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(real_sft.METHODS)}")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.3, help="share of answer words substituted")
    p.add_argument("--eval", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default=str(real_sft.ROOT / ".bases" / "real_sft_runs"), help="the tiny model (tests)")
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaMA with the real tokenizer (tests)")
    p.add_argument("--out", default="benchmarks/results/forgetting_loop.json")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(real_sft.METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    real_sft.model_folder(args)  # converted once, before any worker starts
    names = args.methods.split(",")
    if args.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            results = list(pool.map(run, names, [args] * len(names)))
    else:
        results = [run(name, args) for name in names]
    report = {"benchmark": "forgetting_loop", "settings": vars(args), "methods": dict(zip(names, results, strict=True))}
    report["wall_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    drew = plot(report, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if drew else " (no plot: pip install matplotlib)"))
    return report


if __name__ == "__main__":
    main()
