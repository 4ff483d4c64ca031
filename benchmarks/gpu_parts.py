"""The trained parts of the GPU acceptance check: step cost, QLoRA, padding-free with FlashAttention-2, sharded.

Step cost and QLoRA reuse the step-cost benchmark's alternation (benchmarks/alternate.py, variants.py): the
variants take real SFTTrainer steps in turn on one shared LoRA model. Padding-free runs are one SFTTrainer each,
timed step by step. The sharded part runs the recipe path (`sstoken-train` on a shipped recipe: run 1, plain SFT,
once; then run 2, loss truncation against run 1 as a separate history model) in a fresh process, once alone and
once under `accelerate launch` with
each shipped multi-GPU config on one process (FSDP2 still shards, gathers and reshards at world size 1), and
compares what they logged, selected and saved: `python -m benchmarks.gpu_parts sharded-worker OUT FLAGS...` is
that process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from benchmarks.alternate import MemoryProbe, synchronize
from benchmarks.step_cost import LLAMA, build_model, random_rows, run_variants
from benchmarks.step_report import targets
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tools.tiny import build_tokenizer

PACKED = "padding-free (packing)"
SHARDED = "sharded (accelerate, 1 process)"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llama-3.2-3b.yaml"
ENGINES = {  # case -> (shipped accelerate config, the module the engine needs)
    "FSDP2": (ROOT / "recipes" / "accelerate" / "fsdp-8gpu.yaml", "torch"),
    "DeepSpeed ZeRO-3": (ROOT / "recipes" / "accelerate" / "deepspeed-zero3-8gpu.yaml", "deepspeed"),
}
RUN_1 = ["--sstoken_recommended", "false", "--sstoken_selector", "full"]  # plain SFT: the reference of run 2
# Run 2: loss truncation against run 1, a separate history model, so the engines' history-model path is exercised.
RUN_2 = ["--sstoken_recommended", "false", "--sstoken_selector", "loss_truncation", "--sstoken_history", "model"]
RUN_2 += ["--sstoken_select_ratio", "0.8", "--sstoken_scope", "batch", "--sstoken_protect_response_end", "true"]
SHARDED_TOLERANCE = 1e-3  # fp32 on both sides: only the order of reductions differs
ROW_FIELDS = ("part", "case", "status", "step_s", "time_ratio", "peak_bytes", "peak_ratio", "detail")


def row(part: str, case: str, status: str, detail: str = "", **metrics: Any) -> dict[str, Any]:
    """One line of the acceptance table; every row has ROW_FIELDS (None where a part measures nothing)."""
    base = dict.fromkeys(ROW_FIELDS)
    return base | {"part": part, "case": case, "status": status, "detail": detail} | metrics


def error_row(part: str, case: str, err: BaseException) -> dict[str, Any]:
    """The row of a part or case that raised: the error's type, first line and where it was raised."""
    where = traceback.extract_tb(err.__traceback__)[-1]
    message = (str(err).splitlines() or [""])[0][:300]
    return row(part, case, "error", f"{type(err).__name__}: {message} ({Path(where.filename).name}:{where.lineno})")


def guarded(part: str, case: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn's row, or an error row: one case's failure must not lose the part's other cases."""
    try:
        return fn()
    except Exception as err:
        return error_row(part, case, err)


@dataclass
class Sizes:
    """Model shapes and batch sizes of one run of the check (the GPU sizes, or tiny ones for --dry-run)."""

    shape: dict[str, Any]  # step cost (step_cost.SHAPES entry)
    small_shape: dict[str, Any]  # QLoRA and padding-free
    batch: int
    seq_len: int
    prompt_len: int
    lora_r: int
    steps: int
    warmup: int
    attention: dict[str, int]  # attention shape of the score-parity model
    parity_tolerance: float
    sharded_model: dict[str, int]  # LLaMA shape of the sharded part (its vocabulary is the tokenizer's)


def tokenizer() -> Any:
    return build_tokenizer(["benchmark rows are random token ids"], vocab_size=300)


def alternate(model: Any, variants: list[str], sizes: Sizes, device: torch.device, gc: bool) -> dict[str, dict]:
    """Step-cost statistics of `variants` trained in turn on `model` (step_report.summarise, errors included)."""
    args = argparse.Namespace(
        variants=",".join(variants), warmup=sizes.warmup, steps=sizes.steps, batch=sizes.batch,
        gradient_checkpointing=gc, select_ratio=0.6, gamma=0.5,
    )  # fmt: skip
    vocab = model.get_base_model().config.vocab_size
    dataset = random_rows((sizes.warmup + sizes.steps) * sizes.batch, sizes.seq_len, sizes.prompt_len, vocab)
    return run_variants(args, model, tokenizer(), dataset, device)[0]


def variant_rows(part: str, results: dict[str, dict]) -> list[dict[str, Any]]:
    out = []
    for name, r in results.items():
        if "error" in r or not r.get("steps"):
            out.append(row(part, name, "error", r.get("error", "no timed steps")))
            continue
        detail = f"{r['steps']} steps"
        if r["score_s"]:
            detail += f"; scoring {100 * r['score_share_of_step']:.2f}% of the step"
        if r["history_s"]:
            detail += f"; history forward {r['history_ratio']['median']:.3f} of an sft step"
        out.append(
            row(part, name, "ok", detail, step_s=r["step_s"]["median"], time_ratio=r["time_ratio"]["median"],
                peak_bytes=r["peak_bytes"], peak_ratio=r["peak_ratio"], score_share=r["score_share_of_step"],
                history_ratio=r["history_ratio"]["median"] if r["history_s"] else None)
        )  # fmt: skip
    return out


def target_rows(part: str, results: dict[str, dict]) -> list[dict[str, Any]]:
    out = []
    for label, t in targets(results).items():
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "missed")
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        out.append(row(part, label, status, f"measured {value}, limit {t['limit']}", value=t["value"]))
    return out


def step_cost(sizes: Sizes, device: torch.device, gc: bool) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """Rows of the step-cost variants and the targets; with gradient checkpointing off, no output_attentions."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(sizes.shape, device, dtype, sizes.lora_r, sizes.seq_len)
    variants = ["sft", "online", "cached"] + (["output_attentions"] if gc else [])
    results = alternate(model, variants, sizes, device, gc)
    part = f"step cost, checkpointing {'on' if gc else 'off'}"
    return variant_rows(part, results) + target_rows(
        f"targets, checkpointing {'on' if gc else 'off'}", results
    ), results


def checkpointing_rows(on: dict[str, dict], off: dict[str, dict]) -> list[dict[str, Any]]:
    """Gradient checkpointing on against off, per variant measured both ways."""
    out = []
    for name in ("sft", "online", "cached"):
        a, b = on.get(name, {}), off.get(name, {})
        if not a.get("steps") or not b.get("steps"):
            out.append(row("gradient checkpointing", name, "error", "not measured both ways"))
            continue
        t, p = a["step_s"]["median"] / b["step_s"]["median"], a["peak_bytes"] / b["peak_bytes"]
        out.append(
            row("gradient checkpointing", name, "ok", f"on / off: step time {t:.3f}x, peak memory {p:.3f}x",
                step_s=a["step_s"]["median"], time_ratio=t, peak_bytes=a["peak_bytes"], peak_ratio=p)
        )  # fmt: skip
    return out


def qlora(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    """4-bit NF4 base + LoRA, gradient checkpointing on: plain QLoRA against ssToken with the 4-bit base as history."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return [row("qlora", "nf4", "not installed", "bitsandbytes is not installed")]
    from transformers import BitsAndBytesConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = AutoConfig.for_model("llama", **LLAMA, **sizes.small_shape["model"])
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    with tempfile.TemporaryDirectory(prefix="sstoken-qlora-") as tmp:
        torch.manual_seed(0)
        with device:
            AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(tmp)
        where = {"": device.index or 0} if device.type == "cuda" else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=nf4, device_map=where, dtype=dtype, attn_implementation="sdpa"
        )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(
        r=sizes.lora_r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    results = alternate(get_peft_model(model, lora), ["sft", "online", "recommended"], sizes, device, gc=True)
    rows = variant_rows("qlora", results)
    names = ("plain QLoRA", "ssToken, history = 4-bit base", "recommended (one run, no history)")
    for r, name in zip(rows, names, strict=True):
        r["case"] = name
    return rows


class StepTimer(TrainerCallback):
    """Seconds and peak memory of each optimizer step (on_step_begin to on_step_end)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.probe = device, MemoryProbe(device)
        self.seconds: list[float] = []
        self.peaks: list[int] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        synchronize(self.device)
        self.probe.start()
        self.t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self.t0)
        self.peaks.append(self.probe.peak())


def packed_rows(n: int, seq_len: int, vocab: int) -> Dataset:
    """Samples of 1/8 to 1/2 of seq_len tokens, the first quarter prompt: packing puts several in a row."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length = int(torch.randint(seq_len // 8, seq_len // 2 + 1, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 4) + ids[length // 4 :]})
    return Dataset.from_list(rows)


def padding_free(sizes: Sizes, device: torch.device, attn_implementation: str, gc: bool = True) -> dict[str, Any]:
    """ssToken on packed, padding-free batches (TRL packing, BFD) with the given training attention."""
    part, case = PACKED, attn_implementation
    if attn_implementation.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
        return row(part, case, "not installed", "flash-attn is not installed (pip install flash-attn)")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(sizes.small_shape, device, dtype, sizes.lora_r, sizes.seq_len)
    model.get_base_model().set_attn_implementation(attn_implementation)
    steps = sizes.warmup + sizes.steps
    dataset = packed_rows(6 * steps * sizes.batch, sizes.seq_len, model.get_base_model().config.vocab_size)
    timer = StepTimer(device)
    with tempfile.TemporaryDirectory(prefix="sstoken-packed-") as tmp:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=str(Path(tmp) / "out"), max_steps=steps, per_device_train_batch_size=sizes.batch,
                learning_rate=1e-4, packing=True, max_length=sizes.seq_len, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=not cuda, bf16=cuda, gradient_checkpointing=gc, disable_tqdm=True, seed=0,
            ),
            train_dataset=dataset,
            processing_class=tokenizer(),
            callbacks=[SSTokenCallback(SSTokenConfig()), timer],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    logs = [log for log in trainer.state.log_history if "sstoken/selected_fraction" in log]
    fraction = statistics.mean(log["sstoken/selected_fraction"] for log in logs)
    timed = timer.seconds[sizes.warmup :] or timer.seconds
    detail = f"{len(timed)} steps of {sizes.batch} packed rows x {sizes.seq_len}; selected fraction {fraction:.3f}"
    return row(part, case, "ok", detail, step_s=statistics.median(timed), peak_bytes=max(timer.peaks),
               selected_fraction=fraction)  # fmt: skip


def sharded_flags(sizes: Sizes, device: torch.device, folder: Path) -> list[str]:
    """`sstoken-train` flags over the shipped recipe: a saved random LLaMA, random prompt/completion data, fp32, a
    few steps; LoRA dropout 0 so that both runs draw nothing at random."""
    tok = tokenizer()
    config = AutoConfig.for_model("llama", **{**LLAMA, **sizes.sharded_model, "vocab_size": len(tok)})
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def text(n: int) -> str:
        return "".join(letters[i] for i in torch.randint(0, 26, (n,), generator=g).tolist())

    rows = [{"prompt": text(sizes.seq_len // 5), "completion": " " + text(sizes.seq_len // 2)}
            for _ in range(sizes.steps * sizes.batch)]  # fmt: skip
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        "--config", str(RECIPE), "--model_name_or_path", str(folder / "base"),
        "--dataset_name", str(folder / "train.jsonl"), "--dtype", "float32", "--bf16", "false",
        "--max_steps", str(sizes.steps), "--per_device_train_batch_size", str(sizes.batch),
        "--gradient_accumulation_steps", "1", "--max_length", str(sizes.seq_len), "--logging_steps", "1",
        "--lora_r", str(sizes.lora_r), "--lora_dropout", "0.0", "--use_cpu", str(device.type == "cpu").lower(),
        "--disable_tqdm", "true",
    ]  # fmt: skip


def sharded_record(flags: list[str]) -> dict[str, Any]:
    """Train the recipe with `flags` (under whatever launcher started this process): what to compare."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from sstoken_trl.tools.arguments import parse_recipe
    from sstoken_trl.tools.cli import train

    trainer = train(parse_recipe(flags))
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SSTokenCallback))
    s, model = callback.last_selection, getattr(callback.history, "model", None)  # None: no history model
    logs = [
        {k: v for k, v in log.items() if k == "loss" or k.startswith("sstoken/")}
        for log in trainer.state.log_history if "sstoken/selected_fraction" in log
    ]  # fmt: skip
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "trained_sharded": any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in trainer.model.parameters()),
        "history": type(model).__name__,
        "history_sharded": isinstance(model, FSDPModule) or type(model).__name__ == "DeepSpeedEngine",
        "logs": logs,
        "keep": s.keep[s.response].tolist(),
        "rel": s.rel[s.response].tolist(),
        "attn_score": s.attn_score[s.response].tolist(),
        "adapter": str(Path(trainer.args.output_dir) / "adapter_model.safetensors"),
    }


def launch_worker(launcher: list[str], flags: list[str], folder: Path) -> dict[str, Any]:
    """sharded_record in a fresh process under `launcher` (`accelerate launch ...`)."""
    out = folder / "record.json"
    cmd = [*launcher, "-m", "benchmarks.gpu_parts", "sharded-worker", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
        raise RuntimeError(f"exit {done.returncode}: {(errors or ['no error line'])[-1].strip()[:400]}")
    return json.loads(out.read_text())


def _max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def compare_sharded(case: str, plain: dict[str, Any], sharded: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One row: the sharded run against the plain one (logged statistics, last batch's selection, saved adapter)."""
    from safetensors.torch import load_file

    keys = sorted(plain["logs"][0]) if plain["logs"] else []
    log_diff = max(
        (abs(a[k] - b[k]) / max(abs(a[k]), 1e-6) for a, b in zip(plain["logs"], sharded["logs"], strict=True)
         for k in keys), default=0.0,
    )  # fmt: skip
    agree = sum(x == y for x, y in zip(plain["keep"], sharded["keep"], strict=True)) / max(len(plain["keep"]), 1)
    ref, got = load_file(plain["adapter"]), load_file(sharded["adapter"])
    adapter_diff = max(float((ref[n] - got[n]).abs().max()) for n in ref) if ref.keys() == got.keys() else None
    metrics = dict(
        distributed_type=sharded["distributed_type"], log_rel_diff=log_diff, keep_agreement=agree,
        rel_max_diff=_max_diff(plain["rel"], sharded["rel"]),
        attn_score_max_diff=_max_diff(plain["attn_score"], sharded["attn_score"]), adapter_max_diff=adapter_diff,
        trained_sharded=sharded["trained_sharded"], history=sharded["history"],
        history_sharded=sharded["history_sharded"], steps=len(sharded["logs"]),
    )  # fmt: skip
    detail = (
        f"{sharded['distributed_type']}, {len(sharded['logs'])} steps of run 2 (run 1 trained the same way); "
        f"logged stats rel. diff {log_diff:.1e}, last batch kept-token agreement {agree:.4f}, REL max diff "
        f"{metrics['rel_max_diff']:.1e}, AttnScore {metrics['attn_score_max_diff']:.1e}, adapter max diff "
        f"{adapter_diff if adapter_diff is None else format(adapter_diff, '.1e')}; history model "
        f"{sharded['history']}, sharded {sharded['history_sharded']}"
    )
    engaged = sharded["trained_sharded"] and sharded["history_sharded"]
    if not engaged:
        return row(SHARDED, case, "not sharded", f"the engine did not shard here: {detail}", **metrics)
    tol = SHARDED_TOLERANCE
    same = (len(plain["logs"]) == len(sharded["logs"]) and log_diff <= tol and agree >= 1 - tol
            and adapter_diff is not None and adapter_diff <= tol)  # fmt: skip
    return row(SHARDED, case, "ok" if same else "fail", detail, step_s=seconds, **metrics)


def sharded(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    """The recipe path alone, then under each shipped accelerate config on one process; one row per engine."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="sstoken-sharded-") as tmp:
        folder = Path(tmp)
        flags = sharded_flags(sizes, device, folder)
        sharded_record([*flags, *RUN_1, "--output_dir", str(folder / "run1")])  # run 1 once, this process
        flags += [*RUN_2, "--sstoken_history_model", str(folder / "run1")]
        plain = sharded_record([*flags, "--output_dir", str(folder / "plain")])  # this process, no engine
        for case, (config, module) in ENGINES.items():
            if importlib.util.find_spec(module) is None:
                rows.append(row(SHARDED, case, "not installed", f"{module} is not installed (pip install {module})"))
                continue
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
            launcher += ["--num_processes", "1", "--mixed_precision", "no"]

            def run(case: str = case, launcher: list[str] = launcher) -> dict:
                t0 = time.monotonic()
                out = folder / case.replace(" ", "_")
                record = launch_worker(launcher, [*flags, "--output_dir", str(out)], out)
                return compare_sharded(case, plain, record, time.monotonic() - t0)

            rows.append(guarded(SHARDED, case, run))
    return rows


if __name__ == "__main__" and sys.argv[1:2] == ["sharded-worker"]:
    record = sharded_record(sys.argv[3:])
    Path(sys.argv[2]).write_text(json.dumps(record))  # one process: world size 1 under every launcher here
