"""One pass over a data set: every sample's per-token suspicion, batched, this process's share of the samples.

Samples are collated by `SSTokenCollator` (template text, messages or prompt/completion, as in training), scored by
`signals.token_suspicion` and turned into `SampleAudit`s; each sample's JSONL record is written as soon as its batch
is done, and only the top samples are kept whole (`TopSamples`), so memory does not grow with the data set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sstoken_trl.audit.ranking import THRESHOLD, SampleAudit, TopSamples
from sstoken_trl.audit.signals import token_suspicion
from sstoken_trl.data.collator import SSTokenCollator


def audit_batch(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], indices: Sequence[int], signal: str
) -> list[SampleAudit]:
    """The samples of one padded batch (row i is sample `indices[i]`), with every available signal."""
    device = next(model.parameters()).device
    values, response = token_suspicion(model, {k: v.to(device) for k, v in batch.items()})
    if signal not in values:
        raise ValueError(f"Signal {signal!r} is not available here; choose one of {', '.join(values)}.")
    real = batch["attention_mask"].bool()
    out = []
    for row, index in enumerate(indices):
        positions = real[row].nonzero().flatten().tolist()
        ids = batch["input_ids"][row, positions].tolist()
        scored = response[row].tolist()
        suspicion = {}
        for name, tensor in values.items():
            per_target = tensor[row].tolist()  # target j - 1 scores token j; the first token is never scored
            suspicion[name] = [per_target[j - 1] if j and scored[j - 1] else math.nan for j in positions]
        out.append(SampleAudit(index, ids, suspicion, signal))
    return out


def audit_samples(
    model: torch.nn.Module,
    collator: SSTokenCollator,
    rows: Any,
    indices: Sequence[int],
    signal: str,
    batch_size: int = 8,
    progress: bool = True,
) -> Iterator[SampleAudit]:
    """Every sample of `rows` named by `indices`, audited in batches of `batch_size`, in order."""
    model.eval()
    with tqdm(total=len(indices), desc="audit", unit="sample", disable=not progress) as bar:
        for start in range(0, len(indices), batch_size):
            chunk = list(indices[start : start + batch_size])
            batch = collator([rows[i] for i in chunk])
            yield from audit_batch(model, batch, chunk, signal)
            bar.update(len(chunk))


def write_part(
    samples: Iterator[SampleAudit],
    tokenizer: PreTrainedTokenizerBase,
    part: Path,
    top: int,
    threshold: float = THRESHOLD,
) -> None:
    """Each sample's record into `part`.jsonl as it comes, and the top `top` samples whole into `part`.top.jsonl."""
    best = TopSamples(top)
    with part.with_suffix(".jsonl").open("w", encoding="utf-8") as records:
        for sample in samples:
            records.write(json.dumps(sample.line(tokenizer, threshold)) + "\n")
            best.add(sample)
    with part.with_suffix(".top.jsonl").open("w", encoding="utf-8") as whole:
        for sample in best.ranked():
            whole.write(json.dumps(vars(sample)) + "\n")
