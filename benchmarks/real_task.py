"""Word reversal in a real chat template: samples with known noise, and held-out exact match / clean loss.

A prompt asks, in the model's own chat template, "Reverse the order of these words: tiger, candle, river." and the
answer is "river, candle, tiger." (3-5 distinct common English nouns from WORDS). SmolLM2-135M-Instruct does not
solve it (it paraphrases, or repeats the words in their order) but learns it with a LoRA in well under 100 steps:
the answer is checkable by string equality, and every answer word is a copy of a prompt word, so the attention
to the prompt carries information.

Regimes (how the training responses are built; held-out responses are always clean):
  clean      the answer as it is.
  corrupted  each answer word is substituted, with probability `noise`, by another word not in the prompt.
  wrong      a share `noise` of the responses is the answer of another training sample (a different question).
  redundant  the answer is wrapped in filler phrases, "Sure! Here are the words in reverse order: ... Hope
             this helps!" (opening and closing drawn at random); the scored answer is the text between the
             first ':' and the following '.', in training and in evaluation.
`Sample.corrupted` flags the substituted words, the wrong answers or the filler (what the oracle masks);
`Sample.answer` flags the tokens the held-out loss is scored on (None: the whole response, end token included).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.noisy_task import Sample

REGIMES = ("corrupted", "wrong", "redundant", "clean")
WORDS = (
    "apple river candle tiger stone window garden pencil rabbit mirror forest bottle castle dragon ladder pillow "
    "wagon violin turtle basket hammer island jacket kettle lemon monkey needle orange parrot rocket saddle tomato "
    "umbrella walnut zebra anchor button carpet donkey engine feather guitar helmet jungle bridge cookie desert "
    "eagle flower glove hockey insect jelly kitten lizard magnet napkin ocean peanut queen ribbon shadow tunnel "
    "valley whistle yogurt blanket cactus dolphin garlic honey lantern mango nickel onion pepper rope spoon tent "
    "wallet cherry camera coffee dinner finger hotel market pocket rubber silver summer thunder winter"
).split()
OPENINGS = (
    "Sure! Here are the words in reverse order:",
    "Of course. Reversed, the list reads:",
    "Here you go:",
    "Happy to help! The reversed words are:",
)
SYSTEM = "You are a helpful assistant."  # shorter than the template's default system prompt: ~40 tokens a sample
CLOSINGS = (" Hope this helps!", " Let me know if you need anything else.", " Have a nice day!", "")


@dataclass
class ChatSample(Sample):
    words: tuple[str, ...] = ()  # the prompt's words: the clean answer is them reversed


def question(words: Sequence[str]) -> str:
    return f"Reverse the order of these words: {', '.join(words)}."


def reversed_answer(words: Sequence[str]) -> str:
    return ", ".join(reversed(words)) + "."


def answer_text(reply: str, filler: bool) -> str:
    """The scored answer of a reply: all of it, or with filler the text between the first ':' and the next '.'."""
    reply = reply.strip()
    if not filler:
        return reply
    head, colon, rest = reply.partition(":")
    answer, dot, _ = rest.partition(".")
    return answer.strip() + dot if colon else ""


class ChatTask:
    """Builds tokenised samples of one regime with the model's chat template and tokenizer."""

    def __init__(self, tokenizer: Any, end_token: str = "<|im_end|>", system: str = SYSTEM) -> None:
        self.tokenizer, self.system = tokenizer, system
        self.end_id = tokenizer.convert_tokens_to_ids(end_token)
        if self.end_id is None or self.end_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {end_token!r} token: the task needs a ChatML-style template.")

    def prompt_ids(self, text: str) -> list[int]:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": text}]
        chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(chat, add_special_tokens=False)["input_ids"]

    def sample(self, words: tuple[str, ...], parts: Sequence[tuple[str, bool, bool]]) -> ChatSample:
        """The sample of `words` whose response is the concatenated `parts` (text, flagged, scored) and the end
        token; a token takes the flags of the part that holds its last character."""
        text = "".join(p for p, _, _ in parts)
        owner: list[tuple[bool, bool]] = []
        for part, flagged, scored in parts:
            owner += [(flagged, scored)] * len(part)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        flags, scored = zip(*(owner[max(hi, lo + 1) - 1] for lo, hi in enc["offset_mapping"]), strict=True)
        answer = None if all(scored) else [*scored, False]
        ids = [*enc["input_ids"], self.end_id]
        return ChatSample(self.prompt_ids(question(words)), ids, [*flags, False], answer, words)

    def make(
        self, regime: str, n: int, noise: float, rng: random.Random, avoid: frozenset = frozenset()
    ) -> list[ChatSample]:
        """n samples of `regime` (prompts whose word tuples are not in `avoid`)."""
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
        prompts: list[tuple[str, ...]] = []
        while len(prompts) < n:
            words = tuple(rng.sample(WORDS, rng.randint(3, 5)))
            if words not in avoid:
                prompts.append(words)
        out = []
        for words in prompts:
            answer = list(reversed(words))
            if regime == "corrupted":
                other = [w for w in WORDS if w not in words]
                answer = [rng.choice(other) if rng.random() < noise else w for w in answer]
            flags = [a != w for a, w in zip(answer, reversed(words), strict=True)]
            if regime == "wrong" and rng.random() < noise:
                other = prompts[rng.randrange(len(prompts))]
                while other == words:
                    other = prompts[rng.randrange(len(prompts))]
                answer, flags = list(reversed(other)), [True] * len(other)
            parts = []
            for i, (word, bad) in enumerate(zip(answer, flags, strict=True)):
                parts += [(", ", False, True)] if i else []
                parts.append((word, bad, True))
            parts.append((".", False, True))
            if regime == "redundant":
                opening, closing = rng.choice(OPENINGS), rng.choice(CLOSINGS)
                parts = [(opening, True, False), (" ", True, False), *parts, (closing, True, False)]
            out.append(self.sample(words, parts))
        return out


def greedy_exact_match(model: torch.nn.Module, tokenizer: Any, samples: Sequence[ChatSample], filler: bool) -> float:
    """Share of prompts whose greedy reply (up to the end token) has the clean answer as its scored answer."""
    replies = greedy_replies(model, tokenizer, samples)
    right = [answer_text(r, filler) == reversed_answer(s.words) for r, s in zip(replies, samples, strict=True)]
    return sum(right) / len(samples)


@torch.no_grad()
def greedy_replies(
    model: torch.nn.Module, tokenizer: Any, samples: Sequence[ChatSample], batch_size: int = 40
) -> list[str]:
    """The greedy continuation of every prompt up to the end token (or a few tokens past the longest response),
    decoded; prompts batched with left padding."""
    model.eval()
    device = next(model.parameters()).device
    end_id, pad_id = samples[0].response[-1], tokenizer.pad_token_id
    new = max(len(s.response) for s in samples) + 4
    replies = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s.prompt) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[i, width - len(s.prompt) :] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=pad_id,
        )
        for row in out[:, width:].tolist():
            row = row[: row.index(end_id)] if end_id in row else row
            replies.append(tokenizer.decode(row, skip_special_tokens=True))
    return replies


@torch.no_grad()
def clean_loss(model: torch.nn.Module, samples: Sequence[Sample], pad_id: int, batch_size: int = 16) -> float:
    """Mean NLL of the scored response tokens (Sample.answer, or the whole response) of clean samples."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        for i, s in enumerate(chunk):
            ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
            scored = s.answer or [True] * len(s.response)
            labels[i, len(s.prompt) : len(s.input_ids)] = torch.tensor(
                [t if keep else -100 for t, keep in zip(s.response, scored, strict=True)]
            )
        mask = (torch.arange(width)[None] < torch.tensor([len(s.input_ids) for s in chunk])[:, None]).long()
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels[:, 1:].to(device), reduction="sum", ignore_index=-100
        )
        total, count = total + nll.item(), count + (labels[:, 1:] != -100).sum().item()
    return total / count
