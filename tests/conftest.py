"""Shared fixtures: an offline tokenizer and small synthetic data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from sstoken_trl.tools.tiny import build_model, build_tokenizer

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


def tiny_cli_run(tmp_path: Path, models: dict[str, int], **keys) -> tuple[Path, list[dict[str, str]], object]:
    """A recipe for a short sstoken-train LoRA run on CPU over 24 prompt/completion rows, with tiny models saved
    under tmp_path (name -> seed; the run's model is "base"); `keys` win. Returns (recipe path, rows, tokenizer)."""
    rows = prompt_completion_rows(24, seed=3)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=200)
    for name, seed in models.items():
        tokenizer.save_pretrained(tmp_path / name)
        build_model("llama", len(tokenizer), seed=seed).save_pretrained(tmp_path / name)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model_name_or_path": str(tmp_path / "base"),
        "dataset_name": str(data),
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "use_peft": True,
        "lora_r": 4,
        "lora_target_modules": ["q_proj", "v_proj"],
        "activation_checkpointing": False,
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "report_to": [],
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        **keys,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, rows, tokenizer
