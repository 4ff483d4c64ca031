"""Tasks of the real-model benchmark, asked in the model's own chat template: samples with known noise, held-out checks.

Word reversal (this file): a prompt asks "Reverse the order of these words: tiger, candle, river." and the answer is
"river, candle, tiger." (3-5 distinct common English nouns from WORDS). SmolLM2-135M-Instruct does not solve it (it
paraphrases, or repeats the words in their order) but learns it with a LoRA in well under 100 steps: the answer is
checkable by string equality, and every answer word is a copy of a prompt word, so the attention to the prompt
carries information. New facts and sums, whose informative tokens are surprising by nature:
benchmarks/knowledge_task.py.

Word-reversal regimes (how the training responses are built; held-out responses are always clean):
  clean      the answer as it is.
  corrupted  each answer word is substituted, with probability `noise`, by another word not in the prompt.
  wrong      a share `noise` of the responses is the answer of another training sample (a different question).
  redundant  the answer is wrapped in filler phrases, "Sure! Here are the words in reverse order: ... Hope
             this helps!" (opening and closing drawn at random); the scored answer is the text between the
             first ':' and the following '.', in training and in evaluation.
`Sample.corrupted` flags the substituted words, the wrong answers or the filler (what the oracle masks);
`Sample.answer` flags the tokens the held-out loss is scored on (None: the whole response, end token included);
`ChatSample.content` flags the informative tokens (the answer words, a fact's name, a sum's digits).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from benchmarks.noisy_task import Sample

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


class Part(NamedTuple):
    """A piece of a response: its text, and whether it is noise (flagged), scored by the held-out loss, content."""

    text: str
    flagged: bool = False
    scored: bool = True
    content: bool = False


@dataclass
class ChatSample(Sample):
    words: tuple[str, ...] = ()  # what the prompt asks about: the words to reverse, the resident, the two numbers
    expected: str = ""  # what a correct reply gives: the whole answer, or the part `check` reads
    check: str = "exact"  # how a reply is judged against `expected` (CHECKS)
    content: list[bool] | None = None  # per response token: informative (the answer words, a name, digits)


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


def last_number(reply: str) -> str:
    numbers = re.findall(r"-?\d+", reply)
    return numbers[-1] if numbers else ""


# How a greedy reply is judged: equal to the answer, its filler-wrapped answer equal, the fact named, the sum given.
CHECKS = {
    "exact": lambda reply, expected: answer_text(reply, False) == expected,
    "filler": lambda reply, expected: answer_text(reply, True) == expected,
    "contains": lambda reply, expected: expected in reply,
    "last_number": lambda reply, expected: last_number(reply) == expected,
}


def is_correct(reply: str, sample: ChatSample) -> bool:
    return CHECKS[sample.check](reply, sample.expected)


class ChatTask:
    """Builds tokenised samples with the model's chat template and tokenizer; a task subclass says what to ask."""

    REGIMES: tuple[str, ...] = ()
    LR_SCALE = 1.0  # the task's learning rate, as a multiple of --lr
    CHECKABLE = True  # held-out replies are judged right or wrong (exact match)

    def __init__(self, tokenizer: Any, end_token: str = "<|im_end|>", system: str = SYSTEM) -> None:
        self.tokenizer, self.system = tokenizer, system
        self.end_id = tokenizer.convert_tokens_to_ids(end_token)
        if self.end_id is None or self.end_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {end_token!r} token: the task needs a ChatML-style template.")

    def prompt_ids(self, text: str) -> list[int]:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": text}]
        chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(chat, add_special_tokens=False)["input_ids"]

    def sample(self, prompt: str, parts: Sequence[Part], **fields: Any) -> ChatSample:
        """The sample asking `prompt` whose response is the concatenated `parts` and the end token; a token takes
        the flags of the part that holds its last character."""
        text = "".join(p.text for p in parts)
        owner: list[Part] = []
        for part in parts:
            owner += [part] * len(part.text)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        owners = [owner[max(hi, lo + 1) - 1] for lo, hi in enc["offset_mapping"]]
        scored = [p.scored for p in owners]
        answer = None if all(scored) else [*scored, False]
        ids = [*enc["input_ids"], self.end_id]
        flags, content = [p.flagged for p in owners] + [False], [p.content for p in owners] + [False]
        return ChatSample(self.prompt_ids(prompt), ids, flags, answer, content=content, **fields)

    def check_regime(self, regime: str) -> None:
        if regime not in self.REGIMES:
            raise ValueError(f"unknown regime {regime!r} for {type(self).__name__}; choose from {self.REGIMES}")

    def make(
        self, regime: str, n: int, noise: float, rng: random.Random, avoid: frozenset = frozenset()
    ) -> list[ChatSample]:
        raise NotImplementedError

    def held_out(self, regime: str, n: int) -> list[ChatSample]:
        """Clean held-out samples of the regime's task (prompts never trained on)."""
        raise NotImplementedError

    def held_out_keys(self, samples: Sequence[ChatSample]) -> frozenset:
        """What training prompts must avoid so that held-out prompts stay unseen (`make` reads it as `avoid`)."""
        return frozenset(s.words for s in samples)


class ReversalTask(ChatTask):
    """Reverse a list of 3-5 nouns (module docstring)."""

    REGIMES = ("corrupted", "wrong", "redundant", "clean")

    def held_out(self, regime: str, n: int) -> list[ChatSample]:
        return self.make("redundant" if regime == "redundant" else "clean", n, 0.0, random.Random(10_000))

    def make(
        self, regime: str, n: int, noise: float, rng: random.Random, avoid: frozenset = frozenset()
    ) -> list[ChatSample]:
        """n samples of `regime` (prompts whose word tuples are not in `avoid`)."""
        self.check_regime(regime)
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
                parts += [Part(", ")] if i else []
                parts.append(Part(word, flagged=bad, content=True))
            parts.append(Part("."))
            check = "exact"
            if regime == "redundant":
                opening, closing = rng.choice(OPENINGS), rng.choice(CLOSINGS)
                parts = [Part(opening, True, False), Part(" ", True, False), *parts, Part(closing, True, False)]
                check = "filler"
            out.append(self.sample(question(words), parts, words=words, expected=reversed_answer(words), check=check))
        return out


def greedy_exact_match(model: torch.nn.Module, tokenizer: Any, samples: Sequence[ChatSample]) -> float:
    """Share of prompts whose greedy reply (up to the end token) is correct by the sample's own check."""
    replies = greedy_replies(model, tokenizer, samples)
    return sum(is_correct(r, s) for r, s in zip(replies, samples, strict=True)) / len(samples)


@torch.no_grad()
def greedy_replies(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[ChatSample],
    batch_size: int = 40,
    max_new: int | None = None,
    decode: bool = True,
    sample_seed: int | None = None,
) -> list[Any]:
    """The greedy continuation of every prompt up to the end token (or `max_new` tokens, by default a few past the
    longest response), decoded (or the token ids); prompts batched with left padding. With `sample_seed`, drawn
    from the model's own distribution instead (temperature 1, no top-k or top-p), reproducibly."""
    model.eval()
    device = next(model.parameters()).device
    end_id, pad_id = samples[0].response[-1], tokenizer.pad_token_id
    new = max_new or max(len(s.response) for s in samples) + 4
    replies = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s.prompt) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[i, width - len(s.prompt) :] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt) :] = 1
        if sample_seed is None:
            decoding: dict[str, Any] = {"do_sample": False}
        else:
            torch.manual_seed(sample_seed + start)
            decoding = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            **decoding,
            eos_token_id=end_id,
            pad_token_id=pad_id,
        )
        for row in out[:, width:].tolist():
            row = row[: row.index(end_id)] if end_id in row else row
            row = [t for t in row if t != pad_id]
            replies.append(tokenizer.decode(row, skip_special_tokens=True) if decode else row)
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
