"""Scoring memory and time against sequence length: the sdpa AttnScore is O(T) per row.

    python -m benchmarks.score_scaling                      # CPU, T = 2k .. 32k, about 5 minutes on 2 cores
    python -m benchmarks.score_scaling --seq-lens 1024 2048 # a quick look

Each T runs in a fresh subprocess (one torch thread) on a small LLaMA (hidden 256, 2 layers, 8 query / 4 key-value
heads of 32, vocab 4096, LoRA r16, gradient checkpointing), one row of T tokens, 10% prompt. Memory is the peak
resident set above the resident set just before (Linux VmHWM, reset through /proc/self/clear_refs):
- scoring: the per-document fused score at the last layer from the q and k the training forward already holds
  (the default path); "with recompute": the hook's whole work when dropout inside the layer is active (q / k / v
  recomputed under no_grad up to the attention call, then the score);
- step: one training forward + backward through TRL's fused LM head (no scoring): the step's own extra memory, and
  the process's peak resident set during the step (weights, runtime and step together).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

DEFAULT_SEQ_LENS = [2048, 4096, 8192, 16384, 32768]
MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=4096,
    max_position_embeddings=65536,
    tie_word_embeddings=False,
)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _start() -> int:
    """Collect garbage, reset the peak resident set, return the resident set now."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss()


def _peak() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def measure(seq_len: int, with_step: bool) -> dict[str, float]:
    """Scoring and step extra memory (bytes) and time (s) for one row of `seq_len` tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from sstoken_trl.adapters import attention_modules
    from sstoken_trl.adapters.dispatch import record_attn_call
    from sstoken_trl.scoring.attn_score import attn_score_sdpa
    from sstoken_trl.scoring.hook import AttnScoreHook
    from sstoken_trl.scoring.layout import batch_layout

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **MODEL)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    add_fused_lm_head(base)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    input_ids = torch.randint(3, MODEL["vocab_size"], (1, seq_len))
    labels = input_ids.clone()
    labels[:, : seq_len // 10] = -100
    layout = batch_layout(labels, torch.ones_like(input_ids))

    attn = attention_modules(base)[-1]
    captured = {}
    grab = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        base.model(input_ids=input_ids, use_cache=False)
    grab.remove()
    hook = AttnScoreHook(attn, "sdpa")

    # Default path (no active dropout in the layer): the score reads q and k off the training forward's own call.
    calls = []
    with torch.no_grad():
        record_attn_call(attn, captured["args"], captured["kwargs"], calls.append)
    before = _start()
    start = time.perf_counter()
    score = attn_score_sdpa(calls[0], layout)
    score_time = time.perf_counter() - start
    score_memory = _peak() - before
    del score, calls

    # With active dropout (e.g. LoRA dropout) the hook recomputes q, k (and v) of the layer first.
    hook.always_recompute = True
    before = _start()
    start = time.perf_counter()
    hook.arm(layout)
    hook._pre_forward(attn, captured["args"], captured["kwargs"])
    hook.take()
    recompute_time = time.perf_counter() - start
    recompute_memory = _peak() - before
    hook.remove()
    captured.clear()
    row = dict(
        seq_len=seq_len,
        score_mib=score_memory / 2**20,
        score_s=score_time,
        recompute_mib=recompute_memory / 2**20,
        recompute_s=recompute_time,
        measured_step=with_step,
    )
    if not with_step:
        return row

    before = _start()
    start = time.perf_counter()
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True, use_cache=False)
    (-out.log_probs.sum() / out.label_mask.sum()).backward()
    step_time = time.perf_counter() - start
    peak = _peak()
    return row | dict(step_mib=(peak - before) / 2**20, step_peak_mib=peak / 2**20, step_s=step_time)


def table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| T | scoring extra MiB | bytes / token | scoring s | with recompute: MiB | s | step extra MiB | step s "
        "| scoring / step extra memory | with recompute | scoring / process peak |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_token = r["score_mib"] * 2**20 / r["seq_len"]
        mark = "" if r["measured_step"] else "~"
        step_s = f"{r['step_s']:.1f}" if r["measured_step"] else "-"
        peak_share = f"{100 * r['score_mib'] / r['step_peak_mib']:.2f}%" if r["measured_step"] else "-"
        lines.append(
            f"| {r['seq_len']} | {r['score_mib']:.1f} | {per_token:.0f} | {r['score_s']:.2f} | "
            f"{r['recompute_mib']:.1f} | {r['recompute_s']:.2f} | {mark}{r['step_mib']:.0f} | {step_s} | "
            f"{mark}{100 * r['score_mib'] / r['step_mib']:.2f}% | "
            f"{mark}{100 * r['recompute_mib'] / r['step_mib']:.2f}% | {peak_share} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=DEFAULT_SEQ_LENS, help="tokens per row, one run each")
    p.add_argument(
        "--step-max",
        type=int,
        default=8192,
        help="measure the training step only up to this T (its attention is quadratic in time on CPU); beyond, the "
        "step memory is extrapolated along the line through the last two measured T and marked ~",
    )
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.child <= args.step_max)))
        return
    rows = []
    for seq_len in args.seq_lens:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.score_scaling", "--child", str(seq_len)]
            + ["--step-max", str(args.step_max)],
            check=True,
            capture_output=True,
            text=True,
            # Every allocation over 64 KiB is its own mapping, returned on free: the resident set follows live memory.
            env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        if not row["measured_step"]:  # affine through the last two measured steps
            a, b = [r for r in rows if r["measured_step"]][-2:]
            slope = (b["step_mib"] - a["step_mib"]) / (b["seq_len"] - a["seq_len"])
            row["step_mib"] = b["step_mib"] + slope * (seq_len - b["seq_len"])
        rows.append(row)
        print(f"T={seq_len}: {json.dumps(row)}", file=sys.stderr)
    print(table(rows))
    slope = [r["score_mib"] / r["seq_len"] for r in rows]
    print(f"scoring MiB per token: min {min(slope):.2e}, max {max(slope):.2e} (linear in T when they agree)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
