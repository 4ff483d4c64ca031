"""A synthetic instruction task with a word-level vocabulary, known corruptions and exact-match evaluation.

A sample is `<s> <|User|> OP x1 .. xn <|Assistant|> y1 .. ym </s>` over single-letter words. The base model
learns `copy` and `reverse`; fine-tuning teaches `shift` (each letter becomes the next one, cyclically), with a
share of response tokens corrupted: a random wrong letter substituted, or a random letter inserted. With
`filler=True` the answer is wrapped in uninformative phrases, `OPENING : y1 .. ym . CLOSING </s>` (the phrases
drawn at random, independent of the prompt); the answer is then the letters between `:` and `.`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sstoken_trl.tools.tiny import ASSISTANT_TAG, USER_TAG

LETTERS = [chr(c) for c in range(ord("a"), ord("a") + 20)]
OPS = ("copy", "reverse", "shift")
SPECIAL = ["<pad>", "<s>", "</s>", USER_TAG, ASSISTANT_TAG]
OPENINGS = (("sure", "here", "is", "the", "result"), ("of", "course", "the", "answer", "is"), ("ok",), ("well",))
CLOSINGS = (("hope", "this", "helps"), ("glad", "to", "help"), ("done",), ())
FILLER = sorted({w for phrase in OPENINGS + CLOSINGS for w in phrase})
OPEN_ANSWER, CLOSE_ANSWER = ":", "."
VOCAB = SPECIAL + list(OPS) + LETTERS + FILLER + [OPEN_ANSWER, CLOSE_ANSWER]
PAD, BOS, EOS = 0, 1, 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB (one id per op word and letter)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[USER_TAG, ASSISTANT_TAG],
    )


ID = {w: i for i, w in enumerate(VOCAB)}
LETTER_IDS = [ID[c] for c in LETTERS]


def answer(op: str, letters: Sequence[str]) -> list[str]:
    if op == "copy":
        return list(letters)
    if op == "reverse":
        return list(reversed(letters))
    return [LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in letters]


@dataclass
class Sample:
    prompt: list[int]  # <s> <|User|> op letters <|Assistant|>
    response: list[int]  # answer letters </s>, possibly corrupted
    corrupted: list[bool]  # per response token: corrupted, or filler (what the oracle masks)
    answer: list[bool] | None = None  # per response token: scored by the held-out loss (None: all of them)

    @property
    def input_ids(self) -> list[int]:
        return self.prompt + self.response

    def row(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": [-100] * len(self.prompt) + self.response}


def make_samples(
    ops: Sequence[str], n: int, rng: random.Random, lengths: tuple[int, int] = (3, 8), filler: bool = False
) -> list[Sample]:
    """n clean samples, op drawn uniformly from `ops`, 3-8 distinct letters; `filler`: wrapped in phrases."""
    out = []
    for _ in range(n):
        op = rng.choice(list(ops))
        letters = rng.sample(LETTERS, rng.randint(*lengths))
        prompt = [BOS, ID[USER_TAG], ID[op], *(ID[c] for c in letters), ID[ASSISTANT_TAG]]
        reply = [ID[c] for c in answer(op, letters)]
        if not filler:
            out.append(Sample(prompt, reply + [EOS], [False] * (len(reply) + 1)))
            continue
        opening, closing = [ID[w] for w in rng.choice(OPENINGS)], [ID[w] for w in rng.choice(CLOSINGS)]
        response = [*opening, ID[OPEN_ANSWER], *reply, ID[CLOSE_ANSWER], *closing, EOS]
        is_filler = [True] * len(opening) + [False] * (len(reply) + 2) + [True] * len(closing) + [False]
        is_answer = [False] * (len(opening) + 1) + [True] * len(reply) + [False] * (len(closing) + 2)
        out.append(Sample(prompt, response, is_filler, is_answer))
    return out


def answer_part(tokens: list[int]) -> list[int] | None:
    """The letters between the first `:` and the next `.` (None when either is missing)."""
    if ID[OPEN_ANSWER] not in tokens:
        return None
    rest = tokens[tokens.index(ID[OPEN_ANSWER]) + 1 :]
    return rest[: rest.index(ID[CLOSE_ANSWER])] if ID[CLOSE_ANSWER] in rest else None


def corrupt(sample: Sample, share: float, rng: random.Random) -> Sample:
    """Corrupt each answer letter with probability `share`: substitute a wrong letter, or insert one before it."""
    response, corrupted = [], []
    for token in sample.response[:-1]:
        if rng.random() < share:
            response.append(rng.choice([t for t in LETTER_IDS if t != token]))
            corrupted.append(True)
            if rng.random() < 0.5:  # a substitution: the wrong letter takes the right one's place
                continue
        response.append(token)
        corrupted.append(False)
    return Sample(sample.prompt, response + [EOS], corrupted + [False])


def oracle_row(sample: Sample) -> dict[str, list[int]]:
    """The sample with its corrupted (or filler) tokens' labels masked: what a perfect selection would train."""
    labels = [-100 if bad else token for token, bad in zip(sample.response, sample.corrupted, strict=True)]
    return {"input_ids": sample.input_ids, "labels": [-100] * len(sample.prompt) + labels}


@torch.no_grad()
def greedy_exact_match(model: torch.nn.Module, samples: Sequence[Sample], max_new: int = 22) -> float:
    """Share of samples whose greedy continuation of the prompt equals the clean response, </s> included
    (with filler: whose answer part, the letters between `:` and `.`, equals the clean answer)."""
    model.eval()
    by_length: dict[int, list[Sample]] = {}
    for s in samples:
        by_length.setdefault(len(s.prompt), []).append(s)
    device = next(model.parameters()).device
    correct = 0
    for group in by_length.values():
        ids = torch.tensor([s.prompt for s in group], device=device)
        done = torch.zeros(len(group), dtype=torch.bool, device=device)
        for _ in range(max_new):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            nxt = torch.where(done, PAD, logits.argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if done.all():
                break
        for row, s in zip(ids.tolist(), group, strict=True):
            out = row[len(s.prompt) :]
            out = out[: out.index(EOS) + 1] if EOS in out else out
            if s.answer is None:
                correct += out == s.response
            else:
                correct += answer_part(out) == answer_part(s.response)
    return correct / len(samples)


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, samples: Sequence[Sample], batch_size: int = 256) -> dict[str, float]:
    """On the clean responses: mean NLL of the scored tokens (all, or the answer with filler), of the answer
    letters and of </s>, and the letters' argmax accuracy."""
    model.eval()
    device = next(model.parameters()).device
    sums = dict.fromkeys(("nll", "nll_letters", "nll_eos", "letters_right", "tokens", "letters", "eos"), 0.0)
    letter_ids = torch.tensor(LETTER_IDS, device=next(model.parameters()).device)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), width), PAD)
        labels = torch.full((len(chunk), width), -100)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, s in enumerate(chunk):
            ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
            labels[i, len(s.prompt) : len(s.input_ids)] = torch.tensor(s.response)
            scored[i, len(s.prompt) : len(s.input_ids)] = torch.tensor(s.answer or [True] * len(s.response))
        ids, labels, scored = ids.to(device), labels.to(device)[:, 1:], scored.to(device)[:, 1:]
        logits = model(input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        eos, letters = labels == EOS, torch.isin(labels, letter_ids) & scored
        sums["nll"] += nll[scored].sum().item()
        sums["nll_letters"] += nll[letters].sum().item()
        sums["nll_eos"] += nll[eos].sum().item()
        sums["letters_right"] += (logits.argmax(-1) == labels)[letters].sum().item()
        sums["tokens"] += scored.sum().item()
        sums["letters"] += letters.sum().item()
        sums["eos"] += eos.sum().item()
    return {
        "clean_loss": sums["nll"] / sums["tokens"],
        "clean_loss_letters": sums["nll_letters"] / sums["letters"],
        "clean_loss_eos": sums["nll_eos"] / sums["eos"],
        "letter_accuracy": sums["letters_right"] / sums["letters"],
    }
