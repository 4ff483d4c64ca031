"""The GPU acceptance check: everything ssToken must show on real hardware, in one command of at most 8 minutes.

    python -m benchmarks.gpu_check                 # one CUDA GPU (bf16)
    python -m benchmarks.gpu_check --dry-run       # every part at tiny size on CPU, a few tens of seconds

Parts, in order (each prints its rows as soon as it finishes; one that fails becomes an error row):
1. step cost on the LLaMA-3.1-8B shape, LoRA r 64, 4 x 2048, gradient checkpointing on: plain SFT, online
   ssToken, cached history, and the published path (eager + output_attentions); ratios to plain SFT, scoring
   share, history share; the targets of docs/performance.md.
2. score parity in the training dtype: the sdpa and eager backends against transformers' eager
   output_attentions on right-padded, left-padded and packed rows; which SDPA kernels the score ran.
3. QLoRA: 4-bit NF4 LLaMA-3.2-1B shape, plain QLoRA against ssToken with the 4-bit base as history.
4. padding-free packed batches: SDPA, and flash_attention_2 when flash-attn imports.
5. sharded: the recipe path (sstoken-train, loss truncation against run 1 as history model, fp32) alone and under
   `accelerate launch` with the shipped FSDP2 config on one process, then the ZeRO-3 config when deepspeed
   imports; the logged statistics, the last batch's selection and the saved adapter must match.
6. step cost with gradient checkpointing off (sft, online, cached), and on against off.
A time guard skips the parts that no longer fit, and stops the command (exit 124) at --time-limit, leaving
the rows done so far in the JSON, which is rewritten after every part.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import gpu_parts
from benchmarks.gpu_parts import PACKED, ROW_FIELDS, Sizes, error_row, guarded, row
from benchmarks.score_parity import run_parity
from benchmarks.step_cost import SHAPES
from benchmarks.step_report import machine

GPU = Sizes(
    shape=SHAPES["llama-8b"], small_shape=SHAPES["llama-1b"], batch=4, seq_len=2048, prompt_len=512, lora_r=64,
    steps=4, warmup=1, attention=dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    parity_tolerance=2e-2,
    sharded_model=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=False),
)  # fmt: skip
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)  # fmt: skip
DRY = Sizes(
    shape={"model": TINY_MODEL}, small_shape={"model": TINY_MODEL}, batch=2, seq_len=48, prompt_len=16, lora_r=4,
    steps=1, warmup=1, attention=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    parity_tolerance=1e-4, sharded_model=TINY_MODEL,
)  # fmt: skip
# Seconds allowed per part on an H200, estimated from the anchor figures (not yet measured): a part starts only
# if it fits in the time left.
BUDGET = {"step cost": 150, "score parity": 40, "qlora": 90, "padding-free": 60, "sharded": 90, "checkpointing off": 90}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every part at tiny size on CPU")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    p.add_argument("--time-limit", type=float, default=450.0, help="seconds after start-up; stops by then")
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    return p.parse_args(argv)


class Report:
    """Rows collected so far; printed part by part, written to JSON after each part."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out, self.header, self.rows = out, header, []
        self.lock = threading.Lock()

    def add(self, rows: list[dict[str, Any]]) -> None:
        with self.lock:
            self.rows.extend(rows)
            for r in rows:
                print(format_row(r), flush=True)
            self.write()

    def write(self, **extra: Any) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.header, **extra, "rows": self.rows}, indent=2, default=str))


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_row(r: dict[str, Any]) -> str:
    peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30
    cells = [r["part"], r["case"], r["status"], _num(r["step_s"], ".3f"), _num(r["time_ratio"], ".3f"),
             _num(peak, ".2f"), _num(r["peak_ratio"], ".3f"), r["detail"]]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


HEAD = "| part | case | status | step s | x ref | peak GiB | x ref | detail |\n|---|---|---|---|---|---|---|---|"


def run_part(report: Report, name: str, deadline: float, budget: float, fn: Callable[[], list[dict]]) -> None:
    """Run one part unless it no longer fits before the deadline; an exception becomes an error row."""
    left = deadline - time.monotonic()
    if left < budget:
        report.add([row(name, "-", "skipped", f"time guard: {left:.0f} s left, the part needs up to {budget:.0f} s")])
        return
    t0 = time.monotonic()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else None  # left over by earlier parts
    try:
        rows = fn()
    except Exception as err:  # one part's failure (out of memory, a missing kernel) must not lose the others
        rows = [error_row(name, "-", err)]
    for r in rows:
        r["part_seconds"], r["allocated_bytes_before"] = round(time.monotonic() - t0, 1), before
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    report.add(rows)


def watchdog(report: Report, limit: float) -> threading.Timer:
    """Stops the process at the time limit, after writing what is done: a hung kernel cannot hold the machine."""

    def stop() -> None:
        with report.lock:
            report.write(timed_out=f"stopped by the time guard after {limit:.0f} s")
        print(f"time guard: stopped after {limit:.0f} s; rows so far are in {report.out}", flush=True)
        os._exit(124)

    timer = threading.Timer(limit, stop)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here: run the check on a GPU machine, or `--dry-run` on CPU.")
    if device.type == "cpu":
        torch.set_num_threads(1)
    sizes = DRY if args.dry_run else GPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.monotonic()
    deadline = start + args.time_limit
    header = {"benchmark": "gpu_check", "dry_run": args.dry_run, "machine": machine(device), "row_fields": ROW_FIELDS}
    header["sizes"] = vars(sizes)
    report = Report(Path(args.out), header)
    timer = watchdog(report, args.time_limit)
    print(f"GPU acceptance check on {device} ({dtype}); {'dry run, tiny sizes' if args.dry_run else 'full sizes'}")
    print(HEAD, flush=True)
    measured: dict[str, dict] = {}

    def step_cost(on: bool) -> list[dict]:
        rows, measured["on" if on else "off"] = gpu_parts.step_cost(sizes, device, gc=on)
        return rows

    def checkpointing() -> list[dict]:
        rows = step_cost(False)
        return rows + gpu_parts.checkpointing_rows(measured.get("on", {}), measured["off"])

    def parity() -> list[dict]:
        return run_parity(sizes.attention, sizes.batch, sizes.seq_len, device, dtype, sizes.parity_tolerance)

    def padding_free() -> list[dict]:
        cases = ("sdpa", "flash_attention_2")
        return [guarded(PACKED, a, lambda a=a: gpu_parts.padding_free(sizes, device, a)) for a in cases]

    parts = [
        ("step cost", lambda: step_cost(True)),
        ("score parity", parity),
        ("qlora", lambda: gpu_parts.qlora(sizes, device)),
        ("padding-free", padding_free),
        ("sharded", lambda: gpu_parts.sharded(sizes, device)),
        ("checkpointing off", checkpointing),
    ]
    for name, fn in parts:
        budget = 0.0 if args.dry_run else BUDGET[name]
        run_part(report, name, deadline, budget, lambda fn=fn, name=name: label(name, fn()))
    timer.cancel()
    total = time.monotonic() - start
    report.write(seconds=round(total, 1))
    print(f"\n{HEAD}")
    for r in report.rows:
        print(format_row(r))
    print(f"done in {total:.0f} s; wrote {report.out}", flush=True)
    return {**header, "seconds": total, "rows": report.rows}


def label(part: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Name the part in rows that do not name one (score parity's)."""
    return [r if r.get("part") else {**dict.fromkeys(ROW_FIELDS), **r, "part": part} for r in rows]


if __name__ == "__main__":
    main(sys.argv[1:])
