"""`sstoken-audit`: rank the samples of a data set, or of a training run, by how suspect the selection's signals
find them, and write `audit.jsonl` (all of them) and `audit.html` (the top ones).

    sstoken-audit --model MODEL [--adapter DIR] --data FILE --out_dir audit      # one pass over the data set
    accelerate launch -m sstoken_trl.audit.cli --model ... --data ...             # the same, over several processes
    sstoken-audit --record OUTPUT_DIR/audit --model MODEL --out_dir audit        # what a run's selection left out
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from trl import TrlParser

from sstoken_trl.audit.page import strongest, write_outputs
from sstoken_trl.audit.ranking import THRESHOLD, SampleAudit, rank_lines
from sstoken_trl.audit.run_record import rank_record
from sstoken_trl.audit.scan import audit_samples, write_part
from sstoken_trl.audit.signals import BASE_SIGNALS, HEAD_OUTPUTS, SIGNALS
from sstoken_trl.data.collator import POLICIES, SSTokenCollator
from sstoken_trl.data.spans import ASSISTANT_TAG, USER_TAG
from sstoken_trl.tools.arguments import exit_on_error, parse_checked
from sstoken_trl.tools.inspection import load_for_inspection
from sstoken_trl.tools.loading import load_data, load_tokenizer


@dataclass
class AuditArguments:
    """What to audit and where to write the ranking."""

    model: str = field(metadata={"help": "Base model: a hub id, a local folder or a .gguf file."})
    data: str | None = field(default=None, metadata={"help": "Samples: a .jsonl / .json / .csv / .parquet file."})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder (sstoken-train's output_dir)."})
    record: str | None = field(
        default=None, metadata={"help": "A run's record (SSTokenConfig.audit_dir): rank it instead of the data set."}
    )
    split: str = field(default="train", metadata={"help": "Dataset split to read."})
    out_dir: str = field(default="audit", metadata={"help": "Where audit.jsonl and audit.html are written."})
    signal: str | None = field(
        default=None,
        metadata={
            "help": "The signal that ranks; default surprise with --adapter, else surprise_base (the base model's).",
            "choices": list(SIGNALS),
        },
    )
    top: int = field(default=100, metadata={"help": "Samples shown on the page (the JSONL holds every sample)."})
    threshold: float = field(default=THRESHOLD, metadata={"help": "Suspicion (nats) above which a token is suspect."})
    batch_size: int = field(default=8, metadata={"help": "Samples per forward."})
    max_length: int | None = field(default=1024, metadata={"help": "Keep the first max_length tokens of a sample."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype.", "choices": ["bfloat16", "float32"]})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention implementation (sdpa, ...)."})
    user_tag: str = field(default=USER_TAG, metadata={"help": "User-turn tag of template-text samples."})
    assistant_tag: str = field(default=ASSISTANT_TAG, metadata={"help": "Assistant-turn tag of template text."})
    on_bad_sample: str = field(
        default="error", metadata={"help": "A sample with no response: stop, or skip it.", "choices": list(POLICIES)}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})


def audit_data(args: AuditArguments) -> tuple[Path, Path]:
    """One pass over the data set, this process's share of it; the main process merges the shares."""
    state = PartialState(cpu=not torch.cuda.is_available())  # without an accelerator, processes meet over gloo
    if args.data is None:
        raise ValueError("Name the samples to audit: --data FILE (or --record DIR for a run's record).")
    args.signal = args.signal or ("surprise" if args.adapter else "surprise_base")
    if args.signal not in BASE_SIGNALS and args.adapter is None:
        raise ValueError(
            f"--signal {args.signal} reads the adapted model: pass --adapter DIR, or --signal surprise_base."
        )
    data = load_data(args.data)
    if args.split not in data:
        raise ValueError(f"{args.data} has no split {args.split!r}; it has {sorted(data)}: pass --split.")
    rows = data[args.split]
    model, tokenizer = load_for_inspection(args, head_outputs=HEAD_OUTPUTS)
    collator = SSTokenCollator(tokenizer, args.user_tag, args.assistant_tag, args.max_length, args.on_bad_sample)
    parts = Path(args.out_dir) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    with state.split_between_processes(list(range(len(rows)))) as mine:
        samples = audit_samples(model, collator, rows, mine, args.signal, args.batch_size, state.is_main_process)
        write_part(samples, tokenizer, parts / f"part-{state.process_index}", args.top, args.threshold)
    state.wait_for_everyone()
    if not state.is_main_process:
        return Path(args.out_dir) / "audit.jsonl", Path(args.out_dir) / "audit.html"
    lines, top = [], []
    for rank in range(state.num_processes):
        part = parts / f"part-{rank}"
        lines += [json.loads(line) for line in part.with_suffix(".jsonl").open(encoding="utf-8")]
        top += [SampleAudit(**json.loads(line)) for line in part.with_suffix(".top.jsonl").open(encoding="utf-8")]
        part.with_suffix(".jsonl").unlink()
        part.with_suffix(".top.jsonl").unlink()
    parts.rmdir()
    top = sorted(top, key=lambda s: (-s.score(), s.index))[: args.top]
    source = args.model + (f" + {args.adapter}" if args.adapter else "")
    processes = "1 process" if state.num_processes == 1 else f"{state.num_processes} processes"
    about = (
        f"{len(lines)} samples of {args.data} under {source} ({processes}), ranked by "
        f"{args.signal} ({SIGNALS[args.signal]}): a sample's score is its most suspect token's, in nats; tokens "
        f"above {args.threshold:g} nats are highlighted. "
        f"The top {len(top)} are shown, every sample is in audit.jsonl. Hover a token for every signal's figure."
    )
    return write_outputs(rank_lines(lines), top, Path(args.out_dir), tokenizer, "Audit of the data set", about)


def audit_run(args: AuditArguments) -> tuple[Path, Path]:
    """The ranking of a run's record: how often and how strongly the selection left each sample's tokens out."""
    tokenizer = load_tokenizer(args.adapter or args.model, trust_remote_code=args.trust_remote_code)
    lines, top, about = rank_record(Path(args.record), tokenizer, args.top, args.threshold)
    return write_outputs(lines, top, Path(args.out_dir), tokenizer, "Audit of the training run", about)


def run_audit(argv: list[str] | None = None) -> tuple[Path, Path]:
    """The `sstoken-audit` command; returns the paths of the JSONL and the page."""
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = parse_checked(TrlParser((AuditArguments,), prog="sstoken-audit", allow_abbrev=False), argv)
    if args.top < 1 or args.batch_size < 1:
        raise ValueError(f"--top ({args.top}) and --batch_size ({args.batch_size}) must be at least 1.")
    jsonl, page = audit_run(args) if args.record else audit_data(args)
    if PartialState().is_main_process:
        print_top(jsonl)
        print(f"Every sample, ranked: {jsonl}\nThe top {args.top} with their suspect spans: {page}")
    return jsonl, page


def print_top(jsonl: Path, count: int = 5) -> None:
    """The first `count` samples of the ranking, one line each: index, score and suspect spans."""
    with jsonl.open(encoding="utf-8") as f:
        for rank, line in zip(range(1, count + 1), f, strict=False):
            record = json.loads(line)
            spans = ", ".join(f"{s['text']!r} ({s['value']:.1f})" for s in strongest(record["spans"])) or "none"
            score = "none" if record["score"] is None else f"{record['score']:.2f}"
            print(f"#{rank} sample {record['index']}: score {score}, suspect spans {spans}")


def main(argv: list[str] | None = None) -> None:
    """sstoken-audit: the ranked suspects of a data set or a run."""
    exit_on_error("sstoken-audit", run_audit, argv)


if __name__ == "__main__":
    main()
