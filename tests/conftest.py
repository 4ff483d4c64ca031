"""Shared fixtures: an offline tokenizer and small synthetic data."""

from __future__ import annotations

import random

import pytest

from sstoken_trl.tools.tiny import build_tokenizer

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


def cpu_sft_args(**overrides) -> dict:
    """SFTConfig keyword arguments for short, deterministic CPU runs; overrides win."""
    args = dict(
        output_dir="/tmp/sstoken-test-out",
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL turns bf16 autocast on by default, CPU included
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    args.update(overrides)
    return args
