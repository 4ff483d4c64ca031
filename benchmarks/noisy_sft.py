"""Selection quality on noisy / redundant SFT: which method learns the clean task, and which tokens it drops.

    python -m benchmarks.noisy_sft --workers 2            # 3 regimes x 3 seeds, every method
    python -m benchmarks.noisy_sft --regimes overconfident --seeds 0 --methods full,recommended

A small LLaMA-shaped model is first trained on clean `copy` / `reverse` instructions (the base). LoRA
fine-tuning then teaches `shift`. Regimes (`--regimes`):
  overconfident  the base is trained with plain cross-entropy, so it is confidently wrong on `shift`; a share
                 of answer letters is corrupted (substituted or inserted).
  calibrated     the same corrupted fine-tuning, but the base is trained with label smoothing 0.1, so it puts
                 no near-zero probability on any plausible token (closer to a pretrained LLM).
  redundant      no corruption; every response wraps the answer in uninformative filler phrases
                 ("sure here is the result : ... . hope this helps"), which the base also saw around its own
                 answers. Scored on the answer: exact match of the letters between `:` and `.`, and their loss.
Every method trains the same steps on the same data order with rho 0.6 (`--select-ratio`), except those that set
their own (the recommended configuration and the variants named rho0.8: 0.8): full SFT, uniform random, RHO-1
and TokenCleaning (reference: the base fine-tuned on a clean subset; `_self`: on the noisy training data itself,
plain SFT for the same steps, so two training runs), ssToken (paper-exact gamma 1 / 0.5 / 0, the variants,
`recommended_one_run`), loss truncation against the `self` reference as run 1 (`loss_truncation_self`, two training
runs, the previous recommendation), the recommended configuration (`recommended`: loss truncation in one run
against the model being trained, no history), the `self_trunc_*` variants of it, and the oracle: full SFT with
the corrupted (or filler) tokens' labels masked, the ceiling a selection could reach. `oracle_after_W` masks them
only from the share W of the steps on: the ceiling of a selection that trains every token for its first W of
training (a perfect detector after a warm-up of W).
`full_x2` is plain SFT for twice the steps: the equal-compute partner of a two-run method.
Reported per method, over seeds: held-out exact match (greedy) and loss on clean data, the share of corrupted
(filler), clean and </s> response tokens each method dropped, and the share of the full-to-oracle gap it closed;
then each method's total optimizer steps (its reference's training counted) beside full SFT (equal steps per run)
and beside the plain SFT run with at least as many steps (equal compute; TokenCleaning's scoring pass and the
per-step history forwards are not steps, their cost shows in train seconds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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

from benchmarks.noisy_report import compute_table, plot, summary, table
from benchmarks.noisy_task import (
    EOS,
    PAD,
    VOCAB,
    Sample,
    build_tokenizer,
    corrupt,
    greedy_exact_match,
    make_samples,
    oracle_row,
    teacher_forced,
)
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.config import RECOMMENDED, SOFT
from sstoken_trl.selection.token_cleaning import clean_tokens
from sstoken_trl.tools.tiny import build_model
from sstoken_trl.trl_internals import collate_owner

SHAPE = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CLIP_RANK_PROTECT = dict(his_loss_clip=1.0, rel_norm="rank", protect_response_end=True)  # the first recommendation
BATCH_THRESHOLD = dict(  # the step before the recommendation: no rel_keep_threshold
    gamma=1.0, scope="batch", rel_norm="none", his_loss_clip=1.0, protect_response_end=True, select_warmup_ratio=0.5
)
# An earlier recommendation, retired from the public API by the evidence: REL against the base, thresholded.
RECOMMENDED_ONE_RUN: dict[str, Any] = {
    "select_ratio": 0.8,
    "rel_keep_threshold": 0.0,
    "gamma": 1.0,
    "scope": "batch",
    "rel_norm": "none",
    "his_loss_clip": 1.0,
    "protect_response_end": True,
    "select_warmup_ratio": 0.5,
}
# A retired recommendation, loss truncation against run 1 (a plain-SFT run on the same data) as history_model.
LOSS_TRUNCATION_TWO_RUNS = dict(
    selector="loss_truncation", history="model", select_ratio=0.8, scope="batch", protect_response_end=True
)
# Loss truncation inside one run against the model being trained (no history): L_cur - H_cur > c nats.
SELF_TRUNCATION = dict(selector="self_truncation", select_ratio=0.8, scope="batch", protect_response_end=True)
METHODS: dict[str, dict[str, Any]] = {
    "full": dict(selector="full"),
    "dft": dict(selector="full"),  # TRL's own loss_type="dft", no callback (LOSS_TYPES)
    "entropy_weighted": dict(selector="entropy_weighted"),  # EAFT-like: each token's loss weighted by its entropy
    "full_x2": dict(selector="full"),  # plain SFT for twice the steps: the equal-compute partner of two runs
    "self_trunc_w0.1_c3": dict(SELF_TRUNCATION, select_warmup_ratio=0.1, surprise_nats=3.0),
    "self_trunc_w0.25_c3": dict(SELF_TRUNCATION, select_warmup_ratio=0.25, surprise_nats=3.0),
    "self_trunc_w0.25_c2": dict(SELF_TRUNCATION, select_warmup_ratio=0.25, surprise_nats=2.0),
    "random": dict(selector="random"),
    "rho1": dict(selector="rho1", history="model"),
    "rho1_self": dict(selector="rho1", history="model"),  # reference: the "self" one (two training runs)
    "sstoken_g1": dict(gamma=1.0),
    "sstoken_g0.5": dict(gamma=0.5),
    "sstoken_g0": dict(gamma=0.0),
    "sstoken_g0.5_attn_warmup0.2": dict(gamma=0.5, rel_warmup_ratio=0.2),  # the published code's warm-up
    "protect_g1": dict(gamma=1.0, protect_response_end=True),
    "protect_g0.5": dict(gamma=0.5, protect_response_end=True),
    "rank_protect_g0.5": dict(gamma=0.5, rel_norm="rank", protect_response_end=True),
    "clip_protect_g1": dict(gamma=1.0, his_loss_clip=1.0, protect_response_end=True),
    "clip_rank_protect_g0.5": dict(gamma=0.5, his_loss_clip=1.0, rel_norm="rank", protect_response_end=True),
    "ema_protect_g0.5": dict(gamma=0.5, history="ema", ema_alpha=0.99, protect_response_end=True),
    "snapshot_protect_g0.5": dict(
        gamma=0.5, history="ema", ema_alpha=0.0, ema_update_steps=25, protect_response_end=True
    ),
    "warmup_protect_g0.5": dict(gamma=0.5, rel_warmup_ratio=0.2, protect_response_end=True),
    "warm_base_g0.5": dict(gamma=0.5, select_warmup_ratio=0.2, rel_norm="rank", protect_response_end=True),
    "warm_snap_g0.5": dict(
        gamma=0.5, select_warmup_ratio=0.2, history="snapshot", rel_norm="rank", protect_response_end=True
    ),
    "warm_snap_g1": dict(gamma=1.0, select_warmup_ratio=0.2, history="snapshot", protect_response_end=True),
    # The steps to the recommendation: clip + rank + protection, then a selection warm-up (0.2 / 0.4 of the steps),
    # REL alone (gamma 1), one threshold over the micro-batch (scope batch, REL in nats), rho 0.8, warm-up 0.5, and
    # every token with REL >= 0 kept as well (rel_keep_threshold 0).
    "warm_clip_0.2_g0.5": dict(CLIP_RANK_PROTECT, select_warmup_ratio=0.2, gamma=0.5),
    "warm_clip_0.4_g0.5": dict(CLIP_RANK_PROTECT, select_warmup_ratio=0.4, gamma=0.5),
    "warm_clip_0.4_g1": dict(CLIP_RANK_PROTECT, select_warmup_ratio=0.4, gamma=1.0),
    "rec_rho0.8": dict(CLIP_RANK_PROTECT, select_warmup_ratio=0.4, gamma=1.0, select_ratio=0.8),
    "rec_batch": dict(BATCH_THRESHOLD, select_warmup_ratio=0.4, select_ratio=0.6),
    "rec_batch_w0.5": dict(BATCH_THRESHOLD, select_ratio=0.6),
    "rec_batch_rho0.8": dict(BATCH_THRESHOLD, select_warmup_ratio=0.4, select_ratio=0.8),
    "rec_batch_rho0.8_w0.5": dict(BATCH_THRESHOLD, select_ratio=0.8),
    "rec_keep0_rho0.6": dict(RECOMMENDED_ONE_RUN, select_ratio=0.6),
    "rec_keep0_w0.3": dict(RECOMMENDED_ONE_RUN, select_warmup_ratio=0.3),
    "recommended_one_run": dict(RECOMMENDED_ONE_RUN),  # REL against the base, thresholded (an earlier recommendation)
    "loss_truncation_self": dict(LOSS_TRUNCATION_TWO_RUNS),  # against the "self" reference: two runs (the previous one)
    "recommended": dict(RECOMMENDED),  # soft loss truncation in one run against the model being trained
    "hard_truncation": dict(RECOMMENDED, drop_weight=0.0),  # the previous recommendation: suspects dropped
    "sstoken_soft": dict(SOFT),  # soft ssToken: the paper's signals, what is being learned kept, the rest at half
    "rec_rho0.9": dict(RECOMMENDED_ONE_RUN, select_ratio=0.9),
    "rec_rho0.7": dict(RECOMMENDED_ONE_RUN, select_ratio=0.7),
    "rec_w0.4": dict(RECOMMENDED_ONE_RUN, select_warmup_ratio=0.4),
    "rec_w0.4_rho0.9": dict(RECOMMENDED_ONE_RUN, select_warmup_ratio=0.4, select_ratio=0.9),
    "token_cleaning": dict(selector="full"),  # on labels cleaned before training (clean reference)
    "token_cleaning_self": dict(selector="full"),  # the same with the "self" reference: two training runs
    "oracle": dict(selector="full"),  # on the oracle rows: corrupted / filler labels masked
    "oracle_after_0.2": dict(selector="full"),  # the oracle's masking from 20% of the steps on (OracleAfter)
    "oracle_after_0.3": dict(selector="full"),
    "oracle_after_0.5": dict(selector="full"),
}
ORACLE = "oracle"
# The reference model each method needs (train_reference): "clean" or "self".
REFERENCES = {
    "rho1": "clean",
    "rho1_self": "self",
    "token_cleaning": "clean",
    "token_cleaning_self": "self",
    "loss_truncation_self": "self",
}
# Peers that are plain TRL with another loss_type, trained without the ssToken callback.
LOSS_TYPES = {"dft": "dft"}
# Optimizer steps of a method's own run, in units of --steps (plain SFT at the compute of two runs).
STEPS_FACTOR = {"full_x2": 2}
ORACLE_AFTER = {name: float(name.rsplit("_", 1)[1]) for name in METHODS if name.startswith("oracle_after_")}
REGIMES = ("overconfident", "calibrated", "redundant")


def check_names(parser: argparse.ArgumentParser, args: argparse.Namespace, regimes: Any, methods: Any) -> None:
    """Stop with the known names when --regimes or --methods names one that is not."""
    for name, chosen, known in (("regimes", args.regimes, regimes), ("methods", args.methods, methods)):
        unknown = set(chosen.split(",")) - set(known)
        if unknown:
            parser.error(f"unknown {name} {sorted(unknown)}; choose from {list(known)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated subset of {','.join(REGIMES)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", type=float, default=0.3, help="chance that an answer letter is corrupted")
    p.add_argument("--select-ratio", type=float, default=0.6, help="rho of every selecting method that sets none")
    p.add_argument("--train", type=int, default=2000, help="fine-tuning samples")
    p.add_argument("--steps", type=int, default=250, help="fine-tuning optimizer steps of every method")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate (cosine schedule)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--base-steps", type=int, default=800, help="full training steps of the base on copy / reverse")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="of the base training, regime 'calibrated'")
    p.add_argument("--ref-share", type=float, default=0.1, help="share of the training prompts (clean) for RHO-1")
    p.add_argument("--ref-steps", type=int, default=150, help="steps of RHO-1's reference fine-tuning")
    p.add_argument("--eval", type=int, default=300, help="held-out clean samples")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--base-cache", help="folder that keeps trained bases between runs (reused when settings match)")
    p.add_argument("--workers", type=int, default=1, help="processes training methods / seeds in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--out", default="benchmarks/results/noisy_sft.json")
    args = p.parse_args(argv)
    check_names(p, args, REGIMES, METHODS)
    return args


def sft_args(
    out_dir: str, steps: int, batch: int, lr: float, seed: int, label_smoothing: float = 0.0, loss_type: str = "nll"
) -> SFTConfig:
    return SFTConfig(
        loss_type=loss_type,
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 20,
        weight_decay=0.0,
        label_smoothing_factor=label_smoothing,
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


def train(
    model: PreTrainedModel, rows: list[dict[str, list[int]]], args: SFTConfig, tokenizer: Any, **kwargs: Any
) -> SFTTrainer:
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **kwargs
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


class DropMeter(TrainerCallback):
    """Counts, from the callback's selection of every micro-batch, the corrupted / clean / </s> tokens dropped (or
    left out at `drop_weight`), and the clean content tokens (the informative ones, where a sample flags them) among
    the clean. Without a callback (a plain TRL run) nothing is dropped."""

    KINDS = ("corrupted", "clean", "eos", "content")

    def __init__(self, sstoken: SSTokenCallback | None, samples: list[Sample], pad: int = PAD, eos: int = EOS) -> None:
        self.sstoken, self.pad, self.eos = sstoken, pad, eos
        self.flags = {
            tuple(s.input_ids): (s.corrupted, getattr(s, "content", None) or [False] * len(s.corrupted))
            for s in samples
        }
        self.counts = {f"{kind}{part}": 0 for kind in self.KINDS for part in ("", "_dropped")}
        self._seen: object = None

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.read()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.read()

    def read(self) -> None:
        selection = None if self.sstoken is None else self.sstoken.last_selection
        if selection is None or selection is self._seen:
            return
        self._seen = selection
        kept = selection.keep
        drop_weight = self.sstoken.config.drop_weight
        if drop_weight > 0 and selection.weight is not None:  # left out at drop_weight counts as dropped
            kept = kept & (selection.weight != torch.tensor(drop_weight, dtype=selection.weight.dtype))
        for ids, keep in zip(selection.input_ids.tolist(), kept.tolist(), strict=True):
            while ids and ids[-1] == self.pad:
                ids.pop()
            flags, content = self.flags[tuple(ids)]
            start = len(ids) - len(flags)  # the first response token; target position start - 1 predicts it
            targets = zip(ids[start:], flags, content, keep[start - 1 : len(ids) - 1], strict=True)
            for token, corrupted, informative, kept in targets:
                kinds = ["corrupted" if corrupted else "clean"] + (["eos"] if token == self.eos else [])
                for kind in kinds + (["content"] if informative and not corrupted else []):
                    self.counts[kind] += 1
                    self.counts[f"{kind}_dropped"] += not kept

    def shares(self) -> dict[str, float]:
        c = self.counts
        out = {f"{kind}_dropped_share": c[f"{kind}_dropped"] / max(c[kind], 1) for kind in self.KINDS}
        out["corrupted_share_seen"] = c["corrupted"] / max(c["corrupted"] + c["clean"], 1)
        return out


class OracleAfter(TrainerCallback):
    """From optimizer step `start` on, masks the corrupted (filler) tokens' labels of every batch, as the oracle
    does from step 0: the best a selection that starts at `start` could do. Listed before the ssToken callback, so
    its loss budget counts the masked labels."""

    def __init__(self, samples: list[Sample], start: int) -> None:
        self.labels = {tuple(s.input_ids): oracle_row(s)["labels"] for s in samples}
        self.start, self.step = start, 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        owner = collate_owner(kwargs["train_dataloader"])
        collate = owner.collate_fn

        def masked(features: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(features)
            if self.step >= self.start:
                for row, ids in enumerate(batch["input_ids"].tolist()):
                    while ids and ids[-1] == PAD:
                        ids.pop()
                    batch["labels"][row, : len(ids)] = torch.tensor(self.labels[tuple(ids)])
            return batch

        owner.collate_fn = masked

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step


def evaluate(model: torch.nn.Module, held_out: list[Sample]) -> dict[str, float]:
    return {"accuracy": greedy_exact_match(model, held_out), **teacher_forced(model, held_out)}


def fresh(state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A new model holding the base weights (a deep copy would share TRL's fused-head closure with the base)."""
    model = build_model("llama", len(VOCAB), **SHAPE)
    model.load_state_dict(state)
    return model


def lora(args: argparse.Namespace) -> LoraConfig:
    alpha = getattr(args, "lora_alpha", None) or 2 * args.lora_r
    return LoraConfig(r=args.lora_r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM")


def fine_tune_data(regime: str, args: argparse.Namespace, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples as trained on, their clean versions) of one regime and seed."""
    rng = random.Random(seed)
    clean = make_samples(("shift",), args.train, rng, filler=regime == "redundant")
    if regime == "redundant":
        return clean, clean
    return [corrupt(s, args.noise, rng) for s in clean], clean


def held_out(regime: str, args: argparse.Namespace) -> dict[str, list[Sample]]:
    filler = regime == "redundant"
    held = {
        op: make_samples((op,), args.eval, random.Random(2000 + i), filler=filler)
        for i, op in enumerate(("copy", "reverse", "shift"))
    }
    return held


def train_base(regime: str, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """The base of a regime, saved to tmp; its held-out metrics."""
    base = build_model("llama", len(VOCAB), seed=0, **SHAPE)
    smoothing = args.label_smoothing if regime == "calibrated" else 0.0
    cached = Path(args.base_cache or tmp) / f"base-{regime}-{args.base_steps}-{smoothing}-{args.batch}.pt"
    if cached.is_file():
        base.load_state_dict(torch.load(cached))
    else:
        rows = make_samples(("copy", "reverse"), 4000, random.Random(1000), filler=regime == "redundant")
        sft = sft_args(f"{tmp}/base-{regime}", args.base_steps, args.batch, 3e-3, 0, smoothing)
        train(base, [s.row() for s in rows], sft, build_tokenizer())
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), cached)
    torch.save(base.state_dict(), f"{tmp}/base-{regime}.pt")
    return {op: evaluate(base, samples) for op, samples in held_out(regime, args).items()}


def train_reference(regime: str, args: argparse.Namespace, seed: int, tmp: str, kind: str) -> dict[str, float]:
    """A reference model, the base fine-tuned (plain SFT, LoRA merged) and saved to tmp. `kind` "clean": on a clean
    subset of the training prompts (RHO-1's, and TokenCleaning's fixed reference); "self": on the training data as
    given, noise included, for the same steps as every method (one round of self-evolving cleaning)."""
    rows, clean = fine_tune_data(regime, args, seed)
    data, steps = rows, args.steps
    if kind == "clean":
        data, steps = clean[: max(1, int(args.ref_share * len(clean)))], args.ref_steps
    sft = sft_args(f"{tmp}/reference-{regime}-{seed}-{kind}", steps, args.batch, args.lr, seed)
    state = torch.load(f"{tmp}/base-{regime}.pt")
    trainer = train(fresh(state), [s.row() for s in data], sft, build_tokenizer(), peft_config=lora(args))
    reference = trainer.model.merge_and_unload().eval()
    torch.save(reference.state_dict(), f"{tmp}/reference-{regime}-{seed}-{kind}.pt")
    return evaluate(reference, held_out(regime, args)["shift"])


def fine_tune(name: str, regime: str, args: argparse.Namespace, seed: int, tmp: str) -> dict[str, Any]:
    """LoRA on the regime's base with one method: held-out metrics and what it dropped."""
    rows, _ = fine_tune_data(regime, args, seed)
    config = SSTokenConfig(**{"select_ratio": args.select_ratio, **METHODS[name], "seed": seed})
    kind = REFERENCES.get(name)
    reference = fresh(torch.load(f"{tmp}/reference-{regime}-{seed}-{kind}.pt")) if kind else None
    data = [oracle_row(s) if name == ORACLE else s.row() for s in rows]
    if name.startswith("token_cleaning"):  # labels cleaned once before training, then plain SFT on them
        cleaned, _ = clean_tokens(
            Dataset.from_list(data),
            fresh(torch.load(f"{tmp}/base-{regime}.pt")),
            reference,
            args.select_ratio,
            batch_size=256,
        )
        data, reference = cleaned.to_list(), None
    sstoken = None if name in LOSS_TYPES else SSTokenCallback(config, history_model=reference)
    meter = DropMeter(sstoken, rows)
    callbacks: list[TrainerCallback] = [c for c in (sstoken, meter) if c is not None]
    if name in ORACLE_AFTER:
        callbacks.insert(0, OracleAfter(rows, round(ORACLE_AFTER[name] * args.steps)))
    t0 = time.perf_counter()
    steps = args.steps * STEPS_FACTOR.get(name, 1)
    sft = sft_args(
        f"{tmp}/{regime}-{seed}-{name}", steps, args.batch, args.lr, seed, loss_type=LOSS_TYPES.get(name, "nll")
    )
    base = fresh(torch.load(f"{tmp}/base-{regime}.pt"))
    trainer = train(base, data, sft, build_tokenizer(), peft_config=lora(args), callbacks=callbacks)
    seconds = time.perf_counter() - t0
    metrics = evaluate(trainer.model, held_out(regime, args)["shift"])
    corrupted = sum(sum(s.corrupted) for s in rows) / sum(len(s.corrupted) for s in rows)
    reference_steps = {"self": args.steps, "clean": args.ref_steps, None: 0}[kind]
    return {
        **metrics,
        **meter.shares(),
        "train_seconds": seconds,
        "corrupted_share": corrupted,
        "optimizer_steps": steps + reference_steps,  # the reference's (run 1's) steps counted
    }


def _job(task: tuple[str, tuple[Any, ...]]) -> Any:
    kind, job_args = task
    result = {"base": train_base, "reference": train_reference, "method": fine_tune}[kind](*job_args)
    if kind == "method":
        name, regime, _, seed, _ = job_args
        print(
            f"{regime} seed {seed} {name}: exact match {result['accuracy']:.3f}, clean loss "
            f"{result['clean_loss']:.3f}, </s> dropped {result['eos_dropped_share']:.2f}",
            flush=True,
        )
    return result


def _init(threads: int) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


def run_all(tasks: list[tuple[str, tuple[Any, ...]]], args: argparse.Namespace) -> list[Any]:
    """Run the tasks, in `args.workers` processes (each `args.threads` torch threads) or in this one."""
    if args.workers <= 1:
        _init(args.threads)
        return [_job(t) for t in tasks]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_init, initargs=(args.threads,)) as pool:
        return list(pool.imap(_job, tasks, chunksize=1))


def run(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    methods = [m for m in args.methods.split(",") if m]
    regimes = [r for r in args.regimes.split(",") if r]
    report: dict[str, Any] = {}
    bases = run_all([("base", (regime, args, tmp)) for regime in regimes], args)
    kinds = sorted({REFERENCES[m] for m in methods if m in REFERENCES})
    refs = {
        kind: run_all([("reference", (r, args, seed, tmp, kind)) for r in regimes for seed in args.seeds], args)
        for kind in kinds
    }
    jobs = [(r, seed, name) for r in regimes for seed in args.seeds for name in methods]
    results = iter(run_all([("method", (name, r, args, seed, tmp)) for r, seed, name in jobs], args))
    for i, regime in enumerate(regimes):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
        for _seed in args.seeds:
            for name in methods:
                runs[name].append(next(results))
        part = {"base": bases[i], "methods": {n: {"seeds": r, "summary": summary(r)} for n, r in runs.items()}}
        part["references"] = {kind: r[i * len(args.seeds) : (i + 1) * len(args.seeds)] for kind, r in refs.items()}
        part["corrupted_share_of_response_tokens"] = next(iter(runs.values()))[0]["corrupted_share"]
        report[regime] = part
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sstoken-noisy-") as tmp:
        regimes = run(args, tmp)
    report = {"benchmark": "noisy_sft", "settings": vars(args), "model": SHAPE, "regimes": regimes}
    report["wall_seconds"] = time.perf_counter() - start
    for regime, part in regimes.items():
        base = part["base"]
        refs = "; ".join(
            f"{kind} " + ", ".join(f"{r['accuracy']:.3f}" for r in runs) for kind, runs in part["references"].items()
        )
        print(
            f"\n## {regime}: {part['corrupted_share_of_response_tokens']:.1%} of response tokens corrupted (or "
            f"filler); base exact match copy {base['copy']['accuracy']:.3f}, reverse {base['reverse']['accuracy']:.3f}"
            f", shift {base['shift']['accuracy']:.3f}; reference exact match on shift: {refs or '-'}\n"
        )
        print(table(part["methods"], base["shift"]))
        print()
        print(compute_table(part["methods"]))
    print(
        f"\nrho {args.select_ratio}, {args.steps} steps x {args.batch}, seeds {args.seeds}; mean ± std over seeds; "
        "gap closed = (method - full) / (oracle - full)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    png = out.with_suffix(".png")
    drew = plot(regimes, png)
    print(f"wrote {out}" + (f" and {png}" if drew else " (no plot: pip install matplotlib)"))
    print(f"{report['wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
