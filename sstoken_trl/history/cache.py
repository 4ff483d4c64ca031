"""history="cache": the base model's per-token losses, computed once over the training set and kept on disk.

A sample is what the selection calls one: the real tokens of a padded row, or one document of a padding-free
(packed) row. Its losses L_base(x_{t+1} | x<=t) at all of its target positions are stored under a hash of its
token ids, so shuffling, packing and label masking do not matter. The folder holds numpy files, read
memory-mapped and never pickled:
    manifest.json  format, base-model and tokenizer fingerprints, counts
    keys.npy       (N,) uint64, sorted sample keys
    offsets.npy    (N + 1,) int64: sample i's losses are losses[offsets[i]:offsets[i + 1]]
    losses.npy     (M,) float32
Training then needs no history forward: the collate function looks the batch up and the losses ride in the
batch under CACHED_LOG_PROBS, as log-probs on target positions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import Trainer

from sstoken_trl.data.spans import IGNORE_INDEX
from sstoken_trl.dropout import dropout_off
from sstoken_trl.history.base import BaseHistory
from sstoken_trl.history.fingerprint import sample_key, tokenizer_fingerprint, weights_fingerprint
from sstoken_trl.history.source import Collate, Forward, HistoryContext, HistorySource
from sstoken_trl.scoring.layout import Layout, batch_layout
from sstoken_trl.trl_internals import training_columns

CACHED_LOG_PROBS = "sstoken_history_log_probs"
FORMAT = "sstoken-loss-cache/1"
MANIFEST = "manifest.json"
RESUME_FILE = "sstoken_cache.json"  # in checkpoints: the base-model fingerprint, for resuming full fine-tuning


def sample_spans(layout: Layout) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample of a batch: a run of real tokens of one document."""
    real, doc = layout.real.cpu().numpy(), layout.doc.cpu().numpy()
    spans = []
    for row in range(real.shape[0]):
        pos = np.flatnonzero(real[row])
        if pos.size == 0:
            continue
        breaks = np.flatnonzero((np.diff(doc[row, pos]) != 0) | (np.diff(pos) != 1)) + 1
        spans.extend((row, int(run[0]), int(run[-1]) + 1) for run in np.split(pos, breaks))
    return spans


def _layout(batch: dict[str, Any]) -> Layout:
    return batch_layout(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))


def batch_samples(batch: dict[str, Any]) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """The batch's samples as (row, start, end) spans, and the cache key of each."""
    input_ids = batch["input_ids"].cpu().numpy()
    spans = sample_spans(_layout(batch))
    return spans, np.array([sample_key(input_ids[r, s:e]) for r, s, e in spans], dtype=np.uint64)


class LossCache:
    """A finished cache folder, memory-mapped."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.folder} is not an ssToken loss cache of format {FORMAT!r}.")
        self.keys, self.offsets, self.losses = (
            np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in ("keys", "offsets", "losses")
        )

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers reopen the files instead of copying them
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])

    def check(self, expected: dict[str, str]) -> None:
        """Raise unless the cache was made with the expected base model and tokenizer fingerprints."""
        for what, fingerprint in expected.items():
            if self.manifest.get(what) != fingerprint:
                raise ValueError(
                    f"The loss cache in {self.folder} was computed with another {what} than this run's "
                    f"({self.manifest.get(what)} != {fingerprint}). Point history_cache_dir to a new folder to "
                    "build a cache for this run, or use the model and tokenizer the cache was built with."
                )

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Index of each key in the cache, -1 where absent."""
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, -1) if len(self.keys) else np.full(len(keys), -1)

    def log_probs(self, batch: dict[str, Any]) -> torch.Tensor:
        """log p_base on the batch's target positions (B, T-1), 0 off samples; raises on an unknown sample."""
        spans, keys = batch_samples(batch)
        index = self.find(keys)
        rows, length = batch["input_ids"].shape
        out = np.zeros((rows, length - 1), dtype=np.float32)
        for (row, start, end), i in zip(spans, index, strict=True):
            if i < 0 or self.offsets[i + 1] - self.offsets[i] != end - start - 1:
                raise ValueError(
                    f"A training sample of {end - start} tokens is not in the loss cache {self.folder}: the data "
                    "changed since the cache was built. Point history_cache_dir to a new folder."
                )
            out[row, start : end - 1] = -self.losses[self.offsets[i] : self.offsets[i + 1]]
        return torch.from_numpy(out)

    @staticmethod
    def write(folder: Path, entries: dict[int, np.ndarray], manifest: dict[str, Any]) -> None:
        """Store {sample key: losses}; the manifest goes last, so a folder with one is complete."""
        folder.mkdir(parents=True, exist_ok=True)
        keys = np.array(sorted(entries), dtype=np.uint64)
        lengths = np.array([len(entries[int(k)]) for k in keys], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        losses = np.concatenate([entries[int(k)] for k in keys] + [np.zeros(0, np.float32)]).astype(np.float32)
        for name, array in (("keys", keys), ("offsets", offsets), ("losses", losses)):
            np.save(folder / f"{name}.npy", array, allow_pickle=False)
        manifest = {"format": FORMAT, **manifest, "samples": len(keys), "tokens": int(offsets[-1])}
        (folder / f"{MANIFEST}.tmp").write_text(json.dumps(manifest, indent=2))
        os.replace(folder / f"{MANIFEST}.tmp", folder / MANIFEST)


class CacheLookup:
    """Collate-function wrapper: adds the cached history log-probs of the batch under CACHED_LOG_PROBS."""

    def __init__(self, collate_fn: Collate, cache: LossCache) -> None:
        self.collate_fn = collate_fn
        self.cache = cache

    def __call__(self, examples: list) -> dict[str, Any]:
        batch = self.collate_fn(examples)
        batch[CACHED_LOG_PROBS] = self.cache.log_probs(batch)
        return batch


class CacheHistory(HistorySource):
    """History source that reads the cached log-probs the collate function put into the batch."""

    def __init__(self, cache: LossCache, model_fingerprint: str) -> None:
        self.cache = cache
        self.model_fingerprint = model_fingerprint

    @classmethod
    def from_context(cls, context: HistoryContext) -> CacheHistory:
        trainer = context.require_trainer("cache")
        return open_cache(context.config.history_cache_dir, trainer, context.forward, context.resume_folder())

    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor:
        """The cached log p_base on the batch's labelled target positions; no forward."""
        if CACHED_LOG_PROBS not in inputs:
            raise RuntimeError("history='cache': the batch carries no cached losses (collate function replaced?).")
        trained = inputs["labels"][:, 1:] != IGNORE_INDEX  # zero off the labels, like the fused LM head's output
        return torch.where(trained, inputs[CACHED_LOG_PROBS], 0.0)

    def wrap_collate(self, collate_fn: Collate) -> CacheLookup:
        return CacheLookup(collate_fn, self.cache)

    def strip_batch(self, inputs: dict[str, Any]) -> None:
        inputs.pop(CACHED_LOG_PROBS, None)

    def save(self, folder: Path) -> None:
        (Path(folder) / RESUME_FILE).write_text(json.dumps({"model": self.model_fingerprint}))


def training_batches(trainer: Trainer) -> Iterator[dict[str, Any]]:
    """The training set in order, collated by the trainer's collator (no sampler: the trainer's RNG is untouched)."""
    dataset = trainer.train_dataset
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError("history='cache' needs a map-style training dataset to pass over; got a streaming one.")
    columns = training_columns(trainer)
    if columns and hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns([c for c in dataset.column_names if c in columns])
    collate, size = trainer.data_collator, trainer.args.per_device_eval_batch_size
    counts = getattr(collate, "counts", None)  # a collator's running totals must count training alone
    saved = dict(counts) if isinstance(counts, dict) else None
    try:
        for start in range(0, len(dataset), size):
            yield collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
    finally:
        if saved is not None:
            counts.clear()
            counts.update(saved)


@torch.no_grad()
def base_log_probs(trainer: Trainer, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
    """log p_base at every target position of the batch's samples, as the online history would compute it."""
    layout = _layout(batch)
    inputs = {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    inputs["labels"] = torch.where(layout.real, batch["input_ids"], IGNORE_INDEX).to(trainer.args.device)
    with trainer.compute_loss_context_manager():
        if isinstance(trainer.model, PeftModel):
            return BaseHistory(trainer.model).log_probs(forward, inputs).float().cpu()
        with dropout_off(trainer.model):
            return forward(**inputs, fused_lm_head=True).log_probs.float().cpu()


def build(folder: Path, trainer: Trainer, forward: Forward, fingerprints: dict[str, str]) -> None:
    """One no-grad pass of the base model over the training set, stored as a cache folder."""
    entries: dict[int, np.ndarray] = {}
    for batch in training_batches(trainer):
        logp = base_log_probs(trainer, forward, batch).numpy()
        spans, keys = batch_samples(batch)
        for (row, start, end), key in zip(spans, keys.tolist(), strict=True):
            entries.setdefault(key, -logp[row, start : end - 1])
    LossCache.write(folder, entries, fingerprints)


def open_cache(folder: str, trainer: Trainer, forward: Forward, resume: Path | None) -> CacheHistory:
    """Open the cache in `folder`, building it first if absent; check model, tokenizer and data against it.

    `forward` is the fused-LM-head forward of the trained model; `resume` the checkpoint a run resumes from.
    Without PEFT the trained weights are no longer the base model after step 0, so a resumed run takes the
    base-model fingerprint from the checkpoint instead.
    """
    folder = Path(folder)
    if resume is not None and not isinstance(trainer.model, PeftModel):
        if not (resume / RESUME_FILE).is_file():
            raise FileNotFoundError(f"Resuming with history='cache' from {resume}, which holds no {RESUME_FILE}.")
        model_fingerprint = json.loads((resume / RESUME_FILE).read_text())["model"]
    else:
        model_fingerprint = weights_fingerprint(trainer.model)
    expected = {"model": model_fingerprint, "tokenizer": tokenizer_fingerprint(trainer.processing_class)}
    built = False
    with trainer.accelerator.main_process_first():
        if not (folder / MANIFEST).is_file():
            if resume is not None and not isinstance(trainer.model, PeftModel):
                raise FileNotFoundError(f"No loss cache in {folder} to resume with; it is built at step 0.")
            build(folder, trainer, forward, expected)
            built = True
    cache = LossCache(folder)
    cache.check(expected)
    if built:  # just built from this very training set: every sample is in it
        return CacheHistory(cache, model_fingerprint)
    missing = total = 0
    for batch in training_batches(trainer):
        keys = batch_samples(batch)[1]
        missing += int((cache.find(keys) < 0).sum())
        total += len(keys)
    if missing:
        raise ValueError(
            f"{missing} of {total} training samples are not in the loss cache {folder}: it was built for other "
            "data (or another collator / max_length). Point history_cache_dir to a new folder."
        )
    return CacheHistory(cache, model_fingerprint)
