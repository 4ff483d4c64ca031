"""Real multi-turn data: every chitchat conversation through `pretokenize` with SmolLM2's ChatML template (no
`{% generation %}` blocks), and the span of every assistant turn checked against its text, over the whole set."""

from __future__ import annotations

import itertools
import json

from datasets import Dataset

from sstoken_trl import pretokenize
from sstoken_trl.tools.chitchat import chitchat_conversations, chitchat_file, conversation_messages, write_chitchat
from sstoken_trl.tools.loading import load_tokenizer
from tests.test_real_model import GGUF


def labelled_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    runs = itertools.groupby(zip(input_ids, labels, strict=True), key=lambda pair: pair[1] != -100)
    return [[token for token, _ in run] for labelled, run in runs if labelled]


def test_every_assistant_turn_of_every_conversation_is_exactly_its_span():
    tokenizer = load_tokenizer(GGUF)
    rows = list(chitchat_conversations())
    raw = json.loads(chitchat_file().read_text())
    assert len(raw) == 7168
    # Every conversation with a reply is kept; the others (a single speaker) have nothing to train on.
    assert len(rows) == sum(len(conversation_messages(c["messages"])) >= 2 for c in raw.values()) > 4000
    data = pretokenize(Dataset.from_list([{"messages": r["messages"]} for r in rows]), tokenizer, num_proc=2)
    assert len(data) == len(rows)  # no conversation dropped
    eos, turns = tokenizer.eos_token, 0
    for row, encoded in zip(rows, data, strict=True):
        expected = [m["content"] + eos for m in row["messages"] if m["role"] == "assistant"]
        decoded = [tokenizer.decode(run) for run in labelled_runs(encoded["input_ids"], encoded["labels"])]
        assert decoded == expected, row["id"]
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert encoded["input_ids"] == list(rendered), row["id"]  # the template's own tokens, nothing re-spaced
        turns += len(expected)
    assert turns > 60000


def test_speakers_alternate_and_empty_messages_are_left_out():
    turns = [
        [{"sender": "a", "text": "hi"}, {"sender": "a", "text": "  "}],
        [{"sender": "b", "text": " "}],
        [{"sender": "a", "text": "anyone there?"}],
        [{"sender": "b", "text": "yes"}, {"sender": "b", "text": "sorry"}],
    ]
    assert conversation_messages(turns) == [
        {"role": "user", "content": "hi\nanyone there?"},
        {"role": "assistant", "content": "yes\nsorry"},
    ]


def test_demo_data_file(tmp_path):
    path = write_chitchat(tmp_path / "chat.jsonl", 5, max_turns=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and all(2 <= len(r["messages"]) <= 4 for r in rows)
    assert all(m["role"] == ("user", "assistant")[k % 2] for r in rows for k, m in enumerate(r["messages"]))
