"""SSTokenCollator and pretokenize against TRL's own pipeline (real SFTTrainer, tiny model, offline tokenizers)."""

from __future__ import annotations

import logging
import math

import datasets
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sstoken_trl.data.collator import SSTokenCollator, pretokenize
from sstoken_trl.data.spans import BadSampleError
from sstoken_trl.tools.tiny import build_model, build_tokenizer

datasets.disable_progress_bars()

U, A, EOS = "<|User|>", "<|Assistant|>", "</s>"
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six, surely."},
    ],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, or red."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because they are colours."},
    ],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]
TEXTS = [
    "<|User|>What is two plus two?<|Assistant|>!Four.</s>",
    "Be brief.<|User|>Name a colour?<|Assistant|>!Blue.</s><|User|>Why?<|Assistant|>!Because.</s>",
    "<|User|>Say hello?<|Assistant|>!Hello, world.</s>",
    "<|User|>Count to three?<|Assistant|>One, two, three.</s><|User|>Now four?<|Assistant|>!Four.</s>",
]
CORPUS = [m["content"] for c in CONVERSATIONS for m in c] * 20 + TEXTS * 20


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, 400)


@pytest.fixture(scope="module")
def ptok():
    """Byte-level BPE where the tags are plain strings that merge with '?' and '!'."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token=EOS)


def sft_trainer(tokenizer, dataset, tmp_path, collator=None, **config) -> SFTTrainer:
    config.setdefault("per_device_train_batch_size", len(dataset))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], bf16=False, use_cpu=True, **config)
    model = build_model("llama", len(tokenizer))
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=collator)


def first_batch(trainer: SFTTrainer) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


def rows(batch: dict[str, torch.Tensor]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(ids, labels) of every sample: padded rows cut by attention_mask, padding-free rows split at position 0."""
    out = []
    if "attention_mask" in batch:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(mask.sum())
            assert mask[:n].all(), "right padding"
            out.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
        return out
    for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"], strict=True):
        starts = [*(pos == 0).nonzero().flatten().tolist(), len(pos)]
        for s, e in zip(starts[:-1], starts[1:], strict=True):
            out.append((tuple(ids[s:e].tolist()), tuple(labels[s:e].tolist())))
    return out


def expected_labels(tokenizer, text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Independent oracle for texts whose tags are special tokens and whose responses end with EOS: whole-text
    tokenisation, labels on tokens whose characters lie after an assistant tag and before the next tag."""
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ranges, i = [], text.find(A)
    while i >= 0:
        nxt = text.find(U, i)
        ranges.append((i + len(A), len(text) if nxt < 0 else nxt))
        i = text.find(A, i + 1)
    labels = [
        t if any(a <= s and e <= b for a, b in ranges) else -100
        for t, (s, e) in zip(out["input_ids"], out["offset_mapping"], strict=True)
    ]
    return tuple(out["input_ids"]), tuple(labels)


def test_collator_output_is_trls_padding_of_the_spans(tok):
    collator = SSTokenCollator(tok)
    samples = [{"text": TEXTS[0]}, {"text": TEXTS[1]}, {"input_ids": tok(TEXTS[3])["input_ids"]}]
    batch = collator(samples)
    oracle = [expected_labels(tok, t) for t in (TEXTS[0], TEXTS[1], TEXTS[3])]
    assert rows(batch) == oracle
    reference = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(
        [{"input_ids": list(ids), "labels": list(labels)} for ids, labels in oracle]
    )
    assert batch.keys() == reference.keys() == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert torch.equal(batch[key], reference[key]), key
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()


def test_three_formats_give_the_same_spans(tok, tmp_path):
    """One conversation as template text, as messages and as prompt/completion: same ids, same labels, and the
    same as what TRL's own preparation gives for messages (assistant_only_loss) and prompt/completion."""
    collator = SSTokenCollator(tok)
    texts = [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    from_text = rows(collator([{"text": t} for t in texts]))
    assert from_text == [expected_labels(tok, t) for t in texts]
    assert rows(collator([{"messages": c} for c in CONVERSATIONS])) == from_text

    trl_messages = sft_trainer(tok, Dataset.from_dict({"messages": CONVERSATIONS}), tmp_path, assistant_only_loss=True)
    assert sorted(rows(first_batch(trl_messages))) == sorted(from_text)

    single = CONVERSATIONS[2]
    pc = {"prompt": [single[:1]], "completion": [single[1:]]}
    trl_pc = rows(first_batch(sft_trainer(tok, Dataset.from_dict(pc), tmp_path / "pc")))
    assert trl_pc == [from_text[2]] == rows(collator([{"prompt": single[:1], "completion": single[1:]}]))

    prompt = "<s><|User|>Say hello.<|Assistant|>"
    trl_str = rows(
        first_batch(
            sft_trainer(tok, Dataset.from_dict({"prompt": [prompt], "completion": ["Hello!"]}), tmp_path / "str")
        )
    )
    assert trl_str == [from_text[2]] == rows(collator([{"prompt": prompt, "completion": "Hello!"}]))


@pytest.mark.parametrize("plain_tags", [False, True])
def test_collator_inside_sfttrainer_on_text_data(tok, ptok, tmp_path, plain_tags):
    """TRL tokenises text datasets itself (labels = input_ids); the collator then finds the tags on the ids,
    also when plain-string tags merged with their neighbours (pieces like '|>!' hold tag characters: prompt)."""
    tokenizer = ptok if plain_tags else tok
    collator = SSTokenCollator(tokenizer)
    trainer = sft_trainer(tokenizer, Dataset.from_dict({"text": TEXTS}), tmp_path, collator=collator)
    got = rows(first_batch(trainer))
    assert sorted(got) == sorted(expected_labels(tokenizer, t) for t in TEXTS)
    merged = [
        label
        for ids, labels in got
        for piece, label in zip(tokenizer.convert_ids_to_tokens(list(ids)), labels, strict=True)
        if piece.startswith("|>") and len(piece) > 2
    ]
    assert (len(merged) > 0) == plain_tags and set(merged) <= {-100}
    assert collator.counts["samples"] == len(TEXTS)


@pytest.mark.parametrize("config", [dict(packing=True, max_length=64), dict(padding_free=True, max_length=None)])
def test_pretokenize_gives_packing_and_padding_free_the_collators_spans(tok, tmp_path, config):
    dataset = pretokenize(Dataset.from_dict({"text": TEXTS}), tok)
    assert dataset.column_names == ["input_ids", "labels"]
    trainer = sft_trainer(tok, dataset, tmp_path, **config)
    batch = first_batch(trainer)
    assert "attention_mask" not in batch and "position_ids" in batch
    assert batch["input_ids"].size(0) < len(TEXTS), "several documents share a row"
    expected = rows(SSTokenCollator(tok)([{"text": t} for t in TEXTS]))
    assert sorted(rows(batch)) == sorted(expected)


def test_custom_collator_with_padding_free_is_refused_by_trl(tok, tmp_path):
    with pytest.raises(ValueError, match="custom data collator"):
        sft_trainer(tok, Dataset.from_dict({"text": TEXTS}), tmp_path, SSTokenCollator(tok), padding_free=True)


BAD = {
    "no_assistant": {"text": "<|User|>Only a question?"},
    "wrong_order": {"text": "System.<|Assistant|>Hi.<|User|>Hello."},
    "empty_response": {"text": "<|User|>Hi?<|Assistant|>  "},
    "no_labels": {"input_ids": [3, 50, 4, 60], "labels": [-100] * 4},
}


def test_error_policy_names_the_sample_and_the_fix(tok):
    collator = SSTokenCollator(tok)
    with pytest.raises(BadSampleError, match="Sample 1 of the batch") as err:
        collator([{"text": TEXTS[0]}, BAD["wrong_order"]])
    message = str(err.value)
    assert "Sample 1 of the batch" in message and "'System." in message and "on_bad_sample='skip'" in message
    assert err.value.reason == "wrong_order"


def test_skip_policy_masks_and_counts(tok):
    collator = SSTokenCollator(tok, on_bad_sample="skip")
    batch = collator([{"text": TEXTS[0]}, *BAD.values(), {"text": TEXTS[1]}])
    got = rows(batch)
    assert got[0] == expected_labels(tok, TEXTS[0]) and got[-1] == expected_labels(tok, TEXTS[1])
    for ids, labels in got[1:-1]:
        assert ids and set(labels) == {-100}
    assert collator.counts == {
        "samples": 6,
        "skipped_no_assistant": 1,
        "skipped_wrong_order": 1,
        "skipped_empty_response": 1,
        "skipped_no_labels": 1,
        "skipped_unlocated_response": 0,
        "truncated": 0,
        "truncated_no_response": 0,
    }


def test_truncated_responses_are_counted_and_give_a_finite_loss(tok, tmp_path, caplog):
    long_prompt = "<|User|>" + "What is two plus two? " * 10 + "<|Assistant|>Four.</s>"
    ids, labels = expected_labels(tok, TEXTS[0])
    first_response = labels.index(next(t for t in labels if t != -100))
    collator = SSTokenCollator(tok, max_length=first_response + 1)
    with caplog.at_level(logging.WARNING):
        batch = collator([{"text": long_prompt}, {"text": TEXTS[0]}, {"text": long_prompt}])
    assert batch["input_ids"].size(1) == first_response + 1
    (_, cut_labels), (kept_ids, kept_labels), _ = rows(batch)
    assert set(cut_labels) == {-100}
    assert kept_labels == labels[: first_response + 1] and kept_labels[-1] == ids[first_response] != -100
    assert collator.counts["truncated_no_response"] == 2 and collator.counts["truncated"] >= 2
    assert sum("truncated_no_response" in r.message for r in caplog.records) == 1  # warned once

    trainer = sft_trainer(tok, Dataset.from_dict({"text": TEXTS}), tmp_path, collator=collator)
    masked = collator([{"text": long_prompt}])
    for inputs in (masked, batch):
        loss = trainer.compute_loss(trainer.model, dict(inputs))
        assert math.isfinite(loss.item())
    assert trainer.compute_loss(trainer.model, dict(masked)).item() == 0.0


def test_pretokenize_policies(tok, caplog):
    data = Dataset.from_dict({"text": [TEXTS[0], BAD["no_assistant"]["text"], TEXTS[1], BAD["empty_response"]["text"]]})
    with pytest.raises(BadSampleError, match=r"Row 1: no '<\|Assistant\|>' found"):
        pretokenize(data, tok)
    with caplog.at_level(logging.WARNING):
        kept = pretokenize(data, tok, on_bad_sample="skip")
    assert [tuple(r["input_ids"]) for r in kept] == [expected_labels(tok, t)[0] for t in (TEXTS[0], TEXTS[1])]
    assert "skipped_no_assistant" in caplog.text and "skipped_empty_response" in caplog.text
    # keep TEXTS[0] up to its first response token; TEXTS[1]'s responses start later: dropped
    labels = expected_labels(tok, TEXTS[0])[1]
    cut = next(i for i, t in enumerate(labels) if t != -100) + 1
    short = pretokenize(data.select([0, 2]), tok, max_length=cut)
    assert short["labels"] == [list(labels[:cut])]


def test_construction_errors(tok):
    nopad = build_tokenizer(CORPUS, 300)
    nopad.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        SSTokenCollator(nopad)
    with pytest.raises(ValueError, match="on_bad_sample"):
        SSTokenCollator(tok, on_bad_sample="drop")
    with pytest.raises(ValueError, match="max_length"):
        SSTokenCollator(tok, max_length=0)
