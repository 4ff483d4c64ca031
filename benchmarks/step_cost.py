"""Step cost of ssToken against plain TRL SFT: time per optimizer step and peak memory, in one process.

    python -m benchmarks.step_cost --shape tiny                                  # CPU
    python -m benchmarks.step_cost --shape llama-8b --device cuda --steps 10     # GPU, bf16

Variants (see benchmarks/variants.py) train the same shared LoRA model with one shared AdamW on the same
kind of batch, one step each in turn (sft, online, cached, output_attentions, sft, ...). Reported: median step
time and peak memory of each as a ratio to plain SFT, the scoring layer's own time, the history forward's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PrinterCallback
from trl import SFTConfig, SFTTrainer

from benchmarks.alternate import TurnCallback, return_freed_memory_to_os, run_alternating
from benchmarks.variants import CachedHistoryCollator, Instruments, OutputAttentionsTrainer
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tiny import build_tokenizer

LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False),
        batch=4, seq_len=256, prompt_len=64, lora_r=16,
    ),
    "llama-1b": dict(  # LLaMA-3.2-1B
        model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
        batch=4, seq_len=2048, prompt_len=512, lora_r=64,
    ),
    "llama-8b": dict(  # LLaMA-3.1-8B
        model=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
        batch=4, seq_len=2048, prompt_len=512, lora_r=64,
    ),
}  # fmt: skip
VARIANTS = ("sft", "online", "cached", "output_attentions")
BASELINE = "sft"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda trains in bf16)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the timed ones")
    p.add_argument("--batch", type=int, help="rows per step (default: the shape's)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the shape's)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per row (default: the shape's)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default: the shape's); alpha 16, all linear layers")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--select-ratio", type=float, default=0.6)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--out", default="benchmarks/results/step_cost_{shape}_{device}.json")
    return p.parse_args(argv)


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, lora_r: int) -> Any:
    """A random-initialised LLaMA of the shape with LoRA (r, alpha 16) on all linear layers, on `device`."""
    config = AutoConfig.for_model("llama", **LLAMA, **shape["model"], max_position_embeddings=max(4096, 2 * 2048))
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(0)
    with device:  # initialise on the device: an 8B model is minutes of CPU work otherwise
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def random_rows(n: int, seq_len: int, prompt_len: int, vocab_size: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (n, seq_len), generator=g)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


class Seat:
    """A variant's view of the shared model: the forward slot TRL's fused head lives in, the attention kernel."""

    def __init__(self, inner: PreTrainedModel, pristine: Any, attn_implementation: str) -> None:
        self.inner, self.pristine, self.forward = inner, pristine, pristine
        self.attn_implementation = attn_implementation

    def __call__(self, taking: bool) -> None:
        if taking:
            vars(self.inner)["forward"] = self.forward
            self.inner.set_attn_implementation(self.attn_implementation)
        else:
            self.forward = vars(self.inner)["forward"]
            vars(self.inner)["forward"] = self.pristine


def make_trainers(args: argparse.Namespace, model: Any, tokenizer: Any, dataset: Dataset, device: torch.device,
                  cache_dir: str) -> tuple[dict[str, SFTTrainer], dict[str, Instruments]]:  # fmt: skip
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if "output_attentions" in names and "cached" in names and names.index("cached") > names.index("output_attentions"):
        raise ValueError("'cached' must come before 'output_attentions': it builds the history cache both read.")
    cuda = device.type == "cuda"
    config = SFTConfig(
        output_dir=os.path.join(cache_dir, "out"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=1e-4,
        max_length=None, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=not cuda, bf16=cuda,
        gradient_checkpointing=args.gradient_checkpointing, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)  # shared: one set of Adam states for all
    sstoken = dict(select_ratio=args.select_ratio, gamma=args.gamma)
    trainers, instruments = {}, {}
    for name in names:
        common = dict(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        common["optimizers"] = (optimizer, None)
        if name == "sft":
            inst = Instruments(device)
            trainer = SFTTrainer(**common, callbacks=[inst])
        elif name in ("online", "cached"):
            history = dict(history="cache", history_cache_dir=os.path.join(cache_dir, "cache")) if name == "cached" else {}
            callback = SSTokenCallback(SSTokenConfig(**sstoken, **history))
            inst = Instruments(device, callback)
            trainer = SFTTrainer(**common, callbacks=[callback, inst])
        else:
            inst = Instruments(device)
            collator = CachedHistoryCollator(tokenizer.pad_token_id, os.path.join(cache_dir, "cache"))
            trainer = OutputAttentionsTrainer(
                **common, data_collator=collator, callbacks=[inst], sstoken=SSTokenConfig(**sstoken), score=inst.score
            )
        trainer.remove_callback(PrinterCallback)
        trainers[name], instruments[name] = trainer, inst
    return trainers, instruments


def summarise(turns: dict[str, TurnCallback], warmup: int) -> dict[str, dict[str, Any]]:
    """Median and spread per variant, and ratios to plain SFT paired by round (step i of each variant)."""
    timed = {name: t.records[warmup:] for name, t in turns.items()}
    base = timed.get(BASELINE, [])
    out: dict[str, dict[str, Any]] = {}
    for name, records in timed.items():
        if not records:
            out[name] = {"steps": 0}
            continue
        secs = [r.seconds for r in records]
        row: dict[str, Any] = {"steps": len(records), "step_s": spread(secs)}
        row["peak_bytes"] = max(r.peak_bytes for r in records)
        row["step_extra_bytes"] = max(r.peak_bytes - r.start_bytes for r in records)
        for key in ("score_s", "history_s", "collate_s"):
            row[key] = statistics.median(r.extra[key] for r in records)
        row["score_share_of_step"] = row["score_s"] / statistics.median(secs)
        if base:
            pairs = list(zip(records, base, strict=False))
            row["time_ratio"] = spread([r.seconds / b.seconds for r, b in pairs])
            row["history_ratio"] = spread([r.extra["history_s"] / b.seconds for r, b in pairs])
            row["peak_ratio"] = row["peak_bytes"] / max(b.peak_bytes for b in base)
            base_extra = max(b.peak_bytes - b.start_bytes for b in base)
            row["step_extra_ratio"] = row["step_extra_bytes"] / base_extra if base_extra > 0 else None
        out[name] = row
    return out


def spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}


def _range(s: dict[str, float] | None, digits: int = 3) -> str:
    return "-" if s is None else f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}, {s['q3']:.{digits}f}]"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: dict[str, dict[str, Any]], cuda: bool) -> str:
    """Markdown table; ratios are to plain SFT, time ratios paired by round: median [quartiles]."""
    mem = "peak allocated" if cuda else "peak RSS"
    head = (
        f"| variant | step s | x sft | {mem} | x sft | step's extra memory | x sft | scoring ms | scoring / step "
        "| history forward / sft step | collate ms |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, r in results.items():
        if not r.get("steps"):
            lines.append(f"| {name} | {r.get('error', 'no timed steps')} |" + " |" * 9)
            continue
        history = r.get("history_ratio")
        cells = [
            name,
            _range(r["step_s"]),
            _range(r.get("time_ratio")),
            f"{r['peak_bytes'] / 2**20:,.0f} MiB",
            _num(r.get("peak_ratio"), ".3f"),
            f"{r['step_extra_bytes'] / 2**20:,.0f} MiB",
            _num(r.get("step_extra_ratio"), ".3f"),
            f"{r['score_s'] * 1e3:.2f}",
            f"{100 * r['score_share_of_step']:.2f}%",
            _num(history["median"] if history else None, ".3f"),
            f"{r['collate_s'] * 1e3:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    info["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    import peft
    import transformers
    import trl

    info.update(transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    shape = SHAPES[args.shape]
    for key in ("batch", "seq_len", "prompt_len", "lora_r"):
        setattr(args, key, getattr(args, key) or shape[key])
    device = torch.device(args.device)
    if device.type == "cpu":
        return_freed_memory_to_os()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(shape, device, dtype, args.lora_r)
    tokenizer = build_tokenizer(["benchmark rows are random token ids"], vocab_size=300)
    rows = (args.warmup + args.steps) * args.batch
    dataset = random_rows(rows, args.seq_len, args.prompt_len, shape["model"]["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="sstoken-bench-") as tmp:
        trainers, instruments = make_trainers(args, model, tokenizer, dataset, device, tmp)
        inner = model.get_base_model()
        pristine = vars(inner)["forward"]
        turns = {}
        for name, trainer in trainers.items():
            attn = "eager" if name == "output_attentions" else "sdpa"
            turns[name] = TurnCallback(name, device, on_turn=Seat(inner, pristine, attn))
            turns[name].step_extras = instruments[name].take
            trainer.add_callback(turns[name])  # last: its step window encloses every other callback's step work
        errors = run_alternating(trainers, turns)
    results = summarise(turns, args.warmup)
    for name, err in errors.items():
        results[name]["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    report = {
        "benchmark": "step_cost",
        "shape": args.shape,
        "model": shape["model"],
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"dtype": str(dtype)},
        "machine": machine(device),
        "variants": results,
    }
    print(f"step cost, shape {args.shape}, {args.batch} x {args.seq_len} tokens ({args.prompt_len} prompt), "
          f"LoRA r {args.lora_r}, {dtype}, {device}; {args.steps} timed steps per variant after {args.warmup} warm-up")  # fmt: skip
    print(table(results, device.type == "cuda"))
    for name, err in errors.items():
        print(f"{name} failed: {results[name]['error']}")
    out = Path(args.out.format(shape=args.shape, device=device.type))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
