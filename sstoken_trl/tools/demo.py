"""The offline demo: its template data, and the tiny base model it trains once and then reuses.

`demo_rows` generates the shipped `sstoken_trl/data/demo.jsonl` (short instructions in the
`<|User|>...<|Assistant|>...` template: copying, reversing, adding, picking). `ensure_tiny_model` builds a small
LLaMA-shaped model and a tokenizer trained on that data, gives the model a short plain-SFT base training (every
response token), and saves both where the recipe's `model_name_or_path` points, so the ssToken run that follows
has a history model that means something. An existing folder is reused as it is.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from sstoken_trl.data.collator import SSTokenCollator
from sstoken_trl.data.spans import ASSISTANT_TAG, USER_TAG
from sstoken_trl.tools.tiny import build_model, build_tokenizer

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "demo.jsonl"
DEMO_ROWS, DEMO_SEED = 480, 2026
DEMO_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
DEMO_VOCAB = 640

COLOURS = "red blue green yellow purple orange".split()
ANIMALS = "cat dog horse mouse eagle tiger".split()
FRUITS = "apple pear plum cherry lemon mango".split()
OPENERS = ["Sure!", "Of course.", "Happy to help.", "Certainly!", "Here you go.", "Good question."]
SYSTEM = "You are a helpful assistant. "
KINDS = ("repeat", "reverse", "add", "animal", "count")
BASE_KINDS = ("repeat", "reverse", "animal")  # the base learns the template and these; fine-tuning adds the rest


def _words(rng: random.Random, k: int) -> list[str]:
    return rng.sample(COLOURS + ANIMALS + FRUITS, k)


def _task(rng: random.Random, kinds: tuple[str, ...] = KINDS) -> tuple[str, str, int | None]:
    """(instruction, answer, the number a follow-up turn can double, if any)."""
    kind = rng.choice(list(kinds))
    if kind in ("repeat", "reverse", "count"):
        words = _words(rng, rng.randint(3, 5))
        listed = " ".join(words)
        if kind == "repeat":
            return f"Repeat these words: {listed}.", f"{listed}.", None
        if kind == "reverse":
            return f"Say these words in reverse order: {listed}.", f"In reverse order: {' '.join(words[::-1])}.", None
        return f"How many words are in this list: {listed}?", f"The list has {len(words)} words.", len(words)
    if kind == "add":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", a + b
    animal = rng.choice(ANIMALS)
    options = [animal, rng.choice(COLOURS), rng.choice(FRUITS)]
    rng.shuffle(options)
    return f"Which word names an animal: {', '.join(options)}?", f"The animal is {animal}.", None


def demo_rows(n: int = DEMO_ROWS, seed: int = DEMO_SEED, kinds: tuple[str, ...] = KINDS) -> list[dict[str, str]]:
    """The demo's template-text samples; some open with a system line, some have a second turn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction, answer, number = _task(rng, kinds)
        text = (SYSTEM if rng.random() < 0.25 else "") + f"{USER_TAG}{instruction}{ASSISTANT_TAG}"
        text += f"{rng.choice(OPENERS)} {answer}"
        if number is not None and rng.random() < 0.5:
            text += f"{USER_TAG}And what is that times two?{ASSISTANT_TAG}{rng.choice(OPENERS)} {number * 2}."
        rows.append({"text": text})
    return rows


def write_demo_data(path: Path = DATA_FILE) -> None:
    """Regenerate the shipped demo data file."""
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows()), encoding="utf-8")


def _corpus(dataset: Dataset) -> list[str]:
    return [" ".join(str(value) for value in row.values()) for row in dataset]


def pretrain(model: torch.nn.Module, collator: SSTokenCollator, dataset: Dataset, steps: int, seed: int) -> None:
    """Plain SFT: mean NLL on every response token, AdamW with linear decay, batches of 16, with a progress bar."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    bar = tqdm(range(steps), desc="base model: plain SFT")
    for _ in bar:
        rows = torch.randint(len(dataset), (16,), generator=generator).tolist()
        batch = {k: v.to(model.device) for k, v in collator([dataset[i] for i in rows]).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")


def build_tiny_base(path: Path, dataset: Dataset, steps: int, seed: int, max_length: int | None) -> None:
    """Tokenizer (from the training data) + tiny LLaMA-shaped model, saved at `path`.

    Like a real base model, it has not seen the fine-tuning data: its `steps` steps of plain SFT run on other
    generated samples of three of the demo's five tasks (BASE_KINDS), so it knows the template, the openers and
    those tasks, and fine-tuning teaches counting and addition."""
    base_rows = Dataset.from_list(demo_rows(seed=DEMO_SEED + 1 + seed, kinds=BASE_KINDS))
    tokenizer = build_tokenizer(_corpus(dataset) + _corpus(base_rows), vocab_size=DEMO_VOCAB)
    model = build_model("llama", vocab_size=len(tokenizer), seed=seed, **DEMO_SHAPE)
    pretrain(model, SSTokenCollator(tokenizer, max_length=max_length), base_rows, steps, seed)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if path.exists():
        path.rmdir()
    partial.rename(path)


def ensure_tiny_model(
    path: str, dataset: Dataset, steps: int, seed: int = 0, max_length: int | None = None, verbose: bool = True
) -> None:
    """Build the tiny base model at `path` unless it exists (run it on the main process first when distributed)."""
    target = Path(path)
    if (target / "config.json").is_file():
        if verbose:
            print(f"Reusing the tiny base model at {target}")
        return
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists but holds no model (no config.json); remove it or point model_name_or_path "
            "elsewhere to let sstoken_build_tiny_model build the demo model there."
        )
    if verbose:
        print(f"Building a tiny LLaMA-shaped model and tokenizer at {target} ({steps} steps of plain SFT)")
    target.parent.mkdir(parents=True, exist_ok=True)
    build_tiny_base(target, dataset, steps, seed, max_length)


__all__ = ["DATA_FILE", "demo_rows", "ensure_tiny_model", "write_demo_data"]
