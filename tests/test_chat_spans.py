"""Spans of chat templates without `{% generation %}` blocks, against transformers' own assistant mask.

A template zoo, each template written once with `[[` ... `]]` around what a generation block marks (the assistant
content as rendered and the special token that closes the turn): without the brackets it is what users have, with
them turned into `{% generation %}` ... `{% endgeneration %}` it is what `return_assistant_tokens_mask` reads.
The spans found on the first must mark exactly the tokens transformers marks on the second, on SmolLM2's real
byte-level BPE tokenizer, where template text merges with the content's first word (`" gamma"`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import trl
from datasets import Dataset

from sstoken_trl.data.chat_spans import rendered_assistant_spans, span_mask
from sstoken_trl.data.collator import SSTokenCollator, pretokenize
from sstoken_trl.data.spans import BadSampleError, SpanFinder
from sstoken_trl.tools.loading import load_tokenizer
from tests.test_real_model import GGUF

CHATML = r"""
{%- for message in messages -%}
{%- if loop.first and messages[0]['role'] != 'system' -%}
{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
{%- endif -%}
{%- if message['role'] == 'assistant' -%}
{{ '<|im_start|>assistant\n' }}[[{{ message['content'] + '<|im_end|>' }}]]{{ '\n' }}
{%- else -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}
"""

LLAMA3 = r"""
{%- for message in messages -%}
{%- if loop.index0 == 0 -%}{{ bos_token }}{%- endif -%}
{%- if message['role'] == 'assistant' -%}
{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}[[{{ message['content'] | trim + '<|eot_id|>' }}]]
{%- else -%}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}
"""

VICUNA = r"""
{%- if messages[0]['role'] == 'system' -%}
{{ messages[0]['content'] + ' ' }}{%- set messages = messages[1:] -%}
{%- else -%}
{{ 'A chat between a curious user and an artificial intelligence assistant. ' }}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{{ 'USER: ' + message['content'] + ' ' }}
{%- else -%}
{{ 'ASSISTANT: ' }}[[{{ message['content'] + eos_token }}]]
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}
"""

GEMMA = r"""
{{- bos_token -}}
{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
{{ '<start_of_turn>model\n' }}[[{{ message['content'] | trim + '<end_of_turn>' }}]]{{ '\n' }}
{%- else -%}
{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""

MISTRAL = r"""
{{- bos_token -}}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{ message['content'] + '\n\n' }}
{%- elif message['role'] == 'user' -%}
{{ '[INST] ' + message['content'] + ' [/INST]' }}
{%- else -%}
{{ ' ' }}[[{{ message['content'] + eos_token }}]]
{%- endif -%}
{%- endfor -%}
"""

# No special token closes a turn: the response is the content alone, and its last characters can merge with the
# template's "\n\n" that follows ("A trailing space. " + "\n\n" -> " \n\n").
ALPACA = r"""
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{ message['content'] + '\n\n' }}
{%- elif message['role'] == 'user' -%}
{{ '### Instruction:\n' + message['content'] + '\n\n' }}
{%- else -%}
{{ '### Response:\n' }}[[{{ message['content'] }}]]{{ '\n\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '### Response:\n' }}{%- endif -%}
"""

# TRL's own Llama 3.1 template, as shipped: it renders `message['content'] | trim` for every role.
LLAMA3_1_LINE = (
    r"{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    r"'<|eot_id|>' }}"
)
LLAMA3_1_MARKED = (
    r"{%- if message.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    r"[[{{- message['content'] | trim + '<|eot_id|>' }}]]{%- else %}" + LLAMA3_1_LINE + "{%- endif %}"
)


def llama3_1() -> str:
    shipped = (Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja").read_text(encoding="utf-8")
    assert shipped.count(LLAMA3_1_LINE) == 1
    return shipped.replace(LLAMA3_1_LINE, LLAMA3_1_MARKED)


ZOO = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "vicuna": VICUNA,
    "gemma": GEMMA,
    "mistral": MISTRAL,
    "alpaca": ALPACA,
    "llama3_1_trim": llama3_1(),
}


def plain(template: str) -> str:
    return template.replace("[[", "").replace("]]", "")


def marked(template: str) -> str:
    return template.replace("[[", "{% generation %}").replace("]]", "{% endgeneration %}")


def chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]


CONVERSATIONS = {
    "plain": chat("alpha beta", "gamma delta epsilon", "and then?", "zeta eta."),
    "spaces": chat(
        "  leading spaces",
        " gamma delta",
        "trailing spaces  ",
        "A trailing space. ",
        "x",
        "  both ends  ",
        system="Be brief.",
    ),
    "newlines": chat("q\n", "\n\nstarts with newlines", "\nq", "ends with newlines\n\n", "q", "gamma delta\n"),
    "merging": chat("ASSISTANT:", "USER: a turn lookalike", "[/INST]", ":gamma", "x", "'s, then more"),
    "unicode": chat("héllo wörld", "日本語のテキスト 🙂 ok", "ça va?", "— naïve café —\u00a0"),
    "short": chat("a", "0", "b", ".", "c", "!"),
}
# Contents with no visible character: the sample is bad for training (empty response), but the spans are exact.
BLANK = chat("hi", "", "more?", "   ", "and?", "\n")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's real tokenizer, with the other families' turn tokens added as special tokens (as their own
    tokenizers have them)."""
    tokenizer = copy.deepcopy(load_tokenizer(GGUF))
    tokens = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer.add_tokens(tokens, special_tokens=True)
    return tokenizer


def transformers_mask(tokenizer, messages, template: str) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(
        messages, chat_template=marked(template), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def using(tokenizer, template: str):
    tokenizer.chat_template = plain(template)
    return tokenizer


def test_the_zoo_renders_like_its_originals(smollm2):
    original = load_tokenizer(GGUF)
    for messages in CONVERSATIONS.values():  # with and without a system message
        ours = using(smollm2, CHATML).apply_chat_template(messages, tokenize=False)
        assert ours == original.apply_chat_template(messages, tokenize=False)
    shipped = (Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja").read_text(encoding="utf-8")
    for messages in CONVERSATIONS.values():
        ours = using(smollm2, ZOO["llama3_1_trim"]).apply_chat_template(messages, tokenize=False)
        assert ours == smollm2.apply_chat_template(messages, chat_template=shipped, tokenize=False)
    for template in ZOO.values():  # the generation blocks change no character
        for messages in [*CONVERSATIONS.values(), BLANK]:
            rendered = smollm2.apply_chat_template(messages, chat_template=marked(template), tokenize=False)
            assert rendered == using(smollm2, template).apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("name", ZOO)
def test_spans_equal_the_generation_block_mask(smollm2, name):
    tokenizer = using(smollm2, ZOO[name])
    finder = SpanFinder(tokenizer)
    for key, messages in [*CONVERSATIONS.items(), ("blank", BLANK)]:
        ids, expected = transformers_mask(tokenizer, messages, ZOO[name])
        text, spans = rendered_assistant_spans(tokenizer, messages)
        out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert list(out["input_ids"]) == ids, key
        assert span_mask(out["offset_mapping"], spans) == expected, key
        if key != "blank":
            encoded = finder.from_messages(messages)
            assert (encoded.input_ids, encoded.response_mask) == (ids, expected), key


def test_the_zoo_has_the_cases_it_is_for(smollm2):
    """Tokens that straddle a span's edge (template text and content in one token) occur, at both edges."""
    starts = ends = 0
    for template in ZOO.values():
        tokenizer = using(smollm2, template)
        for messages in CONVERSATIONS.values():
            text, spans = rendered_assistant_spans(tokenizer, messages)
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            starts += sum(s < a < e for s, e in offsets for a, _ in spans)
            ends += sum(s < b < e for s, e in offsets for _, b in spans)
    assert starts >= 10 and ends >= 2


def test_a_token_merging_template_text_with_the_first_word_is_trained(smollm2):
    tokenizer = using(smollm2, VICUNA)
    messages = chat("alpha beta", "gamma delta epsilon")
    encoded = SpanFinder(tokenizer).from_messages(messages)
    trained = [tokenizer.decode([t]) for t, m in zip(encoded.input_ids, encoded.response_mask, strict=True) if m]
    assert trained == [" gamma", " delta", " epsilon", tokenizer.eos_token]
    ids, mask = transformers_mask(tokenizer, messages, VICUNA)
    assert trained == [tokenizer.decode([t]) for t, m in zip(ids, mask, strict=True) if m]


def test_trimmed_content_is_located(smollm2):
    """TRL's llama3_1.jinja trims: a trailing newline is not rendered, and the response is what is."""
    tokenizer = using(smollm2, ZOO["llama3_1_trim"])
    rows = [{"messages": chat("alpha beta", "gamma delta\n")}, {"messages": chat("q", "  spaced  ", "r", "\nx\n")}]
    data = pretokenize(Dataset.from_list(rows), tokenizer)
    trained = [[t for t, label in zip(r["input_ids"], r["labels"], strict=True) if label != -100] for r in data]
    assert [tokenizer.decode(ids) for ids in trained] == ["gamma delta<|eot_id|>", "spaced<|eot_id|>x<|eot_id|>"]


# Keeps only the answer after a reasoning block: a transformation the spans cannot be read back from.
REASONING = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\n' + message['content'].split('</think>')[-1] | trim + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
REASONING_ROWS = [
    {"messages": chat("alpha", "beta")},
    {"messages": chat("gamma", "<think>delta</think>epsilon")},
    {"messages": chat("zeta", "eta")},
]


def test_a_transformed_row_is_skipped_by_pretokenize_and_named_on_error(smollm2, caplog):
    tokenizer = using(smollm2, REASONING)
    data = Dataset.from_list(REASONING_ROWS)
    with caplog.at_level(logging.WARNING):
        kept = pretokenize(data, tokenizer, on_bad_sample="skip")
    assert "dropped 1 of 3 rows" in caplog.text and "skipped_unlocated_response" in caplog.text
    expected = pretokenize(data.select([0, 2]), tokenizer)
    assert kept["input_ids"] == expected["input_ids"] and kept["labels"] == expected["labels"]
    with pytest.raises(BadSampleError) as err:
        pretokenize(data, tokenizer)
    message = str(err.value)
    assert err.value.reason == "unlocated_response"
    assert message.startswith("Row 1: Cannot locate assistant message 1")
    assert "{% generation %}" in message and "on_bad_sample='skip'" in message


def test_a_transformed_row_is_masked_and_counted_by_the_collator(smollm2):
    tokenizer = using(smollm2, REASONING)
    collator = SSTokenCollator(tokenizer, on_bad_sample="skip")
    batch = collator(REASONING_ROWS)
    rendered = tokenizer.apply_chat_template(REASONING_ROWS[1]["messages"], tokenize=True, return_dict=True)
    length = len(rendered["input_ids"])
    assert batch["input_ids"][1, :length].tolist() == list(rendered["input_ids"])
    assert (batch["labels"][1] == -100).all() and (batch["labels"][[0, 2]] != -100).any(dim=1).all()
    assert collator.counts["skipped_unlocated_response"] == 1
    with pytest.raises(BadSampleError, match="Sample 1 of the batch: Cannot locate assistant message 1"):
        SSTokenCollator(tokenizer)(REASONING_ROWS)


def test_tool_calls_without_generation_blocks_are_a_bad_sample(smollm2):
    tokenizer = using(smollm2, CHATML)
    call = [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    rows = [{"messages": [*chat("q"), {"role": "assistant", "content": "ok", "tool_calls": call}]}]
    with pytest.raises(BadSampleError, match="Row 0: Message 1 is an assistant message with tool calls") as err:
        pretokenize(Dataset.from_list(rows), tokenizer)
    assert err.value.reason == "unlocated_response"
