"""Replay of the base model's own replies: a share of each training set swapped for general chat the base answers.

The base's greedy replies to the first user turns of chitchat conversations no regime trains on or evaluates
(REPLAY_CONVERSATIONS) are generated once per base model (cached; the seconds it took are the method's extra cost)
and either stand in for a share of the training samples (`with_replay`: the same optimizer steps on the same number of
samples) or join them (`with_replay_added`: every task sample kept, each batch grown by the share, the same steps):
training on what the base already says pulls the weights back where the task does not need them moved.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from benchmarks.chat_task import MAX_TOKENS, ChatConversationsTask, conversations, user_turns
from benchmarks.kept_probe import cached, greedy_token_replies, replies_as_samples
from benchmarks.real_task import ChatSample, ChatTask

REPLAY_CONVERSATIONS = (3300, 3400)  # 97 prompts that fit: a quarter of 320 samples is 80
REPLAY_NEW_TOKENS = 40
SAMPLE_SEED = 0  # the draws of sampled replay, the same for every run


def build(model: torch.nn.Module, tokenizer: Any, task: ChatTask, sample_seed: int | None) -> dict[str, Any]:
    prompts = user_turns(*REPLAY_CONVERSATIONS, tokenizer)
    replies = greedy_token_replies(model, tokenizer, task, prompts, REPLAY_NEW_TOKENS, sample_seed)
    return {"prompts": prompts, "replies": replies}


def base_replies(
    model: torch.nn.Module, tokenizer: Any, task: ChatTask, cache: Path, sampled: bool = False
) -> tuple[list[ChatSample], float]:
    """The base's own replies as samples (nothing flagged), and the seconds generating them took. Greedy, or
    `sampled` from the base's distribution (one draw per prompt, fixed seed): training on draws from the base
    estimates the KL to it, whose pull vanishes where the model still matches the base, while training on the
    greedy reply keeps sharpening the base's mode."""
    sample_seed = SAMPLE_SEED if sampled else None
    settings = [REPLAY_CONVERSATIONS, REPLAY_NEW_TOKENS, MAX_TOKENS, *([sample_seed] if sampled else [])]
    built = cached(cache, "replay", model, settings, build, tokenizer, task, sample_seed)
    return replies_as_samples(task, built["prompts"], built["replies"]), built["build_seconds"]


def general_rows(tokenizer: Any) -> list[list[int]]:
    """Token ids (the chat template, the user turn and the human reply) of every exchange of the replay conversations
    whose turns fit MAX_TOKENS: real general text, no regime's, for the base anchor's general rows (no generation)."""
    task = ChatConversationsTask(tokenizer)
    lo, hi = REPLAY_CONVERSATIONS
    return [task.exchange(*p).input_ids for c in conversations()[lo:hi] for p in c if task.fits(*p)]


def with_replay_added(samples: list[ChatSample], replay: list[ChatSample], share: float, rng: random.Random) -> list:
    """`samples` and, after them, round(share * n) base replies drawn by `rng` (each once before any repeats)."""
    if share <= 0.0:
        raise ValueError(f"added replay share={share} must be > 0: the replies added per task sample.")
    count = round(share * len(samples))
    added: list[ChatSample] = []
    while len(added) < count:
        added += rng.sample(replay, min(len(replay), count - len(added)))
    return [*samples, *added]


def with_replay(samples: list[ChatSample], replay: list[ChatSample], share: float, rng: random.Random) -> list:
    """`samples` with round(share * n) of them, drawn by `rng`, replaced by distinct replay samples; same length."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"replay share={share} must be in [0, 1): the share of training samples replaced.")
    count = round(share * len(samples))
    if count > len(replay):
        raise ValueError(f"replay needs {count} base replies, {len(replay)} are available")
    out = list(samples)
    for index, extra in zip(rng.sample(range(len(out)), count), rng.sample(replay, count), strict=True):
        out[index] = extra
    return out
