"""SSTokenCollator: samples -> padded batches with labels on response tokens only, on top of TRL's collator.

Also `pretokenize`, the packing / padding-free path: TRL refuses a custom collator with padding-free, so the
spans are computed once into `input_ids` + `labels` columns that TRL's own pipeline and collator honour.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from sstoken_trl.data.spans import ASSISTANT_TAG, BAD_REASONS, USER_TAG, BadSampleError, Encoded, SpanFinder
from sstoken_trl.trl_internals import DataCollatorForLanguageModeling

logger = logging.getLogger(__name__)

POLICIES = ("error", "skip")
COUNT_KEYS = ("samples", *(f"skipped_{r}" for r in BAD_REASONS), "truncated", "truncated_no_response")


def _excerpt(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, width: int = 160) -> str:
    if "input_ids" in example:
        text = tokenizer.decode(list(example["input_ids"])[:width])
    else:
        text = str(example.get("text", example.get("messages", dict(example))))
    return repr(text[:width] + ("..." if len(text) > width else ""))


def _check_policy(on_bad_sample: str, max_length: int | None) -> None:
    if on_bad_sample not in POLICIES:
        raise ValueError(f"on_bad_sample must be one of {POLICIES}, got {on_bad_sample!r}.")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive int or None, got {max_length}.")


class SSTokenCollator:
    """Collates template text, token ids, messages or prompt/completion samples into a padded batch.

    Labels are the response tokens (see `sstoken_trl.data.spans`); -100 elsewhere and on padding. Padding is TRL's
    `DataCollatorForLanguageModeling`, so the output is what TRL's own collator gives: input_ids, attention_mask,
    labels (and position_ids with `return_position_ids=True`).

    Args:
        tokenizer: a fast tokenizer with a pad token.
        user_tag, assistant_tag: the template's turn markers (special tokens or plain strings).
        max_length: keep the first `max_length` tokens of each sample. A sample whose responses are all cut off
            stays in the batch with no label (no loss, no NaN), is counted and warned about; never an error.
        on_bad_sample: "error" raises on a sample with nothing to train on (no assistant tag, assistant before
            any user, empty response, all labels -100, an assistant message a chat template without
            `{% generation %}` markers renders beyond recognition); "skip" keeps it in the batch fully masked and
            counts it.
        add_eos: close each template-text response with EOS when it does not already end with it.
        pad_to_multiple_of, return_position_ids: passed to TRL's collator.

    `counts` holds running totals since construction ("samples", "skipped_<reason>", "truncated",
    "truncated_no_response"). They are kept in the process that collates: with dataloader workers they stay in
    the workers.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        user_tag: str = USER_TAG,
        assistant_tag: str = ASSISTANT_TAG,
        max_length: int | None = None,
        on_bad_sample: str = "error",
        *,
        add_eos: bool = True,
        pad_to_multiple_of: int | None = None,
        return_position_ids: bool = False,
    ):
        _check_policy(on_bad_sample, max_length)
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token, so batches cannot be padded. Set one before building the "
                "collator, e.g. `tokenizer.pad_token = tokenizer.eos_token` (padding never carries a label)."
            )
        self.tokenizer = tokenizer
        self.finder = SpanFinder(tokenizer, user_tag, assistant_tag, add_eos=add_eos)
        self.max_length, self.on_bad_sample = max_length, on_bad_sample
        self.counts: dict[str, int] = dict.fromkeys(COUNT_KEYS, 0)
        self._pad = DataCollatorForLanguageModeling(
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=pad_to_multiple_of,
            return_position_ids=return_position_ids,
        )
        self._warned_truncation = False

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [self.encode(example, i) for i, example in enumerate(examples)]
        return self._pad([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])

    def encode(self, example: Mapping[str, Any], index: int = 0) -> Encoded:
        """One sample -> ids and response mask, after the bad-sample policy and truncation; updates counts."""
        self.counts["samples"] += 1
        try:
            enc = self.finder.encode(example)
        except BadSampleError as err:
            if self.on_bad_sample == "error":
                raise BadSampleError(
                    err.reason,
                    f"Sample {index} of the batch: {err} Sample starts {_excerpt(example, self.tokenizer)}. Fix "
                    "or drop it, or pass on_bad_sample='skip' to mask such samples (counted in collator.counts).",
                    err.encoded,
                ) from err
            self.counts[f"skipped_{err.reason}"] += 1
            enc = err.encoded
        if self.max_length is None or len(enc.input_ids) <= self.max_length:
            return enc
        self.counts["truncated"] += 1
        cut = enc.truncated(self.max_length)
        if any(enc.response_mask) and not any(cut.response_mask):
            self.counts["truncated_no_response"] += 1
            if not self._warned_truncation:
                self._warned_truncation = True
                logger.warning(
                    "A sample's responses all lie beyond max_length=%d; it adds no loss tokens. Such samples are "
                    "counted in collator.counts['truncated_no_response']; raise max_length or shorten prompts.",
                    self.max_length,
                )
        return cut


def pretokenize(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    user_tag: str = USER_TAG,
    assistant_tag: str = ASSISTANT_TAG,
    *,
    max_length: int | None = None,
    on_bad_sample: str = "error",
    add_eos: bool = True,
    num_proc: int | None = None,
) -> Dataset:
    """Any supported sample format -> a dataset of `input_ids` + `labels` for TRL's own pipeline.

    TRL leaves a pre-tokenised dataset's `labels` column as it is, then truncates or packs it, so
    `SFTConfig(packing=True)` or `padding_free=True` with TRL's default collator trains on exactly the
    response tokens `SSTokenCollator` would select. Bad samples raise ("error", with the row index) or are
    dropped ("skip"); with `max_length`, rows are truncated and rows left without a response are dropped.
    Counts are logged.
    """
    _check_policy(on_bad_sample, max_length)
    finder = SpanFinder(tokenizer, user_tag, assistant_tag, add_eos=add_eos)

    def row(example: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            enc, bad = finder.encode(example), ""
        except BadSampleError as err:
            if on_bad_sample == "error":
                raise BadSampleError(
                    err.reason,
                    f"Row {index}: {err} Row starts {_excerpt(example, tokenizer)}. Fix or drop it, or pass "
                    "on_bad_sample='skip' to drop such rows.",
                    err.encoded,
                ) from err
            enc, bad = err.encoded, f"skipped_{err.reason}"
        if max_length is not None and len(enc.input_ids) > max_length:
            cut = enc.truncated(max_length)
            bad = bad or ("truncated_no_response" if not any(cut.response_mask) else "")
            enc = cut
        return {"input_ids": enc.input_ids, "labels": enc.labels, "sstoken_bad": bad}

    out = dataset.map(row, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc)
    dropped = Counter(reason for reason in out["sstoken_bad"] if reason)
    if dropped:
        logger.warning("pretokenize dropped %d of %d rows: %s", sum(dropped.values()), len(out), dict(dropped))
        out = out.filter(lambda reason: not reason, input_columns="sstoken_bad", num_proc=num_proc)
    return out.remove_columns("sstoken_bad")
