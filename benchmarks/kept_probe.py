"""What a fine-tuned model kept of what its base knew: real knowledge and chat drift (docs/forgetting.md).

knowledge    Real facts and skills, several kinds (PROBES), asked in this module's own phrasing, which no training
             regime uses. Only the items the base model answers right (greedy, its chat template) are kept, once per
             base model (cached beside the runs); `knowledge_kept` is the share of them still right after fine-tuning.
chat drift   The base model's own greedy replies to held-out real chat prompts (first user turns of chitchat
             conversations that no regime trains on, DRIFT_CONVERSATIONS) scored under the fine-tuned model:
             `chat_drift`, the NLL per reply token (the base's own value is the floor a kept model stays near).
Cost on one shared CPU core (SmolLM2-135M): building the probe once ~60 s, one evaluation ~25 s.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.chat_task import MAX_TOKENS, user_turns
from benchmarks.real_task import ChatSample, ChatTask, Part, clean_loss, greedy_replies

# (kind, question, accepted answers separated by "|"): a reply is right when it mentions one (case-insensitive).
PROBES: tuple[tuple[str, str, str], ...] = (
    *(
        ("capital", f"Which city is the capital of {country}? Answer in a few words.", capital)
        for country, capital in (
            ("France", "Paris"),
            ("Japan", "Tokyo"),
            ("Italy", "Rome"),
            ("Germany", "Berlin"),
            ("Spain", "Madrid"),
            ("Russia", "Moscow"),
            ("Egypt", "Cairo"),
            ("England", "London"),
            ("China", "Beijing"),
            ("Greece", "Athens"),
            ("Canada", "Ottawa"),
            ("Australia", "Canberra"),
            ("Ireland", "Dublin"),
            ("Portugal", "Lisbon"),
            ("Austria", "Vienna"),
            ("Norway", "Oslo"),
        )
    ),
    *(
        ("landmark", f"In which city would you find {place}? Answer in a few words.", city)
        for place, city in (
            ("the Eiffel Tower", "Paris"),
            ("the Colosseum", "Rome"),
            ("Big Ben", "London"),
            ("the Statue of Liberty", "New York"),
            ("the Brandenburg Gate", "Berlin"),
            ("the Golden Gate Bridge", "San Francisco"),
            ("the Kremlin", "Moscow"),
            ("the Acropolis", "Athens"),
            ("the Sydney Opera House", "Sydney"),
            ("the Leaning Tower of Pisa", "Pisa"),
        )
    ),
    *(
        ("author", f"Who wrote {work}? Answer in a few words.", author)
        for work, author in (
            ("Romeo and Juliet", "Shakespeare"),
            ("Hamlet", "Shakespeare"),
            ("Pride and Prejudice", "Austen"),
            ("the Harry Potter books", "Rowling"),
            ("Oliver Twist", "Dickens"),
            ("War and Peace", "Tolstoy"),
            ("The Origin of Species", "Darwin"),
            ("Don Quixote", "Cervantes"),
            ("The Odyssey", "Homer"),
            ("Nineteen Eighty-Four", "Orwell"),
        )
    ),
    *(
        ("person", f"What was {who} famous as? Answer in a few words.", known)
        for who, known in (
            ("Albert Einstein", "physicist|scientist"),
            ("Pablo Picasso", "painter|artist"),
            ("Wolfgang Amadeus Mozart", "composer|musician"),
            ("Isaac Newton", "physicist|scientist|mathematician"),
            ("Leonardo da Vinci", "painter|artist|inventor"),
            ("Neil Armstrong", "astronaut"),
            ("William Shakespeare", "playwright|writer|poet"),
            ("Ludwig van Beethoven", "composer|musician|pianist"),
        )
    ),
    *(
        ("arithmetic", f"Compute {a} {op} {b}. Reply with the number only.", str(value))
        for a, op, b, value in (
            (2, "+", 3, 5),
            (4, "+", 5, 9),
            (6, "+", 7, 13),
            (9, "-", 4, 5),
            (3, "*", 4, 12),
            (5, "*", 6, 30),
            (10, "+", 10, 20),
            (8, "-", 3, 5),
            (7, "*", 2, 14),
            (100, "+", 1, 101),
        )
    ),
    *(
        ("word", question, answer)
        for question, answer in (
            ("What is the opposite of hot? Answer in one word.", "cold"),
            ("What is the opposite of up? Answer in one word.", "down"),
            ("What is the opposite of big? Answer in one word.", "small|little"),
            ("What is the plural of child? Answer in one word.", "children"),
            ("What is the plural of mouse? Answer in one word.", "mice"),
            ("What color is the sky on a clear day? Answer in one word.", "blue"),
            ("What color is grass? Answer in one word.", "green"),
            ("How many days are in a week? Answer with a number.", "7|seven"),
            ("How many legs does a spider have? Answer with a number.", "8|eight"),
            ("What is frozen water called? Answer in one word.", "ice"),
            ("Which animal is known as man's best friend? Answer in one word.", "dog"),
            ("What is the past tense of go? Answer in one word.", "went"),
        )
    ),
)
KNOWLEDGE_NEW_TOKENS = 24
DRIFT_CONVERSATIONS = (3900, 3960)  # chitchat conversations no regime trains on (benchmarks/chat_task.py)
DRIFT_NEW_TOKENS = 40


def mentions(reply: str, accepted: str) -> bool:
    return any(a.lower() in reply.lower() for a in accepted.split("|"))


def knowledge_samples(task: ChatTask) -> list[ChatSample]:
    """Every probe as a sample asking its question (the response a stand-in setting the reply's length)."""
    filler = "x" * KNOWLEDGE_NEW_TOKENS
    return [task.sample(q, [Part(filler)], expected=a, words=(kind,), check="exact") for kind, q, a in PROBES]


def right(model: torch.nn.Module, tokenizer: Any, samples: list[ChatSample]) -> list[bool]:
    replies = greedy_replies(model, tokenizer, samples, max_new=KNOWLEDGE_NEW_TOKENS)
    return [mentions(r, s.expected) for r, s in zip(replies, samples, strict=True)]


@dataclass
class KeptProbe:
    """The probes the base passed and the base's own replies, for one base model (built once, cached)."""

    knowledge: list[ChatSample]  # the probes the base answered right
    drift: list[ChatSample]  # held-out chat prompts, each with the base's own greedy reply as its response

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """knowledge_kept (share of the base's right answers still right) and chat_drift (NLL per reply token)."""
        out = {"chat_drift": clean_loss(model, self.drift, tokenizer.pad_token_id)}
        if self.knowledge:
            kept = right(model, tokenizer, self.knowledge)
            out["knowledge_kept"] = sum(kept) / len(kept)
        return out


def build(model: torch.nn.Module, tokenizer: Any, task: ChatTask) -> dict[str, Any]:
    """What the base knows: the indices of PROBES it answers right, and its greedy replies to the drift prompts."""
    passed = right(model, tokenizer, knowledge_samples(task))
    prompts = user_turns(*DRIFT_CONVERSATIONS, tokenizer)
    replies = greedy_token_replies(model, tokenizer, task, prompts, DRIFT_NEW_TOKENS)
    return {"passed": [i for i, ok in enumerate(passed) if ok], "prompts": prompts, "replies": replies}


@torch.no_grad()
def greedy_token_replies(
    model: torch.nn.Module,
    tokenizer: Any,
    task: ChatTask,
    prompts: list[str],
    max_new: int,
    sample_seed: int | None = None,
) -> list[list[int]]:
    """The greedy reply token ids to each prompt (with `sample_seed`: drawn at temperature 1), the end token
    included where it came within `max_new` tokens."""
    stand_in = [task.sample(p, [Part("x")]) for p in prompts]
    replies = greedy_replies(model, tokenizer, stand_in, max_new=max_new, decode=False, sample_seed=sample_seed)
    return [r + [task.end_id] if len(r) < max_new else r for r in replies]


def cached(folder: Path, name: str, model: torch.nn.Module, settings: Any, make: Any, *args: Any) -> dict[str, Any]:
    """`make(model, *args)`, a JSON-able dict, built once per base model and `settings` and kept in `folder` (keyed
    by the model's config, its first weights and the settings); the seconds it took are stored as `build_seconds`."""
    first = next(model.parameters()).detach().flatten()[:64].tolist()
    identity = json.dumps([model.config.to_dict(), first, settings], sort_keys=True)
    path = folder / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    built = {**make(model, *args), "build_seconds": 0.0}
    built["build_seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(built))
    return built


def replies_as_samples(task: ChatTask, prompts: list[str], replies: list[list[int]]) -> list[ChatSample]:
    """Each prompt with a reply as its response, nothing flagged."""
    return [
        ChatSample(task.prompt_ids(p), r, [False] * len(r), content=[False] * len(r))
        for p, r in zip(prompts, replies, strict=True)
    ]


def kept_probe(model: torch.nn.Module, tokenizer: Any, task: ChatTask, cache: Path) -> KeptProbe:
    """The probe of this base model, built once and cached in `cache`."""
    settings = [PROBES, DRIFT_CONVERSATIONS, DRIFT_NEW_TOKENS, MAX_TOKENS]
    built = cached(cache, "kept-probe", model, settings, build, tokenizer, task)
    samples = knowledge_samples(task)
    knowledge = [samples[i] for i in built["passed"]]  # none for a random model: knowledge_kept is then not reported
    drift = replies_as_samples(task, built["prompts"], built["replies"])
    return KeptProbe(knowledge, drift)
