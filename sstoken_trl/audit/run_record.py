"""The run's record: which tokens of which training sample the selection left out, at no extra forward.

`AuditRecorder` reads the selection the selective forward has just made on each micro-batch (SSTokenCallback
creates and calls it when `SSTokenConfig.audit_dir` is set). After the selection warm-up it appends, per sample of the
micro-batch, one line to `record-<process>.jsonl`: the optimizer step, the sample's index in the train data set, and
each left-out (or down-weighed) token's position and value; the first time a process meets a sample it adds the
sample's token ids and response positions. Lines go to disk at every micro-batch, so memory holds only the map from a
sample's tokens to its index. A sample is found by its tokens (a hash of its ids, looked up in the train data set
as the trainer holds it), which survives TRL's preparation, any collator and padding; exact duplicates are recorded
under the first of their indices. A resumed run drops the lines of the steps after its checkpoint and continues.

The value of a left-out token is the selection's score where that score is a suspicion in nats (the truncation
selectors: the recommendation's L_cur - H_cur); for the other selectors it is 1. `rank_record` ranks the samples:
a token's figure is its summed value over the times the sample was judged, divided by that number (how often and
how strongly), and a sample's score is its highest token's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from sstoken_trl.audit.ranking import SampleAudit, TopSamples, rank_lines

if TYPE_CHECKING:
    from sstoken_trl.integration.callback import SSTokenCallback

SUSPICION_SELECTORS = ("self_truncation", "loss_truncation")  # whose score is the token's suspicion in nats
META = "record.json"


def digest(ids: list[int]) -> bytes:
    return hashlib.blake2b(torch.tensor(ids, dtype=torch.int64).numpy().tobytes(), digest_size=12).digest()


def dataset_ids(dataset: Any, collate_fn: Any) -> Iterator[list[int]]:
    """The token ids of every row of the train data set as batches carry them: its `input_ids` column (TRL's
    prepared data, `pretokenize`), or what `SSTokenCollator` makes of each row."""
    if "input_ids" in dataset.column_names:
        yield from dataset["input_ids"]
        return
    finder, max_length = getattr(collate_fn, "finder", None), getattr(collate_fn, "max_length", None)
    if finder is None:
        raise ValueError(
            "The run's record finds a sample by its tokens, but the train data set has no input_ids column and its "
            "collator is not SSTokenCollator: pass pretokenize(dataset, tokenizer), or leave TRL to prepare it."
        )
    for row in dataset:
        try:
            ids = finder.encode(row).input_ids
        except ValueError:  # a bad sample trains nothing, so it is never recorded
            ids = []
        yield ids[:max_length] if max_length else ids


def runs(flags: list[bool]) -> list[list[int]]:
    """[start, end) of each run of True in `flags`."""
    out, start = [], None
    for j, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = j
        elif not flag and start is not None:
            out.append([start, j])
            start = None
    return out


class AuditRecorder:
    """Records what the selection of `sstoken` left out, micro-batch by micro-batch, into `audit_dir`."""

    def __init__(self, sstoken: SSTokenCallback, audit_dir: str | Path) -> None:
        self.sstoken, self.audit_dir = sstoken, Path(audit_dir)
        self.index: dict[bytes, int] = {}
        self.seen: set[int] = set()
        self.path: Path | None = None
        self._last: object = None

    def start(self, global_step: int) -> None:
        """At train start (fresh or resumed at `global_step`): the map from tokens to index, the record so far."""
        trainer = self.sstoken.trainer
        if getattr(trainer.args, "packing", False):
            raise ValueError(
                "The run's record needs each sample as a row of the train data set: train without packing."
            )
        self.index, rows = {}, 0
        for i, ids in enumerate(dataset_ids(trainer.train_dataset, self.sstoken._collate_fn)):
            self.index.setdefault(digest(list(ids)), i)
            rows += 1
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.audit_dir / f"record-{trainer.accelerator.process_index}.jsonl"
        self._resume(global_step)
        if trainer.accelerator.is_main_process:
            config = self.sstoken.config
            meta = {"selector": config.selector, "drop_weight": config.drop_weight, "samples": rows}
            (self.audit_dir / META).write_text(json.dumps(meta, indent=2))

    def _resume(self, step: int) -> None:
        """Keep the lines of the steps before `step` (those a resumed run has done), drop the rest."""
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.open(encoding="utf-8") if json.loads(line)["step"] < step]
        self.path.write_text("".join(kept), encoding="utf-8")
        self.seen = {json.loads(line)["index"] for line in kept}

    def read(self) -> None:
        """Append the lines of the micro-batch the selection has just judged (after the warm-up, once each)."""
        forward, selection = self.sstoken.selective_forward, self.sstoken.last_selection
        if selection is None or selection is self._last or forward.global_step < forward.select_warmup:
            return
        self._last = selection
        config = self.sstoken.config
        left_out = selection.response & ~selection.keep
        if selection.weight is not None and config.drop_weight > 0:
            left_out |= selection.response & (selection.weight == config.drop_weight)
        value = selection.score.float() if config.selector in SUSPICION_SELECTORS else torch.ones_like(selection.score)
        ids, real, doc = selection.input_ids.tolist(), selection.real.tolist(), selection.doc.tolist()
        response, left, values = selection.response.tolist(), left_out.tolist(), value.tolist()
        lines = []
        for row in range(len(ids)):
            for document in sorted({d for d, r in zip(doc[row], real[row], strict=True) if r}):
                positions = [j for j in range(len(ids[row])) if real[row][j] and doc[row][j] == document]
                index = self.index.get(digest([ids[row][j] for j in positions]))
                if index is None:
                    raise RuntimeError(
                        "A training sample's tokens match no row of the train data set, so the run's record cannot "
                        "name it: the data changed after the trainer prepared it (a collator that rewrites tokens?)."
                    )
                line = {"step": forward.global_step, "index": index, "left_out": []}
                for k, j in enumerate(positions[1:], 1):
                    if left[row][j - 1]:
                        line["left_out"].append([k, round(values[row][j - 1], 4)])
                if index not in self.seen:
                    self.seen.add(index)
                    line["ids"] = [ids[row][j] for j in positions]
                    line["response"] = runs([k > 0 and response[row][j - 1] for k, j in enumerate(positions)])
                lines.append(json.dumps(line) + "\n")
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(lines))


def record_lines(record_dir: Path) -> Iterator[dict[str, Any]]:
    files = sorted(record_dir.glob("record-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"No run record in {record_dir}: train with SSTokenConfig(audit_dir=...) first.")
    for path in files:
        for line in path.open(encoding="utf-8"):
            yield json.loads(line)


def token_values(record_dir: Path) -> dict[int, tuple[int, dict[int, float]]]:
    """Per sample index: (times judged, {token position: summed value of the times it was left out})."""
    out: dict[int, tuple[int, dict[int, float]]] = {}
    for line in record_lines(record_dir):
        judged, sums = out.get(line["index"], (0, {}))
        for position, value in line["left_out"]:
            sums[position] = sums.get(position, 0.0) + value
        out[line["index"]] = (judged + 1, sums)
    return out


def rank_record(
    record_dir: Path, tokenizer: PreTrainedTokenizerBase, top: int, threshold: float = 0.0
) -> tuple[list[dict[str, Any]], list[SampleAudit], str]:
    """(every judged sample's JSONL record, best first; the top `top` samples whole; what the page says about them).

    Spans are the tokens ever left out (`threshold` 0 on a token's mean value)."""
    if not (record_dir / META).is_file():
        raise FileNotFoundError(f"No run record in {record_dir}: train with SSTokenConfig(audit_dir=...) first.")
    meta = json.loads((record_dir / META).read_text())
    values = token_values(record_dir)
    scores = {i: max((s / judged for s in sums.values()), default=0.0) for i, (judged, sums) in values.items()}
    wanted = set(sorted(scores, key=lambda i: (-scores[i], i))[:top])
    best, lines = TopSamples(top), []
    for line in record_lines(record_dir):  # a second pass for the tokens, of every sample (spans) once
        if "ids" not in line:
            continue
        sample = audit_of(line, *values[line["index"]])
        lines.append(sample.line(tokenizer, threshold))
        if line["index"] in wanted:
            best.add(sample)
    shown = best.ranked()
    about = (
        f"{len(values)} training samples judged by the selection ({meta['selector']}) after its warm-up, of "
        f"{meta['samples']}; a token's figure is its value (the selection's suspicion in nats, or 1) summed over the "
        "times it was left out, over the times its sample was judged; a sample's score is its highest token's. "
        f"The top {len(shown)} are shown, every judged sample is in audit.jsonl."
    )
    return rank_lines(lines), shown, about


def audit_of(first: dict[str, Any], judged: int, sums: dict[int, float]) -> SampleAudit:
    """A sample's figures from its first record line (tokens and response runs) and its summed values."""
    figures = [math.nan] * len(first["ids"])
    for start, end in first["response"]:
        for j in range(start, end):
            figures[j] = sums.get(j, 0.0) / judged
    times = {"judged": judged}
    return SampleAudit(first["index"], first["ids"], {"run": figures}, "run", times)
