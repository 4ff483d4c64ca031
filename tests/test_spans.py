"""Response spans of one sample, checked against spans computed independently from the tags' character positions."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sstoken_trl.data.spans import BadSampleError, SpanFinder
from sstoken_trl.tools.tiny import build_tokenizer

U, A, EOS = "<|User|>", "<|Assistant|>", "</s>"
SINGLE = "<|User|>What is two plus two?<|Assistant|>!Four, of course."
MULTI = (
    "You are terse.<|User|>What is two plus two?<|Assistant|>!Four.<|User|>And three plus three?"
    "<|Assistant|>!Six, surely.<|User|>Why?<|Assistant|>Because arithmetic."
)
CORPUS = [SINGLE, MULTI, MULTI.replace("?", "?!"), "hello world, the quick brown fox?"] * 30


def plain_tokenizer(pre_tokenizer=None, decoder=None, post_processor=None) -> PreTrainedTokenizerFast:
    """Byte-level BPE where the tags are NOT special tokens: they tokenise into pieces that merge with '?', '!'."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoder or decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if pre_tokenizer is None else []
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", EOS], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    if post_processor is not None:
        backend.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token=EOS)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, 400)


@pytest.fixture(scope="module")
def ptok():
    return plain_tokenizer()


def response_ranges(text: str) -> list[tuple[int, int]]:
    """Character ranges of the responses: from the end of each assistant tag to the next tag or the end."""
    tags = sorted([(i, t) for t in (U, A) for i in _find_all(text, t)])
    out = []
    for k, (i, t) in enumerate(tags):
        if t == A:
            out.append((i + len(A), tags[k + 1][0] if k + 1 < len(tags) else len(text)))
    return out


def _find_all(text: str, sub: str) -> list[int]:
    out, i = [], text.find(sub)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def with_eos(text: str) -> str:
    """The text with EOS closing every response (what add_eos does)."""
    out, last = [], 0
    for _, e in response_ranges(text):
        out += [text[last:e], EOS]
        last = e
    return "".join(out) + text[last:]


def offsets_mask(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Whole-text tokenisation; 1 on tokens whose characters lie inside a response range."""
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ranges = response_ranges(text)
    mask = [int(any(a <= s and e <= b for a, b in ranges)) for s, e in out["offset_mapping"]]
    return list(out["input_ids"]), mask


def segment_ids(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Tokenise tag / prompt / response pieces separately (cut at the tags' character positions)."""
    cuts = sorted({0, len(text), *(i for t in (U, A) for j in _find_all(text, t) for i in (j, j + len(t)))})
    ranges = response_ranges(text)
    ids, mask = [], []
    for s, e in zip(cuts[:-1], cuts[1:], strict=True):
        piece = tokenizer(text[s:e], add_special_tokens=False)["input_ids"]
        is_response = (s, e) in ranges
        if is_response:
            piece = [*piece, tokenizer.eos_token_id]
        ids += piece
        mask += [int(is_response)] * len(piece)
    return ids, mask


def runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Maximal runs of masked tokens."""
    out, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            out, cur = [*out, cur], []
    return out + ([cur] if cur else [])


def contains(ids: list[int], sub: list[int]) -> bool:
    return any(ids[i : i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))


@pytest.mark.parametrize("text", [SINGLE, MULTI])
def test_text_with_special_tags_matches_offsets(tok, text):
    enc = SpanFinder(tok).from_text(text)
    ids, mask = offsets_mask(tok, with_eos(text))
    assert enc.input_ids == ids and enc.response_mask == mask
    responses = [text[a:b] + EOS for a, b in response_ranges(text)]
    assert [tok.decode(r) for r in runs(enc.input_ids, enc.response_mask)] == responses
    assert enc.labels == [t if m else -100 for t, m in zip(ids, mask, strict=True)]


@pytest.mark.parametrize("text", [SINGLE, MULTI])
def test_text_with_plain_tags_is_exact_despite_merges(ptok, text):
    whole = ptok(text)["input_ids"]
    tag_ids = ptok(A, add_special_tokens=False)["input_ids"]
    assert len(tag_ids) > 1 and not contains(whole, tag_ids), "precondition: the tag merges with '?' and '!'"
    enc = SpanFinder(ptok).from_text(text)
    assert (enc.input_ids, enc.response_mask) == segment_ids(ptok, text)
    responses = [text[a:b] + EOS for a, b in response_ranges(text)]
    assert [ptok.decode(r) for r in runs(enc.input_ids, enc.response_mask)] == responses
    assert ptok.decode(enc.input_ids) == with_eos(text)


@pytest.mark.parametrize("text", [SINGLE, MULTI])
def test_ids_with_special_tags_equal_text_path(tok, text):
    finder = SpanFinder(tok)
    ids = tok(with_eos(text))["input_ids"]
    assert finder.from_ids(ids) == finder.from_text(text)
    # TRL's text datasets come with labels == input_ids (no -100): treated as unlabelled
    assert finder.from_ids(ids, labels=ids) == finder.from_text(text)


def test_ids_with_merged_plain_tags_use_offsets(ptok):
    text = with_eos(MULTI)
    ids, expected = offsets_mask(ptok, text)
    enc = SpanFinder(ptok).from_ids(ids)
    assert enc.response_mask == expected
    # a token straddling the tag and the response ('|>!') carries tag characters: prompt, not response
    pieces = ptok.convert_ids_to_tokens(ids)
    straddling = [i for i, p in enumerate(pieces) if p.startswith("|>") and len(p) > 2]
    assert straddling and all(enc.response_mask[i] == 0 for i in straddling)
    assert sum(expected) > 0


def test_ids_from_segmentwise_tokenisation_round_trip(ptok):
    finder = SpanFinder(ptok)
    enc = finder.from_text(MULTI)
    assert finder.from_ids(enc.input_ids) == enc


def test_ids_not_from_this_tokenizer_give_clear_error(ptok):
    """Merged plain tags on ids that are not the tokenizer's own tokenisation of their text (a piece split into
    characters): the spans cannot be located reliably, so the answer is an error saying what to do."""
    ids = ptok(with_eos(MULTI))["input_ids"]
    four = ptok.convert_tokens_to_ids("Four")
    assert four in ids
    k = ids.index(four)
    split = ids[:k] + [ptok.convert_tokens_to_ids(c) for c in "Four"] + ids[k + 1 :]
    with pytest.raises(ValueError, match="Pass the raw text"):
        SpanFinder(ptok).from_ids(split)


def test_labels_with_ignore_index_are_trusted(tok):
    finder = SpanFinder(tok)
    ids = tok(with_eos(SINGLE))["input_ids"]
    labels = [-100] * (len(ids) - 2) + ids[-2:]
    assert finder.from_ids(ids, labels).response_mask == [0] * (len(ids) - 2) + [1, 1]
    with pytest.raises(BadSampleError) as err:
        finder.from_ids(ids, [-100] * len(ids))
    assert err.value.reason == "no_labels"
    # TRL's full-sequence labels on data without the tags (e.g. messages prepared without assistant_only_loss)
    plain = tok("Hello there, no tags.")["input_ids"]
    with pytest.raises(BadSampleError, match="assistant_only_loss=True"):
        finder.from_ids(plain, labels=plain)


@pytest.mark.parametrize(
    "text, reason, hint",
    [
        ("<|User|>Hello there.", "no_assistant", "no '<|Assistant|>' found"),
        ("System.<|Assistant|>Hi.<|User|>Hello.", "wrong_order", "before any '<|User|>'"),
        ("<|User|>Hello.<|Assistant|>", "empty_response", "#1 is empty"),
        ("<|User|>Hi<|Assistant|><|User|>More?<|Assistant|>Yes.", "empty_response", "#1 is empty"),
        ("<|User|>Hi<|Assistant|>Yes.<|User|>And?<|Assistant|>  </s>", "empty_response", "#2 is empty"),
    ],
)
@pytest.mark.parametrize("fmt", ["text", "ids"])
def test_bad_samples_say_what_is_wrong(tok, text, reason, hint, fmt):
    finder = SpanFinder(tok)
    with pytest.raises(BadSampleError, match=hint) as err:
        finder.from_text(text) if fmt == "text" else finder.from_ids(tok(text)["input_ids"])
    assert err.value.reason == reason
    assert err.value.encoded.input_ids and not any(err.value.encoded.response_mask)


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "user", "content": "Hi"}], "no_assistant"),
        ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hi"}], "wrong_order"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}], "empty_response"),
    ],
)
def test_bad_messages(tok, messages, reason):
    with pytest.raises(BadSampleError, match="message") as err:
        SpanFinder(tok).from_messages(messages)
    assert err.value.reason == reason


def test_add_eos_policy(tok):
    closed = "<|User|>Hi?<|Assistant|>Yes.</s><|User|>More?<|Assistant|>No.</s>"
    finder = SpanFinder(tok)
    assert finder.from_text(closed) == finder.from_text(closed.replace(EOS, ""))  # no doubled EOS
    bare = SpanFinder(tok, add_eos=False).from_text(closed.replace(EOS, ""))
    assert tok.eos_token_id not in bare.input_ids
    assert [tok.decode(r) for r in runs(bare.input_ids, bare.response_mask)] == ["Yes.", "No."]


def test_messages_equal_rendered_template_text(tok):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because arithmetic."},
    ]
    finder = SpanFinder(tok)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert finder.from_messages(messages) == finder.from_text(rendered)
    assert finder.encode({"messages": messages}) == finder.encode({"text": rendered})


def test_prompt_completion_equals_template_text(tok):
    finder = SpanFinder(tok)
    pc = finder.from_prompt_completion("<|User|>What is two plus two?<|Assistant|>", "Four.")
    assert pc == finder.from_text("<|User|>What is two plus two?<|Assistant|>Four.")
    with pytest.raises(BadSampleError) as err:
        finder.from_prompt_completion("<|User|>Hi<|Assistant|>", "")
    assert err.value.reason == "empty_response"


def test_tokenizer_bos_is_prompt():
    post = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    btok = plain_tokenizer(post_processor=post)
    enc = SpanFinder(btok).from_text(MULTI)
    assert enc.input_ids[0] == btok.bos_token_id and enc.response_mask[0] == 0
    assert enc.input_ids[1:] == segment_ids(btok, MULTI)[0]


def test_prefix_space_tokenizer_uses_whole_text():
    """A SentencePiece-style tokenizer puts a space before every call: segment-wise tokenisation would insert
    spaces at every tag, so the whole text is tokenised and tokens are assigned by offsets."""
    mtok = plain_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace())
    text = MULTI.replace("!", " ")
    assert mtok.decode(segment_ids(mtok, text)[0]) != with_eos(text), "precondition: segments gain spaces"
    enc = SpanFinder(mtok).from_text(text)
    assert (enc.input_ids, enc.response_mask) == offsets_mask(mtok, with_eos(text))
    assert mtok.decode(enc.input_ids) == with_eos(text)


def test_unknown_sample_and_bad_tags(tok):
    with pytest.raises(ValueError, match="needs one of"):
        SpanFinder(tok).encode({"content": "x"})
    with pytest.raises(ValueError, match="distinct"):
        SpanFinder(tok, user_tag=A, assistant_tag=A)
