"""Tasks whose informative tokens are surprising by nature: new facts and computed sums, clean and noisy.

What people fine-tune for is often content the base model cannot predict: names it has never seen, numbers it must
compute. A selection that drops what the model finds surprising drops exactly that content, so these regimes test
whether a selection keeps new knowledge while it removes noise.

new_facts        Made-up residents of made-up towns (PEOPLE residents, names built from syllables, so the base cannot
                 know them), each asked in FACT_FORMS question forms ("Where does Orla Venmark live?" -> "Orla Venmark
                 lives in Dunholt."); two more forms (HELD_OUT_FORMS) are never trained on and ask every resident on
                 held-out evaluation. Correct: the reply names the right town. Loss: the town's tokens.
new_facts_noisy  The same, and a share `noise` of the training answers names another resident's town (a wrong fact).
sums             "What is 47 + 38?" -> "47 + 38 = 85." over two-digit numbers; the base gets few right even given the
                 "47 + 38 =" prefix. Held out: pairs never trained on. Correct: the reply's last number is the sum.
                 Loss: the sum's digits.
sums_noisy       The same, and a share `noise` of the training sums is off by 1 to 10 (a wrong answer).
The town's tokens, or the sum's digits, are the content. In a wrong answer the town's tokens are flagged (what the
oracle masks), and the sum's digits from the first wrong one on.
"""

from __future__ import annotations

import os
import random

from benchmarks.real_task import ChatSample, ChatTask, Part

SYLLABLES = "bra dor fen gal hur ist jor kel lum mor nev ost pra quil ros sar tov ulm vek wyn yar zel".split()
TOWN_ENDS = ("holt", "wick", "mere", "dale", "ford", "by")
PEOPLE = 24  # residents: 320 training samples ask each of them 13 or 14 times
WORLD_SEED = 7  # the residents and their towns are the same for every training seed
FACT_FORMS = (  # (question, answer) with {name} and {town}: trained on
    ("Where does {name} live?", "{name} lives in {town}."),
    ("Which town is home to {name}?", "{town} is home to {name}."),
    ("Tell me where {name} lives.", "{name} lives in {town}."),
    ("What is {name}'s hometown?", "{name}'s hometown is {town}."),
    ("Name the town where {name} lives.", "{town}."),
)
HELD_OUT_FORMS = (  # never trained on: each asks every resident once on held-out evaluation
    ("In which town does {name} live?", "{name} lives in {town}."),
    ("{name} is a resident of which town?", "{name} lives in {town}."),
)


def made_up(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def residents(n: int = PEOPLE, seed: int = WORLD_SEED) -> list[tuple[str, str]]:
    """n (name, town) pairs of made-up residents of made-up towns, every name and town distinct."""
    rng = random.Random(seed)
    names: dict[str, str] = {}
    while len(names) < n:
        name = f"{made_up(rng, 2)} {made_up(rng, 2)}"
        town = made_up(rng, rng.randint(1, 2)) + rng.choice(TOWN_ENDS)
        if name not in names and town not in names.values():
            names[name] = town
    return list(names.items())


def fact_parts(answer: str, name: str, town: str, wrong: bool) -> list[Part]:
    """The answer template filled in, the town as content (flagged when it is the wrong one)."""
    before, _, after = answer.partition("{town}")
    return [Part(before.format(name=name)), Part(town, flagged=wrong, content=True), Part(after.format(name=name))]


class FactsTask(ChatTask):
    """Made-up residents and their towns (module docstring)."""

    REGIMES = ("new_facts", "new_facts_noisy")
    LR_SCALE = 4.0  # memorising associations is slower than learning a skill: 2e-3 at the default --lr

    def __init__(self, tokenizer, **kwargs) -> None:
        super().__init__(tokenizer, **kwargs)
        self.world = residents()

    def make(
        self, regime: str, n: int, noise: float, rng: random.Random, avoid: frozenset = frozenset()
    ) -> list[ChatSample]:
        """n samples: resident i % PEOPLE in form (i // PEOPLE) % forms, in an order drawn by `rng`."""
        self.check_regime(regime)
        out = []
        for i in range(n):
            name, town = self.world[i % len(self.world)]
            question, answer = FACT_FORMS[(i // len(self.world)) % len(FACT_FORMS)]
            said = town
            if regime == "new_facts_noisy" and rng.random() < noise:
                said = rng.choice([t for _, t in self.world if t != town])
            parts = fact_parts(answer, name, said, wrong=said != town)
            out.append(self.sample(question.format(name=name), parts, words=(name,), expected=town, check="contains"))
        rng.shuffle(out)
        return out

    def held_out(self, regime: str, n: int) -> list[ChatSample]:
        """Every resident once in each question form never trained on (n is ignored)."""
        out = []
        for question, answer in HELD_OUT_FORMS:
            before, _, after = answer.partition("{town}")
            for name, town in self.world:
                parts = [
                    Part(before.format(name=name), scored=False),
                    Part(town, content=True),
                    Part(after, scored=False),
                ]
                out.append(
                    self.sample(question.format(name=name), parts, words=(name,), expected=town, check="contains")
                )
        return out


class SumsTask(ChatTask):
    """Two-digit sums (module docstring)."""

    REGIMES = ("sums", "sums_noisy")

    def make(
        self, regime: str, n: int, noise: float, rng: random.Random, avoid: frozenset = frozenset()
    ) -> list[ChatSample]:
        """n samples with pairs not in `avoid`; with noise a share of the sums is off by 1 to 10."""
        self.check_regime(regime)
        out = []
        while len(out) < n:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if (str(a), str(b)) in avoid:
                continue
            total = said = a + b
            if regime == "sums_noisy" and rng.random() < noise:
                said = total + rng.choice([d for d in range(-10, 11) if d])
            out.append(self.sum_sample(a, b, total, said))
        return out

    def sum_sample(self, a: int, b: int, total: int, said: int, scored_only_sum: bool = False) -> ChatSample:
        right = len(os.path.commonprefix([str(said), str(total)]))  # digits from the first wrong one are flagged
        parts = [
            Part(f"{a} + {b} = ", scored=not scored_only_sum),
            Part(str(said)[:right], content=True),
            Part(str(said)[right:], flagged=True, content=True),
            Part(".", scored=not scored_only_sum),
        ]
        question = f"What is {a} + {b}?"
        return self.sample(question, parts, words=(str(a), str(b)), expected=str(total), check="last_number")

    def held_out(self, regime: str, n: int) -> list[ChatSample]:
        rng = random.Random(10_000)
        pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
        return [self.sum_sample(a, b, a + b, a + b, scored_only_sum=True) for a, b in pairs]
