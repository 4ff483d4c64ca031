"""history="cache": base losses stored once, keyed by sample content, equal to the online base history."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.data.collator import SSTokenCollator
from sstoken_trl.history import BaseHistory
from sstoken_trl.history.cache import CACHED_LOG_PROBS, MANIFEST, RESUME_FILE
from sstoken_trl.tools.tiny import build_model, build_tokenizer
from tests.conftest import cpu_sft_args, prompt_completion_rows
from tests.reference import token_log_probs


class Recorder(TrainerCallback):
    """Keeps each step's selection and counts calls of the fused forward (history forwards included)."""

    def __init__(self, sstoken: SSTokenCallback) -> None:
        self.sstoken = sstoken
        self.selections = []
        self.forwards = 0

    def on_train_begin(self, args, state, control, **kwargs):
        step = self.sstoken.selective_forward
        fused = step.forward

        def counted(*a, **kw):
            self.forwards += 1
            return fused(*a, **kw)

        step.forward = counted

    def on_step_end(self, args, state, control, **kwargs):
        self.selections.append(self.sstoken.last_selection)


def train(tokenizer, config, rows=None, model_seed=0, lora=True, probes=(), resume=None, **overrides):
    args = cpu_sft_args(
        **(
            {
                "output_dir": "/tmp/sstoken-test-cache",
                "max_steps": 3,
                "per_device_train_batch_size": 4,
                "learning_rate": 2e-2,
                "logging_steps": 1,
            }
            | overrides
        )
    )
    sstoken = SSTokenCallback(config)
    recorder = Recorder(sstoken)
    trainer = SFTTrainer(
        model=build_model("llama", len(tokenizer), seed=model_seed),
        args=SFTConfig(**args),
        train_dataset=Dataset.from_list(rows or prompt_completion_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if lora else None,
        callbacks=[sstoken, recorder, *(probe(sstoken) for probe in probes)],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


@pytest.fixture(scope="module")
def runs(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "base-losses"
    online = train(tokenizer, SSTokenConfig(history="base"))
    cached = train(tokenizer, SSTokenConfig(history="cache", history_cache_dir=str(folder)))
    return folder, online, cached


def test_cached_and_online_base_history_give_the_same_selections(runs):
    _, (_, online), (_, cached) = runs
    assert len(online.selections) == len(cached.selections) == 3
    for a, b in zip(online.selections, cached.selections, strict=True):
        assert torch.equal(a.keep, b.keep) and torch.equal(a.input_ids, b.input_ids)
        torch.testing.assert_close(a.rel, b.rel, atol=1e-5, rtol=0)
        assert a.rel.abs().max() > 1e-3  # REL is not trivially zero: the selections are driven by it
    assert online.forwards == 2 * 3  # one history forward per micro-batch
    assert cached.forwards == 3  # the cache needs none


def test_cache_holds_the_base_losses_of_every_sample_in_plain_numpy(runs):
    folder, _, (trainer, _) = runs
    manifest = json.loads((folder / MANIFEST).read_text())
    keys, offsets, losses = (np.load(folder / f"{n}.npy", allow_pickle=False) for n in ("keys", "offsets", "losses"))
    samples = [list(ids) for ids in trainer.train_dataset["input_ids"]]
    assert manifest["samples"] == len(keys) == len({tuple(s) for s in samples})
    assert manifest["tokens"] == offsets[-1] == len(losses) == sum(len(s) - 1 for s in {tuple(s) for s in samples})
    assert np.all(np.diff(keys.astype(np.float64)) > 0) and losses.dtype == np.float32
    base = build_model("llama", trainer.model.config.vocab_size)  # the same seed: the base model, loaded apart
    cache = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SSTokenCallback)).history.cache
    for ids in samples:
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            expected = -token_log_probs(base(input_ids=input_ids).logits, input_ids)[0]
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        torch.testing.assert_close(-cache.log_probs(batch)[0], expected, atol=1e-5, rtol=0)


class CompareOnline(TrainerCallback):
    """Each time the cached history is read, computes the online base history of the same batch beside it."""

    def __init__(self, sstoken: SSTokenCallback) -> None:
        self.sstoken = sstoken
        self.pairs = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        history = self.sstoken.history
        read = history.log_probs

        def compared(forward, inputs):
            cached = read(forward, inputs)
            model_inputs = {k: v for k, v in inputs.items() if k != CACHED_LOG_PROBS}
            self.pairs.append((cached, BaseHistory(model).log_probs(forward, model_inputs), inputs))
            return cached

        history.log_probs = compared


def test_cache_is_keyed_by_content_and_reused_under_packing(runs, tokenizer):
    folder, _, _ = runs
    written = (folder / "losses.npy").stat().st_mtime_ns
    config = SSTokenConfig(history="cache", history_cache_dir=str(folder))
    trainer, _ = train(tokenizer, config, probes=(CompareOnline,), max_steps=2, packing=True, max_length=64)
    assert (folder / "losses.npy").stat().st_mtime_ns == written  # reused, not rebuilt
    pairs = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CompareOnline)).pairs
    assert len(pairs) == 2
    for cached, online, inputs in pairs:
        assert "attention_mask" not in inputs and (inputs["position_ids"] == 0).sum() > 1  # packed documents
        response = inputs["labels"][:, 1:] != -100
        torch.testing.assert_close(cached[response], online[response], atol=1e-5, rtol=0)
        assert cached[response].abs().min() > 0  # every response position was found in the cache


def test_cache_is_rejected_for_another_model_tokenizer_or_data(runs, tokenizer):
    folder, _, _ = runs
    config = SSTokenConfig(history="cache", history_cache_dir=str(folder))
    with pytest.raises(ValueError, match="another model"):
        train(tokenizer, config, model_seed=1)
    corpus = [r["prompt"].upper() + r["completion"] for r in prompt_completion_rows(200, seed=1)]
    other_tokenizer = build_tokenizer(corpus, vocab_size=300)
    assert len(other_tokenizer) == len(tokenizer)  # the same model shape and weights: only the tokenizer differs
    with pytest.raises(ValueError, match="another tokenizer"):
        train(other_tokenizer, config)
    with pytest.raises(ValueError, match="training samples are not in the loss cache"):
        train(tokenizer, config, rows=prompt_completion_rows(8, seed=9))


def test_full_finetune_resume_takes_the_base_fingerprint_from_the_checkpoint(tokenizer, tmp_path):
    config = SSTokenConfig(history="cache", history_cache_dir=str(tmp_path / "losses"))
    first, _ = train(tokenizer, config, lora=False, output_dir=str(tmp_path / "a"), save_strategy="steps", save_steps=1)
    checkpoint = tmp_path / "a" / "checkpoint-1"
    assert (checkpoint / RESUME_FILE).is_file()
    resumed, recorder = train(tokenizer, config, lora=False, output_dir=str(tmp_path / "b"), resume=str(checkpoint))
    assert resumed.state.global_step == 3 and len(recorder.selections) == 2
    # The trained weights of the checkpoint are not the base model: fingerprinting them would reject the cache.
    (checkpoint / RESUME_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=RESUME_FILE):
        train(tokenizer, config, lora=False, output_dir=str(tmp_path / "c"), resume=str(checkpoint))


def test_cache_passes_leave_the_collators_counts_to_training(tokenizer, tmp_path):
    texts = [f"<|User|>{r['prompt']}<|Assistant|>{r['completion']}" for r in prompt_completion_rows(8)]
    counts = {}
    for history in ("base", "cache"):
        collator = SSTokenCollator(tokenizer)
        sstoken = SSTokenCallback(
            SSTokenConfig(history=history, history_cache_dir=str(tmp_path / "losses") if history == "cache" else None)
        )
        trainer = SFTTrainer(
            model=build_model("llama", len(tokenizer)),
            args=SFTConfig(
                output_dir=str(tmp_path / "out"),
                max_steps=1,
                per_device_train_batch_size=4,
                report_to=[],
                use_cpu=True,
                bf16=False,
                save_strategy="no",
                disable_tqdm=True,
            ),
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=tokenizer,
            data_collator=collator,
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
            callbacks=[sstoken],
        )
        trainer.train()
        counts[history] = dict(collator.counts)
        assert sstoken.last_selection.keep.any()
    assert json.loads((tmp_path / "losses" / MANIFEST).read_text())["samples"] == 8  # built through the collator
    assert counts["cache"] == counts["base"]  # the build and data-check passes over 8 samples are not counted


def test_cache_needs_a_folder():
    with pytest.raises(ValueError, match="history_cache_dir"):
        SSTokenConfig(history="cache")
