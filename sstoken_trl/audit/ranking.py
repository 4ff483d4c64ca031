"""One audited sample: its tokens, each response token's suspicion per signal, its score and its suspect spans.

A sample's score under a signal is the largest suspicion over its response tokens: one substituted word, one wrong
fact or one wrong digit is enough to make a sample suspect, and a whole wrong answer starts with one. A suspect
span is a run of response tokens whose suspicion exceeds the threshold (nats; 3 = the token is e^3, about 20 times,
less likely than the signal expects). The JSONL line of a sample holds its index, score, every signal's score and
its spans; the page shows the tokens of the top samples.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

THRESHOLD = 3.0


@dataclass
class SampleAudit:
    """A sample's tokens and, per signal, each token's suspicion (NaN on prompt tokens: not scored)."""

    index: int
    ids: list[int]
    suspicion: dict[str, list[float]]
    signal: str  # the one that ranks
    extra: dict[str, Any] = field(default_factory=dict)  # what a run record adds (times judged, ...)

    @property
    def response(self) -> list[bool]:
        return [not math.isnan(v) for v in self.suspicion[self.signal]]

    def score(self, signal: str | None = None) -> float:
        values = [v for v in self.suspicion[signal or self.signal] if not math.isnan(v)]
        return max(values, default=-math.inf)

    def spans(self, tokenizer: PreTrainedTokenizerBase, threshold: float = THRESHOLD) -> list[dict[str, Any]]:
        """Runs of response tokens above `threshold`: token positions [start, end), text, largest suspicion."""
        values, out, start = self.suspicion[self.signal], [], None
        for j, v in enumerate([*values, math.nan]):
            above = not math.isnan(v) and v > threshold
            if above and start is None:
                start = j
            elif not above and start is not None:
                text = tokenizer.decode(self.ids[start:j], skip_special_tokens=False)
                out.append({"start": start, "end": j, "text": text, "value": round(max(values[start:j]), 4)})
                start = None
        return out

    def line(self, tokenizer: PreTrainedTokenizerBase, threshold: float = THRESHOLD) -> dict[str, Any]:
        """The sample's JSONL record."""
        scores = {name: round(self.score(name), 4) if any(self.response) else None for name in self.suspicion}
        return {
            "index": self.index,
            "score": scores[self.signal],
            "signal": self.signal,
            "scores": scores,
            "spans": self.spans(tokenizer, threshold),
            "response_tokens": sum(self.response),
            **self.extra,
        }


class TopSamples:
    """The `size` highest-scoring samples seen so far, in bounded memory (a heap; ties: the lower index first)."""

    def __init__(self, size: int) -> None:
        self.size, self._heap = size, []

    def add(self, sample: SampleAudit) -> None:
        if not any(sample.response):  # nothing scored (a skipped sample): never on the page
            return
        key = (sample.score(), -sample.index)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, (key, sample))
        elif self.size and key > self._heap[0][0]:
            heapq.heapreplace(self._heap, (key, sample))

    def ranked(self) -> list[SampleAudit]:
        return [s for _, s in sorted(self._heap, key=lambda item: item[0], reverse=True)]


def rank_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSONL records best first (score descending, then index; samples with nothing scored last)."""
    return sorted(lines, key=lambda line: (line["score"] is None, -(line["score"] or 0.0), line["index"]))
