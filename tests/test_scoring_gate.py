"""The structural gate and the on-the-spot check: which layers ssToken scores, and the proof for untested families.

A layer is scored when its forward makes exactly one call into transformers' attention registry, whatever its
family; anything else stops at train start with a message. Selectors that read no attention never look at the
architecture. A family outside the tested set is checked, on its first scored micro-batch, against its layer's
own eager attention probabilities.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from benchmarks.noisy_sft import RECOMMENDED_ONE_RUN
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.adapters import TESTED_FAMILIES, attention_modules, layer_windows
from sstoken_trl.integration.selective_forward import uses_attention
from sstoken_trl.scoring.attn_score import attn_score_sdpa
from sstoken_trl.scoring.hook import AttnScoreHook, hook_scoring_layer
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.tools.tiny import TINY_SHAPE
from tests.conftest import cpu_sft_args, prompt_completion_rows
from tests.families import FAMILY_CONFIGS, build_family_model, gate_stops, scored_here
from tests.test_attn_score import LAYOUTS, VOCAB, make_batch

UNTESTED = "seed_oss"  # a LLaMA-like family that is not in TESTED_FAMILIES


def tiny_model(model_type: str, vocab_size: int, attn_implementation: str = "sdpa", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    kwargs = {**TINY_SHAPE, "initializer_range": 0.2, **extra}
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, tie_word_embeddings=False, **ids, **kwargs)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def sft_trainer(tokenizer, model, config: SSTokenConfig, targets: list[str], **args) -> SFTTrainer:
    return SFTTrainer(
        model=model,
        args=SFTConfig(**cpu_sft_args(max_steps=1, learning_rate=1e-3, **args)),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=targets),
        callbacks=[SSTokenCallback(config)],
    )


class HandAttention(nn.Module):
    """Causal softmax attention computed inside the layer: its forward makes no call into the attention registry."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(config.hidden_size, config.hidden_size, bias=False))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        logits = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(b, t, -1)), weights


def hand_attention_model(vocab_size: int) -> torch.nn.Module:
    """A tiny LLaMA whose layer 1 computes its attention by hand."""
    model = tiny_model("llama", vocab_size)
    layer = model.model.layers[1]
    layer.self_attn = HandAttention(model.config)
    return model


def test_untested_family_is_really_untested():
    assert UNTESTED not in TESTED_FAMILIES


def test_layer_without_registry_call_stops_at_train_start(tokenizer):
    model = hand_attention_model(len(tokenizer))
    shapes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True)
    trainer = sft_trainer(tokenizer, model, SSTokenConfig(), ["q_proj", "v_proj"])
    message = (
        r"cannot score decoder layer 1 \(HandAttention, model_type='llama'\): its forward made no call into "
        r"transformers' attention registry.*Pick another attn_layer.*gamma=1.*selector that uses no attention"
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert shapes == [torch.Size([1, 8])]  # only the train-start probe ran, no training batch


@pytest.mark.parametrize(
    "config", [SSTokenConfig(selector="full"), SSTokenConfig(selector="random"), SSTokenConfig(gamma=1.0)]
)
def test_selectors_without_attention_train_such_a_model(tokenizer, config):
    callback = SSTokenCallback(config)
    trainer = SFTTrainer(
        model=hand_attention_model(len(tokenizer)),
        args=SFTConfig(**cpu_sft_args(max_steps=1, learning_rate=1e-3)),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        callbacks=[callback],
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    selection = callback.last_selection
    assert selection.response.any() and callback.selective_forward.hook is None
    assert (selection.attn_score == 0).all()
    if config.selector == "full":
        assert torch.equal(selection.keep, selection.response)
    else:
        assert 0 < selection.keep.sum() < selection.response.sum()


def test_without_the_probe_the_first_scored_forward_stops():
    # Under FSDP / ZeRO-3 the train-start probe is skipped; the first scored forward finds the same thing.
    model = hand_attention_model(VOCAB).eval()
    hook = hook_scoring_layer(model, SSTokenConfig(attn_layer=1), probe=False)
    inputs, labels = make_batch("right")
    hook.arm(batch_layout(labels, inputs["attention_mask"]))
    with pytest.raises(ValueError, match=r"cannot score decoder layer 1 \(HandAttention.*no call into"):
        with torch.no_grad():
            model(**inputs, use_cache=False)
    hook.remove()


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_falcon_multi_query_scores_its_eager_attention_or_is_stopped(layout_name):
    # Falcon's original form (one KV head, rotary); the grouped form is in the families table.
    inputs, labels = make_batch(layout_name)
    if not scored_here("falcon"):
        with gate_stops():
            hook_scoring_layer(tiny_model("falcon", VOCAB).eval(), SSTokenConfig())
        return
    eager = tiny_model("falcon", VOCAB, "eager").eval()
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True, use_cache=False).attentions
    layout = batch_layout(labels, inputs.get("attention_mask"), inputs.get("position_ids"))
    model = tiny_model("falcon", VOCAB).eval()
    hook = AttnScoreHook(attention_modules(model)[1], "sdpa")
    hook.arm(layout)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    score = hook.take()
    hook.remove()
    expected = (attentions[1] * layout.prompt[:, None, None, :]).sum(-1).mean(1)
    torch.testing.assert_close(score * layout.real, expected * layout.real, atol=1e-5, rtol=0)


@pytest.mark.parametrize("probe", [True, False])
def test_alibi_position_bias_is_refused(probe):
    # Falcon-RW's ALiBi adds a bias to the logits through the mask: a score from q and k would miss it.
    model = tiny_model("falcon", VOCAB, alibi=True).eval()
    if not scored_here("falcon"):
        with gate_stops():
            hook_scoring_layer(model, SSTokenConfig())
        return
    message = r"cannot score decoder layer 1 \(FalconAttention, model_type='falcon'\): the mask .* adds a bias"
    if probe:
        with pytest.raises(ValueError, match=message):
            hook_scoring_layer(model, SSTokenConfig())
        return
    hook = hook_scoring_layer(model, SSTokenConfig(), probe=False)
    inputs, labels = make_batch("right")
    hook.arm(batch_layout(labels, inputs["attention_mask"]))
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**inputs, use_cache=False)
    hook.remove()


def test_layer_with_two_registry_calls_is_refused():
    model = build_family_model("llama", VOCAB).eval()
    attn = attention_modules(model)[1]
    forward = attn.forward
    attn.forward = lambda *args, **kwargs: (forward(*args, **kwargs), forward(*args, **kwargs))[1]
    with pytest.raises(ValueError, match=r"cannot score decoder layer 1 \(LlamaAttention.*made 2 calls into"):
        hook_scoring_layer(model, SSTokenConfig())
    assert not attn._forward_pre_hooks  # the refused hook is removed
    del attn.forward
    hook_scoring_layer(model, SSTokenConfig()).remove()  # the same layer with one call passes


def test_model_without_attention_modules_names_what_it_holds():
    model = tiny_model("mamba", VOCAB, "eager", state_size=4)
    with pytest.raises(ValueError, match=r"decoder layer 1 \(MambaBlock\) has no attention module.*mixer \(Mamba"):
        hook_scoring_layer(model, SSTokenConfig())


def test_exaone4_global_layers_are_reported_global():
    # Exaone 4 stores sliding_window on every layer but applies it on its layer_types sliding layers only.
    model = build_family_model("exaone4", VOCAB)
    assert [attn.sliding_window for attn in attention_modules(model)] == [4, 4]
    assert layer_windows(model) == [4, None]


def on_the_spot(model, inputs, labels, layer: int, score_fn=None) -> AttnScoreHook:
    hook = AttnScoreHook(attention_modules(model)[layer], "sdpa", layer)
    hook.check_pending = True
    if score_fn is not None:
        hook.score_fn = score_fn
    hook.arm(batch_layout(labels, inputs.get("attention_mask"), inputs.get("position_ids")))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
        hook.take()
    finally:
        hook.remove()
    return hook


@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "exaone4", "gpt_neox", "gpt2", UNTESTED])
def test_check_agrees_with_the_layer_s_eager_attention(model_type, layout_name):
    if model_type == UNTESTED:
        model = tiny_model(UNTESTED, VOCAB).eval()
    else:
        model = build_family_model(model_type, VOCAB).eval()
    inputs, labels = make_batch(layout_name)
    for layer in (0, 1):
        result = on_the_spot(model, inputs, labels, layer).check_result
        assert result.passed and result.max_diff < 1e-5 and result.mask == "model"
        assert result.map_bytes == 3 * 4 * 11 * 11 * 4 if layout_name != "packed" else 4 * 27 * 27 * 4


@pytest.mark.parametrize(
    "model_type,layer,broken",
    [
        ("gemma2", 1, lambda call: replace(call, softcap=None)),  # a softcap the score would miss
        ("gemma2", 1, lambda call: replace(call, scaling=call.query.size(-1) ** -0.5)),  # query_pre_attn_scalar
        ("mistral", 0, lambda call: replace(call, sliding_window=None)),  # a window the score would miss
    ],
)
def test_check_stops_a_score_that_misses_what_the_layer_applies(model_type, layer, broken):
    model = build_family_model(model_type, VOCAB).eval()
    inputs, labels = make_batch("right")
    with pytest.raises(ValueError, match=r"differs from that layer's own eager attention probabilities: max \|diff\|"):
        on_the_spot(model, inputs, labels, layer, lambda call, layout: attn_score_sdpa(broken(call), layout))


def test_check_in_bf16_stays_within_its_tolerance():
    model = build_family_model("qwen3", VOCAB).to(torch.bfloat16).eval()
    inputs, labels = make_batch("left")
    result = on_the_spot(model, inputs, labels, 0).check_result
    assert result.passed and 0 < result.max_diff <= result.tolerance == 1e-2


def test_untested_family_is_checked_once_in_a_real_sft_run(tokenizer, caplog):
    callback = SSTokenCallback(SSTokenConfig(select_ratio=0.5))
    trainer = SFTTrainer(
        model=tiny_model(UNTESTED, len(tokenizer)),
        # bf16 autocast, TRL's default also on CPU: the check replays the call as the forward runs it
        args=SFTConfig(
            **cpu_sft_args(max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2, bf16=True)
        ),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        callbacks=[callback],
    )
    with caplog.at_level(logging.WARNING, logger="sstoken_trl.scoring.check"):
        trainer.train()
    checks = [r.getMessage() for r in caplog.records if r.name == "sstoken_trl.scoring.check"]
    assert len(checks) == 1, checks  # 4 scored micro-batches, one check
    assert f"model_type='{UNTESTED}' is not among the tested families" in checks[0] and "agrees" in checks[0]
    result = callback.selective_forward.hook.check_result
    assert result.passed and result.tolerance == 1e-2 and result.max_diff > 0  # bf16: the looser tolerance
    assert callback.selective_forward.calls == 0 and callback.last_selection.attn_score.abs().sum() > 0


def test_tested_families_are_not_checked(tokenizer, caplog):
    model = build_family_model("llama", len(tokenizer))
    hook = hook_scoring_layer(model, SSTokenConfig())
    assert not hook.check_pending and set(FAMILY_CONFIGS) == set(TESTED_FAMILIES)
    hook.remove()


@pytest.mark.parametrize(
    "config,expected",
    [
        (SSTokenConfig(), True),
        (SSTokenConfig(gamma=0.0), True),
        (SSTokenConfig(gamma=1.0), False),
        (SSTokenConfig(gamma=1.0, rel_warmup_steps=2), True),  # gamma 0 during the REL warm-up reads attention
        (SSTokenConfig(selector="full"), False),
        (SSTokenConfig(selector="random"), False),
        (SSTokenConfig(selector="rho1", history="model", history_model="ref"), False),
        (SSTokenConfig(selector="loss_truncation", history="model", history_model="run1"), False),
        (SSTokenConfig.recommended(), False),
        (SSTokenConfig(**RECOMMENDED_ONE_RUN), False),  # gamma 1: REL only
    ],
)
def test_which_configurations_read_attention(config, expected):
    assert uses_attention(config, max_steps=10) == expected
