"""Real multi-turn conversations from the `chitchat-dataset` package, as `messages` samples.

The package (`pip install chitchat-dataset`, MIT) ships 7,168 two-person chats as one JSON file: each conversation
is a list of turns, each turn one or more messages of the same sender. Here the first speaker is the user and the
other the assistant, a turn's messages are joined by newlines, empty messages are left out (and two turns of the
same speaker that meet once an empty turn is gone are joined), and a conversation with no reply is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sstoken_trl.tools.loading import package_folder

PACKAGE = "chitchat_dataset"
DATA_FILE = "dataset.json"


def chitchat_file() -> Path:
    """The JSON file of the installed package, or a FileNotFoundError that says how to install it."""
    folder = package_folder(PACKAGE)
    if folder is None or not (folder / DATA_FILE).is_file():
        raise FileNotFoundError(
            "The chitchat conversations need the chitchat-dataset package: pip install chitchat-dataset"
        )
    return folder / DATA_FILE


def conversation_messages(turns: list[list[dict[str, Any]]]) -> list[dict[str, str]]:
    """One conversation's turns as alternating user / assistant messages (see the module docstring)."""
    merged: list[tuple[str, str]] = []
    for turn in turns:
        text = "\n".join(m["text"].strip() for m in turn if m["text"].strip())
        if not text:
            continue
        sender = turn[0]["sender"]
        if merged and merged[-1][0] == sender:
            merged[-1] = (sender, merged[-1][1] + "\n" + text)
        else:
            merged.append((sender, text))
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": text} for k, (_, text) in enumerate(merged)]


def chitchat_conversations(max_turns: int | None = None) -> Iterator[dict[str, Any]]:
    """Every conversation with at least one reply, as `{"id", "messages"}` (its first `max_turns` turns)."""
    for key, conversation in json.loads(chitchat_file().read_text()).items():
        messages = conversation_messages(conversation["messages"])[:max_turns]
        if len(messages) >= 2:
            yield {"id": key, "messages": messages}


def write_chitchat(path: str | Path, count: int, max_turns: int | None = None) -> Path:
    """Write the first `count` conversations as a .jsonl file of `messages` rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in chitchat_conversations(max_turns):
        rows.append(json.dumps({"messages": row["messages"]}) + "\n")
        if len(rows) == count:
            break
    path.write_text("".join(rows), encoding="utf-8")
    return path


__all__ = ["chitchat_conversations", "chitchat_file", "conversation_messages", "write_chitchat"]
