"""Selection quality on a noisy SFT task: which method learns the clean task, and which tokens it drops.

    python -m benchmarks.noisy_sft              # CPU, 3 seeds: about 6 minutes on 2 cores

A small LLaMA-shaped model is first trained on clean `copy` / `reverse` instructions (the base). LoRA
fine-tuning then teaches `shift` on data where a known share of answer letters is corrupted (substituted or
inserted). Every method trains the same steps on the same data order with the same rho: full SFT, uniform
random, RHO-1 (reference: the base fine-tuned on a clean subset) and ssToken with gamma 1 / 0.5 / 0; full SFT
on the uncorrupted data is the ceiling. Reported per method, over seeds: held-out exact match (greedy) and
loss on clean data, and the share of corrupted, clean and </s> response tokens each method dropped.
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
from datasets import Dataset
from peft import LoraConfig
from transformers import PreTrainedModel, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from benchmarks.noisy_report import plot, summary, table
from benchmarks.noisy_task import (
    EOS,
    PAD,
    VOCAB,
    Sample,
    build_tokenizer,
    corrupt,
    greedy_exact_match,
    make_samples,
    teacher_forced,
)
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tools.tiny import build_model

SHAPE = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
METHODS: dict[str, dict[str, Any]] = {
    "full": dict(selector="full"),
    "random": dict(selector="random"),
    "rho1": dict(selector="rho1", history="model"),
    "sstoken_g1": dict(gamma=1.0),
    "sstoken_g0.5": dict(gamma=0.5),
    "sstoken_g0": dict(gamma=0.0),
}
CEILING = "full_clean"  # full SFT on the uncorrupted data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", type=float, default=0.3, help="chance that an answer letter is corrupted")
    p.add_argument("--select-ratio", type=float, default=0.6, help="rho of every selecting method")
    p.add_argument("--train", type=int, default=2000, help="fine-tuning samples")
    p.add_argument("--steps", type=int, default=250, help="fine-tuning optimizer steps of every method")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate (cosine schedule)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--base-steps", type=int, default=800, help="full training steps of the base on copy / reverse")
    p.add_argument("--ref-share", type=float, default=0.1, help="share of the training prompts (clean) for RHO-1")
    p.add_argument("--ref-steps", type=int, default=150, help="steps of RHO-1's reference fine-tuning")
    p.add_argument("--eval", type=int, default=300, help="held-out clean samples")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a shared machine)")
    p.add_argument("--out", default="benchmarks/results/noisy_sft.json")
    return p.parse_args(argv)


def sft_args(out_dir: str, steps: int, batch: int, lr: float, seed: int) -> SFTConfig:
    return SFTConfig(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 20,
        weight_decay=0.0,
        max_length=None,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
    )


def train(model: PreTrainedModel, rows: list[Sample], args: SFTConfig, tokenizer: Any, **kwargs: Any) -> SFTTrainer:
    dataset = Dataset.from_list([s.row() for s in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


class DropMeter(TrainerCallback):
    """Counts, from the callback's selection of every micro-batch, the corrupted / clean / </s> tokens dropped."""

    KINDS = ("corrupted", "clean", "eos")

    def __init__(self, sstoken: SSTokenCallback, samples: list[Sample]) -> None:
        self.sstoken = sstoken
        self.flags = {tuple(s.input_ids): s.corrupted for s in samples}
        self.counts = {f"{kind}{part}": 0 for kind in self.KINDS for part in ("", "_dropped")}
        self._seen: object = None

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.read()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.read()

    def read(self) -> None:
        selection = self.sstoken.last_selection
        if selection is None or selection is self._seen:
            return
        self._seen = selection
        for ids, keep in zip(selection.input_ids.tolist(), selection.keep.tolist(), strict=True):
            while ids and ids[-1] == PAD:
                ids.pop()
            flags = self.flags[tuple(ids)]
            start = len(ids) - len(flags)  # the first response token; target position start - 1 predicts it
            for token, corrupted, kept in zip(ids[start:], flags, keep[start - 1 : len(ids) - 1], strict=True):
                for kind in ["corrupted" if corrupted else "clean"] + (["eos"] if token == EOS else []):
                    self.counts[kind] += 1
                    self.counts[f"{kind}_dropped"] += not kept

    def shares(self) -> dict[str, float]:
        c = self.counts
        out = {f"{kind}_dropped_share": c[f"{kind}_dropped"] / max(c[kind], 1) for kind in self.KINDS}
        out["corrupted_share_seen"] = c["corrupted"] / max(c["corrupted"] + c["clean"], 1)
        return out


def evaluate(model: torch.nn.Module, held_out: list[Sample]) -> dict[str, float]:
    return {"accuracy": greedy_exact_match(model, held_out), **teacher_forced(model, held_out)}


def fresh(state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A new model holding the base weights (a deep copy would share TRL's fused-head closure with the base)."""
    model = build_model("llama", len(VOCAB), **SHAPE)
    model.load_state_dict(state)
    return model


def lora(args: argparse.Namespace) -> LoraConfig:
    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")


def fine_tune(
    name: str,
    base: dict[str, torch.Tensor],
    rows: list[Sample],
    held_out: list[Sample],
    args: argparse.Namespace,
    seed: int,
    tmp: str,
    reference: PreTrainedModel | None,
) -> dict[str, Any]:
    """LoRA on the base with one method: held-out metrics and what it dropped."""
    config = SSTokenConfig(select_ratio=args.select_ratio, seed=seed, **METHODS.get(name, METHODS["full"]))
    sstoken = SSTokenCallback(config, history_model=reference if config.history == "model" else None)
    meter = DropMeter(sstoken, rows)
    t0 = time.perf_counter()
    sft = sft_args(f"{tmp}/{name}", args.steps, args.batch, args.lr, seed)
    trainer = train(fresh(base), rows, sft, build_tokenizer(), peft_config=lora(args), callbacks=[sstoken, meter])
    seconds = time.perf_counter() - t0
    return {**evaluate(trainer.model, held_out), **meter.shares(), "train_seconds": seconds}


def train_reference(
    base: dict[str, torch.Tensor], rows: list[Sample], args: argparse.Namespace, seed: int, tmp: str
) -> PreTrainedModel:
    """RHO-1's reference: the base fine-tuned (plain SFT, LoRA merged) on clean samples."""
    sft = sft_args(f"{tmp}/reference", args.ref_steps, args.batch, args.lr, seed)
    trainer = train(fresh(base), rows, sft, build_tokenizer(), peft_config=lora(args))
    return trainer.model.merge_and_unload().eval()


def run(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    methods = [m for m in args.methods.split(",") if m]
    if set(methods) - set(METHODS):
        raise ValueError(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {list(METHODS)}")
    base = build_model("llama", len(VOCAB), seed=0, **SHAPE)
    base_rows = make_samples(("copy", "reverse"), 4000, random.Random(1000))
    train(base, base_rows, sft_args(f"{tmp}/base", args.base_steps, args.batch, 3e-3, 0), build_tokenizer())
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    held = {op: make_samples((op,), args.eval, random.Random(2000 + i)) for i, op in enumerate(("copy", "reverse"))}
    held["shift"] = make_samples(("shift",), args.eval, random.Random(2002))
    report: dict[str, Any] = {"base": {op: evaluate(base, samples) for op, samples in held.items()}}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*methods, CEILING]}
    report["rho1_reference"], corrupted = [], []
    for seed in args.seeds:
        rng = random.Random(seed)
        clean = make_samples(("shift",), args.train, rng)
        noisy = [corrupt(s, args.noise, rng) for s in clean]
        corrupted.append(sum(sum(s.corrupted) for s in noisy) / sum(len(s.corrupted) for s in noisy))
        reference = None
        if "rho1" in methods:
            subset = clean[: max(1, int(args.ref_share * len(clean)))]
            reference = train_reference(state, subset, args, seed, tmp)
            report["rho1_reference"].append(evaluate(reference, held["shift"]))
        for name in methods:
            runs[name].append(fine_tune(name, state, noisy, held["shift"], args, seed, tmp, reference))
            print(f"seed {seed} {name}: exact match {runs[name][-1]['accuracy']:.3f}", flush=True)
        runs[CEILING].append(fine_tune(CEILING, state, clean, held["shift"], args, seed, tmp, None))
    report["corrupted_share_of_response_tokens"] = sum(corrupted) / len(corrupted)
    report["methods"] = {name: {"seeds": r, "summary": summary(r)} for name, r in runs.items()}
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sstoken-noisy-") as tmp:
        report = {"benchmark": "noisy_sft", "settings": vars(args), "model": SHAPE, **run(args, tmp)}
    report["wall_seconds"] = time.perf_counter() - start
    base = report["base"]
    print(
        f"base: exact match copy {base['copy']['accuracy']:.3f}, reverse {base['reverse']['accuracy']:.3f}, "
        f"shift {base['shift']['accuracy']:.3f}; RHO-1 reference on shift: "
        + ", ".join(f"{r['accuracy']:.3f}" for r in report["rho1_reference"])
    )
    print(
        f"noisy SFT on shift: {report['corrupted_share_of_response_tokens']:.1%} of response tokens corrupted, "
        f"rho {args.select_ratio}, {args.steps} steps x {args.batch}, seeds {args.seeds}; mean ± std over seeds"
    )
    print(table(report["methods"], base["shift"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    png = out.with_suffix(".png")
    drew = plot(report["methods"], png)
    print(f"wrote {out}" + (f" and {png}" if drew else " (no plot: pip install matplotlib)"))
    print(f"{report['wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
