"""Shared fixtures: an offline tokenizer and small synthetic data."""

from __future__ import annotations

import random

import pytest

from sstoken_trl.tiny import build_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def prompt_completion_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
        completion = " ".join(rng.choices(WORDS, k=rng.randint(2, 9)))
        rows.append({"prompt": prompt, "completion": " " + completion})
    return rows


@pytest.fixture(scope="session")
def tokenizer():
    corpus = [r["prompt"] + r["completion"] for r in prompt_completion_rows(200, seed=1)]
    return build_tokenizer(corpus, vocab_size=300)
