"""Assistant spans of a conversation whose chat template has no `{% generation %}` blocks.

Many released templates (SmolLM2's ChatML, for one) carry no generation markers, and TRL patches only the templates
it knows, so `assistant_only_loss=True` refuses them. The spans can still be found exactly from the rendered text:
1. render the conversation once with each assistant message's content replaced by a unique sentinel: the text
   between the sentinels is the template's own (tags, user turns, end-of-turn tokens). The real rendering must be
   that text with each content put back, verbatim or with whitespace stripped from its ends (a template that
   renders `content | trim`), every character accounted for;
2. if it is not (the text around a content depends on the content), render the prefix before each assistant
   message with the generation prompt: a prefix-preserving template renders exactly the text that precedes that
   message's content, which must follow verbatim.
A response is the content as rendered plus the special token that closes the turn when one follows the content
directly (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`): what a `{% generation %}` block around the two would mark.
Tokens are then marked as `return_assistant_tokens_mask` marks them: every token with a character in a span, so a
token that merges the template's text with the first word of the content (`": gamma"` -> `":"`, `" gamma"`) is a
response token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

SENTINEL = "\ue000{}\ue001"  # private-use characters: no real text contains them (checked)
FIX = (
    "To train on it, add {% generation %} ... {% endgeneration %} around the assistant content and its "
    "end-of-turn token in tokenizer.chat_template."
)


class UnlocatedContent(ValueError):
    """An assistant message that cannot be found in the template's rendering `text` of the conversation."""

    def __init__(self, message: str, text: str):
        super().__init__(message)
        self.text = text


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def _check_plain(messages: Sequence[dict[str, Any]], text: str) -> None:
    for k, message in enumerate(messages):
        if message["role"] == "assistant" and (
            not isinstance(message.get("content"), str) or message.get("tool_calls")
        ):
            raise UnlocatedContent(
                f"Message {k} is an assistant message with tool calls or structured content, and the chat template "
                f"has no {{% generation %}} markers to say which rendered tokens are the assistant's. {FIX}",
                text,
            )


def rendered_forms(content: str) -> list[str]:
    """The forms in which a template may render a content, in the order tried: verbatim, then stripped of
    whitespace at both ends (`| trim`), at the end only, at the start only."""
    forms = [content, content.strip(), content.rstrip(), content.lstrip()]
    return [form for k, form in enumerate(forms) if form not in forms[:k]]


def _by_sentinels(tokenizer, messages, tools, text: str, assistants: list[int]) -> list[tuple[int, int]] | None:
    """Span [start, end) of each assistant content as rendered in `text`, or None if the template's text around
    the contents depends on them, or a content is rendered other than verbatim or stripped."""
    if any("\ue000" in (m.get("content") or "") for m in messages):
        return None
    marked = [dict(m, content=SENTINEL.format(k)) if k in assistants else m for k, m in enumerate(messages)]
    marked_text = _render(tokenizer, marked, tools)
    pieces, pos = [], 0  # the template's text before, between and after the sentinels
    for k in assistants:
        sentinel = SENTINEL.format(k)
        at = marked_text.find(sentinel, pos)
        if at < 0 or marked_text.count(sentinel) != 1:
            return None
        pieces.append(marked_text[pos:at])
        pos = at + len(sentinel)
    pieces.append(marked_text[pos:])
    if not text.startswith(pieces[0]):
        return None
    spans, pos = [], len(pieces[0])
    for k, after in zip(assistants, pieces[1:], strict=True):
        shown = next((f for f in rendered_forms(messages[k]["content"]) if text.startswith(f + after, pos)), None)
        if shown is None:
            return None
        spans.append((pos, pos + len(shown)))
        pos += len(shown) + len(after)
    return spans if pos == len(text) else None


def _by_prefixes(tokenizer, messages, tools, text: str, assistants: list[int]) -> list[tuple[int, int]]:
    """Span of each assistant content: it follows, verbatim, the rendered prefix with the generation prompt."""
    spans = []
    for k in assistants:
        prefix = _render(tokenizer, messages[:k], tools, add_generation_prompt=True)
        content = messages[k]["content"]
        if not text.startswith(prefix) or not text.startswith(content, len(prefix)):
            raise UnlocatedContent(
                f"Cannot locate assistant message {k} in the chat template's rendering of the conversation: the "
                "template has no {% generation %} markers, renders the content other than verbatim or stripped of "
                "whitespace at its ends (or makes the text around it depend on it), and its rendering up to that "
                f"message (with add_generation_prompt=True) is not followed by the content. {FIX}",
                text,
            )
        spans.append((len(prefix), len(prefix) + len(content)))
    return spans


def _closing_token(tokenizer: PreTrainedTokenizerBase, text: str, at: int) -> int:
    """Length of the special token that starts at `text[at]` (the end-of-turn), 0 if none does."""
    specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    return max((len(s) for s in specials if s and text.startswith(s, at)), default=0)


def rendered_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any = None
) -> tuple[str, list[tuple[int, int]]]:
    """The template's rendering of `messages` and each assistant response's character span [start, end) in it.
    Raises `UnlocatedContent` for an assistant message that cannot be found."""
    text = _render(tokenizer, messages, tools)
    _check_plain(messages, text)
    assistants = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    spans = _by_sentinels(tokenizer, messages, tools, text, assistants)
    if spans is None:
        spans = _by_prefixes(tokenizer, messages, tools, text, assistants)
    return text, [(start, end + _closing_token(tokenizer, text, end)) for start, end in spans]


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 on tokens with a character inside a span, as transformers' `return_assistant_tokens_mask` marks a
    `{% generation %}` block: a token straddling a span's edge is a response token. Offsets and spans both run
    left to right, so one sweep over the two suffices."""
    mask, k = [], 0
    for s, e in offsets:
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        mask.append(int(k < len(spans) and e > spans[k][0]))
    return mask


__all__ = ["UnlocatedContent", "rendered_assistant_spans", "rendered_forms", "span_mask"]
