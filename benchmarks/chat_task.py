"""The paper's setting in miniature: fine-tuning on real, varied conversations (chitchat-dataset), no single task.

chat   Exchanges (a user turn and the assistant's reply) of real two-person chats (sstoken_trl/tools/chitchat.py),
       drawn per seed from the first TRAIN_CONVERSATIONS conversations; held out: one exchange of each of the next
       ones (HELD_OUT_CONVERSATIONS). Nothing is flagged and no reply is checkable: "learned" is the held-out replies'
       loss (NLL per reply token, end token included); exact match is not reported. Other ranges of the same data
       serve the chat-drift probe (benchmarks/kept_probe.py) and replay (benchmarks/replay.py), never trained here.
"""

from __future__ import annotations

import random
from functools import cache
from typing import Any

from benchmarks.real_task import ChatSample, ChatTask, Part
from sstoken_trl.tools.chitchat import chitchat_conversations

TRAIN_CONVERSATIONS = (0, 3000)
HELD_OUT_CONVERSATIONS = (3000, 3100)
MAX_TOKENS = 40  # an exchange is used when its user turn and its reply each fit: steps cost what other regimes do


@cache
def conversations() -> tuple[tuple[tuple[str, str], ...], ...]:
    """Every conversation's exchanges, (user turn, assistant reply) in order."""
    out = []
    for row in chitchat_conversations():
        m = row["messages"]
        out.append(tuple((m[k]["content"], m[k + 1]["content"]) for k in range(0, len(m) - 1, 2)))
    return tuple(out)


def user_turns(lo: int, hi: int, tokenizer: Any) -> list[str]:
    """The first user turn of conversations lo..hi-1 that fits MAX_TOKENS (prompts of the drift probe, replay)."""
    turns = [c[0][0] for c in conversations()[lo:hi]]
    return [t for t in turns if len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= MAX_TOKENS]


class ChatConversationsTask(ChatTask):
    """Real chat exchanges (module docstring)."""

    REGIMES = ("chat",)
    CHECKABLE = False  # no exact match: the held-out reply loss is what it learned

    def fits(self, user: str, reply: str) -> bool:
        count = lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        return count(user) <= MAX_TOKENS and 0 < count(reply) <= MAX_TOKENS

    def exchange(self, user: str, reply: str) -> ChatSample:
        return self.sample(user, [Part(reply, content=True)], words=(user,))

    def make(
        self, regime: str, n: int, noise: float, rng: random.Random, avoid: frozenset = frozenset()
    ) -> list[ChatSample]:
        """n exchanges drawn without replacement from the training conversations (noise is not used)."""
        self.check_regime(regime)
        lo, hi = TRAIN_CONVERSATIONS
        pool = [pair for c in conversations()[lo:hi] for pair in c]
        rng.shuffle(pool)
        out = []
        for user, reply in pool:
            if (user,) not in avoid and self.fits(user, reply):
                out.append(self.exchange(user, reply))
                if len(out) == n:
                    return out
        raise ValueError(f"only {len(out)} exchanges of the training conversations fit; asked for {n}")

    def held_out(self, regime: str, n: int) -> list[ChatSample]:
        """The first exchange that fits of each held-out conversation, at most n."""
        lo, hi = HELD_OUT_CONVERSATIONS
        out = []
        for c in conversations()[lo:hi]:
            pair = next((p for p in c if self.fits(*p)), None)
            if pair is not None and len(out) < n:
                out.append(self.exchange(*pair))
        return out

    def held_out_keys(self, samples: Any) -> frozenset:
        return frozenset(s.words for s in samples)
