"""Prompt / response spans of one training sample, as a token-level response mask.

Four sample formats give the same semantics: response tokens are the assistant turns' tokens (every turn, with
the end-of-turn / EOS token that closes each turn), everything else (system text, user turns, the tags) is prompt.

- template text (`{"text": ...}`): `[system] <|User|> ... <|Assistant|> ... [<|User|> ... <|Assistant|> ...]`.
  The text is cut at the tags and tokenised segment by segment, so span boundaries are exact token boundaries
  even when a tag is a plain string whose pieces would merge with neighbouring characters (`"?<|"`). This is
  also the tokenisation the model meets at inference: a prompt ending with the assistant tag, then the reply.
- token ids (`{"input_ids": ..., "labels"?: ...}`): labels holding -100 are taken as they are (TRL's prepared
  data); otherwise the tags are located on the ids, or by character offsets when they merged with neighbours.
- conversational (`{"messages": [...]}`): the chat template's `{% generation %}` assistant mask (TRL's patched
  template for the ones it knows; for other templates without markers, the contents located in the rendered text).
- prompt / completion (`{"prompt": ..., "completion": ...}`): the completion, as TRL computes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from sstoken_trl.data.chat_spans import UnlocatedContent, rendered_assistant_spans, span_mask

IGNORE_INDEX = -100
RENDERED = "rendered"  # spans of a chat template without generation markers, from its rendered text
USER_TAG = "<|User|>"
ASSISTANT_TAG = "<|Assistant|>"
BAD_REASONS = ("no_assistant", "wrong_order", "empty_response", "no_labels", "unlocated_response")


@dataclass(frozen=True)
class Encoded:
    """Token ids of one sample and its response mask (1 = response token, trained; 0 = prompt)."""

    input_ids: list[int]
    response_mask: list[int]

    @property
    def labels(self) -> list[int]:
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.response_mask, strict=True)]

    def truncated(self, max_length: int) -> Encoded:
        return Encoded(self.input_ids[:max_length], self.response_mask[:max_length])


class BadSampleError(ValueError):
    """A sample that has nothing to train on. `reason` is one of BAD_REASONS; `encoded` masks the whole sample."""

    def __init__(self, reason: str, message: str, encoded: Encoded):
        super().__init__(message)
        self.reason = reason
        self.encoded = encoded

    def __reduce__(self):  # picklable across `dataset.map(num_proc=...)` workers
        return type(self), (self.reason, str(self), self.encoded)


MESSAGE_NAMES = ("user message", "assistant message", "assistant message")
COMPLETION_NAMES = ("prompt", "completion", "completion")


def _problem(kinds: Sequence[str], responses: Sequence[str], names: tuple[str, str, str]) -> tuple[str, str] | None:
    """Why a conversation (turn kinds "user"/"assistant" in order, response texts) cannot be trained, if it
    cannot. `names`: how to call the user turn, the assistant turn and a response in the message."""
    user, assistant, response = names
    if "assistant" not in kinds:
        return "no_assistant", f"no {assistant} found, so there is no response to train on."
    if kinds[0] == "assistant":
        return "wrong_order", f"{assistant} comes before any {user}: a response needs a user turn before it."
    for k, text in enumerate(responses):
        if not text.strip():
            return "empty_response", f"{response} #{k + 1} is empty: nothing to train on."
    return None


def _turn_text(message: Mapping[str, Any]) -> str:
    """What an assistant message says: its content (text or structured) and any tool calls."""
    content = message.get("content") or ""
    text = content if isinstance(content, str) else json.dumps(content)
    return text + (json.dumps(message["tool_calls"]) if message.get("tool_calls") else "")


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class SpanFinder:
    """Tokenises samples of any supported format into input ids and a response mask (see module docstring).

    Args:
        tokenizer: a fast tokenizer (offset mapping is used for plain-string tags merged into neighbours).
        user_tag, assistant_tag: the template's turn markers; special tokens or plain strings.
        add_eos: template text and string prompt/completion only: close every response that does not already end
            with the EOS token with one (the chat-template convention), so the model learns to stop each turn.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        user_tag: str = USER_TAG,
        assistant_tag: str = ASSISTANT_TAG,
        add_eos: bool = True,
    ):
        if not user_tag or not assistant_tag or user_tag == assistant_tag:
            raise ValueError(
                f"user_tag and assistant_tag must be distinct non-empty strings, got {user_tag!r}, {assistant_tag!r}."
            )
        if add_eos and tokenizer.eos_token_id is None:
            raise ValueError(
                "add_eos=True needs a tokenizer with an EOS token: set tokenizer.eos_token, or pass "
                "add_eos=False if your responses already end with an end-of-turn token."
            )
        self.tokenizer = tokenizer
        self.user_tag, self.assistant_tag, self.add_eos = user_tag, assistant_tag, add_eos
        self._tag_ids = {"user": self._ids(user_tag), "assistant": self._ids(assistant_tag)}
        tags = sorted([user_tag, assistant_tag], key=len, reverse=True)  # longest first: one may prefix the other
        self._tag_re = re.compile("|".join(re.escape(t) for t in tags))
        # Special tokens the tokenizer adds around a text (e.g. a BOS from its post-processor); kept as prompt.
        bare, full = self._ids("a"), tokenizer("a")["input_ids"]
        start = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), 0)
        self._bos = list(full[:start])
        # Tokenizers that prefix a space to every call (SentencePiece "dummy prefix", add_prefix_space=True) would
        # insert a space at every segment: for them, tokenise whole texts and assign tokens by character offsets.
        self._per_call_prefix = bare == self._ids(" a")
        self._chat_template: str | None = None

    # ---- public entry points -------------------------------------------------------------------------------

    def encode(self, example: Mapping[str, Any]) -> Encoded:
        """Dispatch on the sample's keys: input_ids, messages, prompt + completion, or text."""
        if "input_ids" in example:
            return self.from_ids(example["input_ids"], example.get("labels"))
        if "messages" in example:
            return self.from_messages(example["messages"], example.get("tools"))
        if "prompt" in example and "completion" in example:
            return self.from_prompt_completion(example["prompt"], example["completion"])
        if "text" in example:
            return self.from_text(example["text"])
        raise ValueError(
            f"Sample has keys {sorted(example)}, but needs one of: 'input_ids', 'messages', 'prompt' + "
            "'completion', 'text'. With SFTTrainer and raw samples, set remove_unused_columns=False."
        )

    def from_text(self, text: str) -> Encoded:
        """Template text: segment-wise tokenisation, exact spans (whole text + offsets for prefix-space tokenizers)."""
        pieces = self._split(text)
        responses = [text[s:e] for kind, s, e in pieces if kind == "response"]
        if self._per_call_prefix:
            enc = self._from_text_offsets(text, pieces)
        else:
            ids, mask = list(self._bos), [0] * len(self._bos)
            for kind, s, e in pieces:
                seg = self._tag_ids[kind] if kind in self._tag_ids else self._ids(text[s:e])
                if kind == "response" and self.add_eos and (not seg or seg[-1] != self.tokenizer.eos_token_id):
                    seg = [*seg, self.tokenizer.eos_token_id]
                ids += seg
                mask += [int(kind == "response")] * len(seg)
            enc = Encoded(ids, mask)
        kinds = [kind for kind, _, _ in pieces if kind in self._tag_ids]
        self._raise_if_bad(kinds, [self._strip_eos(r) for r in responses], enc)
        return enc

    def from_ids(self, input_ids: Sequence[int], labels: Sequence[int] | None = None) -> Encoded:
        """Token ids. Labels with any -100 are trusted; otherwise (absent, or TRL's full-sequence default) the
        tags are located on the ids, or by character offsets when a plain-string tag merged with neighbours."""
        ids = [int(t) for t in input_ids]
        if labels is not None and IGNORE_INDEX in labels:
            enc = Encoded(ids, [int(label != IGNORE_INDEX) for label in labels])
            if not any(enc.response_mask):
                raise BadSampleError("no_labels", "every label is -100: the sample has no response token.", enc)
            return enc
        found = self._find_tags(ids)
        if found is None:
            return self._from_ids_offsets(ids)
        bounds = [*found, (None, len(ids), len(ids))]
        mask, kinds, responses = [0] * len(ids), [], []
        for (kind, _, end), (_, nxt, _) in zip(bounds[:-1], bounds[1:], strict=True):
            kinds.append(kind)
            if kind == "assistant":
                mask[end:nxt] = [1] * (nxt - end)
                responses.append(self.tokenizer.decode(ids[end:nxt], skip_special_tokens=True))
        enc = Encoded(ids, mask)
        try:
            self._raise_if_bad(kinds, responses, enc)
        except BadSampleError as err:
            if err.reason != "no_assistant" or labels is None:
                raise
            hint = " (Labels without -100 count as none: for TRL-prepared messages set assistant_only_loss=True.)"
            raise BadSampleError(err.reason, str(err) + hint, err.encoded) from None
        return enc

    def from_messages(self, messages: list[dict[str, Any]], tools: Any = None) -> Encoded:
        """Conversational sample through the chat template; responses = its `{% generation %}` blocks, or, for a
        template without them that TRL cannot patch, the assistant contents located in the rendered text
        (`chat_spans`)."""
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kinds, responses = self._message_turns(messages)
        template = self._training_template()
        if template == RENDERED and _problem(kinds, responses, MESSAGE_NAMES) is None:
            try:
                text, spans = rendered_assistant_spans(self.tokenizer, messages, tools)
            except UnlocatedContent as err:
                ids = self._ids(err.text)
                raise BadSampleError("unlocated_response", str(err), Encoded(ids, [0] * len(ids))) from None
            out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            enc = Encoded(list(out["input_ids"]), span_mask(out["offset_mapping"], spans))
        else:
            out = self.tokenizer.apply_chat_template(
                messages,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=template != RENDERED,
                chat_template=None if template == RENDERED else template,
                tools=tools,
            )
            ids = list(out["input_ids"])
            enc = Encoded(ids, [int(m) for m in out.get("assistant_masks", [0] * len(ids))])
        self._raise_if_bad(kinds, responses, enc, MESSAGE_NAMES)
        if not any(enc.response_mask):
            raise ValueError(
                "The chat template marks no assistant token although the sample has assistant messages: its "
                "{% generation %} ... {% endgeneration %} block must wrap the assistant content and end-of-turn."
            )
        return enc

    def from_prompt_completion(self, prompt: str | list, completion: str | list) -> Encoded:
        """Prompt / completion sample, as TRL prepares it: the completion starts where the tokenised prompt and
        prompt + completion diverge. Conversational pairs go through the chat template."""
        if isinstance(prompt, list):
            render = self.tokenizer.apply_chat_template
            prompt_ids = render(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
            ids = render(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
            kinds = self._message_turns(prompt + completion)[0]
            responses = self._message_turns(completion)[1]
            names = MESSAGE_NAMES
        else:
            eos = self.tokenizer.eos_token
            if self.add_eos and not completion.endswith(eos):
                completion = completion + eos
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            ids = self.tokenizer(prompt + completion)["input_ids"]
            kinds, responses, names = ["user", "assistant"], [self._strip_eos(completion)], COMPLETION_NAMES
        n = common_prefix_length(prompt_ids, ids)
        enc = Encoded(list(ids), [0] * n + [1] * (len(ids) - n))
        self._raise_if_bad(kinds, responses, enc, names)
        return enc

    # ---- helpers -------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _strip_eos(self, text: str) -> str:
        eos = self.tokenizer.eos_token
        return text.replace(eos, "") if eos else text

    def _split(self, text: str) -> list[tuple[str, int, int]]:
        """Contiguous pieces (kind, start, end): kind is "user"/"assistant" for a tag, else "prompt"/"response"."""
        pieces, pos, content = [], 0, "prompt"
        for m in self._tag_re.finditer(text):
            if m.start() > pos or content == "response":  # an empty response is kept, to be reported
                pieces.append((content, pos, m.start()))
            kind = "user" if m.group() == self.user_tag else "assistant"
            pieces.append((kind, m.start(), m.end()))
            pos, content = m.end(), "response" if kind == "assistant" else "prompt"
        if content == "response" or pos < len(text):
            pieces.append((content, pos, len(text)))
        return pieces

    def _from_text_offsets(self, text: str, pieces: list[tuple[str, int, int]]) -> Encoded:
        """Whole-text tokenisation; EOS inserted after each response; tokens inside a response are trained."""
        eos = self.tokenizer.eos_token
        parts = []
        for kind, s, e in pieces:
            parts.append(text[s:e])
            if kind == "response" and self.add_eos and not text[s:e].endswith(eos):
                parts.append(eos)
        full = "".join(parts)
        out = self.tokenizer(full, return_offsets_mapping=True)
        return Encoded(list(out["input_ids"]), self._offset_mask(full, out["offset_mapping"]))

    def _offset_mask(self, text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
        """1 on tokens whose characters lie entirely inside a response (tokens straddling a tag are prompt)."""
        ranges = [(s, e) for kind, s, e in self._split(text) if kind == "response"]
        return [int(any(a <= s and e <= b and s < b for a, b in ranges)) for s, e in offsets]

    def _find_tags(self, ids: list[int]) -> list[tuple[str, int, int]] | None:
        """Tag occurrences (kind, start, end) as the tags' own token sequences; None if some tag merged with its
        neighbours (fewer id matches than occurrences in the decoded text)."""
        order = sorted(self._tag_ids.items(), key=lambda kv: len(kv[1]), reverse=True)
        found, i = [], 0
        while i < len(ids):
            for kind, tag in order:
                if tag and ids[i : i + len(tag)] == tag:
                    found.append((kind, i, i + len(tag)))
                    i += len(tag)
                    break
            else:
                i += 1
        if all(len(t) == 1 for t in self._tag_ids.values()):
            return found
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return found if len(self._tag_re.findall(text)) == len(found) else None

    def _from_ids_offsets(self, ids: list[int]) -> Encoded:
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(out["input_ids"]) != ids:
            raise ValueError(
                f"Cannot locate the tags {self.user_tag!r} / {self.assistant_tag!r} on these input_ids: they merged "
                "with neighbouring characters and the ids are not the tokenizer's own tokenisation of their text. "
                "Pass the raw text instead, or pre-tokenise with sstoken_trl.collator.pretokenize."
            )
        pieces = self._split(text)
        enc = Encoded(ids, self._offset_mask(text, out["offset_mapping"]))
        kinds = [kind for kind, _, _ in pieces if kind in self._tag_ids]
        responses = [self._strip_eos(text[s:e]) for kind, s, e in pieces if kind == "response"]
        self._raise_if_bad(kinds, responses, enc)
        return enc

    def _raise_if_bad(
        self, kinds: Sequence[str], responses: Sequence[str], enc: Encoded, names: tuple[str, str, str] | None = None
    ) -> None:
        names = names or (repr(self.user_tag), repr(self.assistant_tag), f"response after {self.assistant_tag!r}")
        problem = _problem(kinds, responses, names)
        if problem is not None:
            raise BadSampleError(problem[0], problem[1], Encoded(enc.input_ids, [0] * len(enc.input_ids)))

    @staticmethod
    def _message_turns(messages: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """Turn kinds ("user"/"assistant", in order) and each assistant turn's text (content or tool calls)."""
        kinds = [m["role"] for m in messages if m["role"] in ("user", "assistant")]
        responses = [_turn_text(m) for m in messages if m["role"] == "assistant"]
        return kinds, responses

    def _training_template(self) -> str | None:
        """The chat template to render with: None for the tokenizer's own when it has `{% generation %}` markers,
        TRL's patched version of a template it knows, else RENDERED (spans from the rendered text)."""
        template = self.tokenizer.chat_template
        if template is None:
            raise ValueError("Conversational samples need a tokenizer with a chat template (tokenizer.chat_template).")
        if self._chat_template is None and not has_generation_markers(template):
            try:
                self._chat_template = get_training_chat_template(self.tokenizer)
            except ValueError:  # a template TRL does not know how to patch
                self._chat_template = RENDERED
        return self._chat_template
