"""Assistant spans of a conversation whose chat template has no `{% generation %}` blocks.

Many released templates (SmolLM2's ChatML, for one) carry no generation markers, and TRL patches only the templates
it knows, so `assistant_only_loss=True` refuses them. The spans can still be found exactly from the rendered text:
1. render the conversation once with each assistant message's content replaced by a unique sentinel, and read off
   where each sentinel landed; put the contents back and check the result is the template's own rendering of the
   real conversation (so the template inserted the contents verbatim, whatever else it adds around them);
2. if it did not (a template that transforms contents), render the prefix before each assistant message with the
   generation prompt: a prefix-preserving template renders exactly the text that precedes that message's content.
A response is the assistant content plus the special token that closes the turn when one follows the content
directly (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), as a `{% generation %}` block would mark it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

SENTINEL = "\ue000{}\ue001"  # private-use characters: no real text contains them (checked)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def _check_plain(messages: Sequence[dict[str, Any]]) -> None:
    for k, message in enumerate(messages):
        if message["role"] == "assistant" and (
            not isinstance(message.get("content"), str) or message.get("tool_calls")
        ):
            raise ValueError(
                f"Message {k} is an assistant message with tool calls or structured content, and the chat template "
                "has no {% generation %} markers to say which rendered tokens are the assistant's. Add "
                "{% generation %} ... {% endgeneration %} around the assistant turn in tokenizer.chat_template."
            )


def _by_sentinels(tokenizer, messages, tools, text: str, assistants: list[int]) -> list[int] | None:
    """Start offset of each assistant content in `text`, or None if the template does not insert them verbatim."""
    if any("\ue000" in (m.get("content") or "") for m in messages):
        return None
    marked = [dict(m, content=SENTINEL.format(k)) if k in assistants else m for k, m in enumerate(messages)]
    marked_text = _render(tokenizer, marked, tools)
    pieces, starts, pos, length = [], [], 0, 0
    for k in assistants:
        sentinel = SENTINEL.format(k)
        at = marked_text.find(sentinel, pos)
        if at < 0 or marked_text.count(sentinel) != 1:
            return None
        pieces += [marked_text[pos:at], messages[k]["content"]]
        length += at - pos
        starts.append(length)
        length += len(messages[k]["content"])
        pos = at + len(sentinel)
    pieces.append(marked_text[pos:])
    return starts if "".join(pieces) == text else None


def _by_prefixes(tokenizer, messages, tools, text: str, assistants: list[int]) -> list[int]:
    """Start offset of each assistant content: the length of the rendered prefix with the generation prompt."""
    starts = []
    for k in assistants:
        prefix = _render(tokenizer, messages[:k], tools, add_generation_prompt=True)
        content = messages[k]["content"]
        if not text.startswith(prefix) or not text.startswith(content, len(prefix)):
            raise ValueError(
                f"Cannot locate assistant message {k} in the rendered conversation: the chat template has no "
                "{% generation %} markers, does not insert the message's content verbatim, and its rendering of the "
                "conversation up to that message (with add_generation_prompt=True) is not a prefix of the whole. Add "
                "{% generation %} ... {% endgeneration %} around the assistant turn in tokenizer.chat_template."
            )
        starts.append(len(prefix))
    return starts


def _closing_token(tokenizer: PreTrainedTokenizerBase, text: str, at: int) -> int:
    """Length of the special token that starts at `text[at]` (the end-of-turn), 0 if none does."""
    specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    return max((len(s) for s in specials if s and text.startswith(s, at)), default=0)


def rendered_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any = None
) -> tuple[str, list[tuple[int, int]]]:
    """The template's rendering of `messages` and each assistant response's character span [start, end) in it."""
    _check_plain(messages)
    text = _render(tokenizer, messages, tools)
    assistants = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    starts = _by_sentinels(tokenizer, messages, tools, text, assistants)
    if starts is None:
        starts = _by_prefixes(tokenizer, messages, tools, text, assistants)
    spans = []
    for k, start in zip(assistants, starts, strict=True):
        end = start + len(messages[k]["content"])
        spans.append((start, end + _closing_token(tokenizer, text, end)))
    return text, spans


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 on tokens whose characters lie inside a span (a token straddling a span's edge stays prompt). Offsets
    and spans both run left to right, so one sweep over the two suffices."""
    mask, k = [], 0
    for s, e in offsets:
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        mask.append(int(s < e and k < len(spans) and spans[k][0] <= s and e <= spans[k][1]))
    return mask


__all__ = ["rendered_assistant_spans", "span_mask"]
