"""AttnScore for every supported decoder family equals transformers' eager `output_attentions` of that layer.

Each family's tiny config switches on what differs where the score is computed (softcap, query_pre_attn_scalar,
q/k norms, fused qkv, attention_multiplier, NoPE layers, sliding windows, sinks); layer 0 slides where the family
can, layer 1 is global. Right-padded, left-padded and packed (padding-free position_ids) batches.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sstoken_trl.adapters import TESTED_FAMILIES, attention_modules, last_global_layer, layer_windows
from sstoken_trl.scoring.hook import AttnScoreHook
from sstoken_trl.scoring.layout import batch_layout
from tests.families import EAGER_ONLY, FAMILY_CONFIGS, WINDOW, build_family_model, gate_stops, scored_here
from tests.test_attn_score import LAYOUTS, VOCAB, make_batch

FAMILIES = list(FAMILY_CONFIGS)


@functools.cache
def model(model_type: str, attn_implementation: str):
    return build_family_model(model_type, VOCAB, attn_implementation).eval()


def eager_reference(model_type: str, inputs: dict, labels: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(model_type, "eager")(**inputs, output_attentions=True, use_cache=False)
    layout = batch_layout(labels, inputs.get("attention_mask"), inputs.get("position_ids"))
    return (out.attentions[layer] * layout.prompt[:, None, None, :]).sum(-1).mean(1)


def hooked(
    model_type: str,
    inputs: dict,
    labels: torch.Tensor,
    layer: int,
    backend: str,
    impl: str = "sdpa",
    recompute: bool = False,
):
    m = model(model_type, impl)
    hook = AttnScoreHook(attention_modules(m)[layer], backend)
    hook.always_recompute = recompute
    layout = batch_layout(labels, inputs.get("attention_mask"), inputs.get("position_ids"))
    hook.arm(layout)
    try:
        with torch.no_grad():
            m(**inputs, use_cache=False)
        return hook.take(), layout, hook.last_window
    finally:
        hook.remove()


def test_every_family_is_covered():
    assert set(FAMILIES) == set(TESTED_FAMILIES)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_score_matches_eager_output_attentions(model_type, layout_name, backend):
    if model_type == "gpt_oss" and layout_name == "packed":
        pytest.skip("transformers' GPT-OSS builds its eager mask without position_ids: documents mix (not a reference)")
    inputs, labels = make_batch(layout_name)
    if not scored_here(model_type):
        with gate_stops():
            hooked(model_type, inputs, labels, 1, backend)
        return
    windows = layer_windows(model(model_type, "sdpa"))
    for layer in (0, 1):
        score, layout, window = hooked(model_type, inputs, labels, layer, backend)
        expected = eager_reference(model_type, inputs, labels, layer)
        torch.testing.assert_close(score * layout.real, expected * layout.real, atol=1e-5, rtol=0)
        if window is None:  # every real query sees its document's first (prompt) token
            assert (score[layout.real] > 0).all()
        assert window == windows[layer]  # the adapter's layer kinds are what the layer really passes


@pytest.mark.parametrize("model_type", FAMILIES)
def test_recompute_path_scores_the_same(model_type):
    # The path taken when dropout inside the layer is active: a no-grad recompute stopped at the attention call.
    inputs, labels = make_batch("left")
    if not scored_here(model_type):
        with gate_stops():
            hooked(model_type, inputs, labels, 1, "sdpa", recompute=True)
        return
    for layer in (0, 1):
        score, layout, _ = hooked(model_type, inputs, labels, layer, "sdpa", recompute=True)
        expected = eager_reference(model_type, inputs, labels, layer)
        torch.testing.assert_close(score * layout.real, expected * layout.real, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3_moe"])
def test_scoring_in_the_training_forward_leaves_its_output_and_config_alone(model_type):
    inputs, labels = make_batch("packed")
    m = model(model_type, "sdpa")
    with torch.no_grad():
        plain = m(**inputs, use_cache=False).logits
    attn = attention_modules(m)[1]
    hook = AttnScoreHook(attn, "sdpa")
    hook.arm(batch_layout(labels, None, inputs["position_ids"]))
    with torch.no_grad():
        scored = m(**inputs, use_cache=False).logits
    hook.take()
    hook.remove()
    assert torch.equal(plain, scored)
    assert attn.config is m.config


def test_windows_and_softcap_are_exercised():
    # The 11-token right-padded sample has a 4-token prompt: with a window of 4 its last token sees no prompt.
    inputs, labels = make_batch("right")
    sliding = ("mistral", "qwen2", "gemma2", "gemma3_text", "phi3", "smollm3", "gpt_oss", "olmo3", "cohere2", "exaone4")
    for model_type in (*sliding, "ministral", "starcoder2"):
        score, _, window = hooked(model_type, inputs, labels, 0, "sdpa")
        assert window == WINDOW and score[0, 10] == 0, model_type
    # Without its softcap, Gemma 2's attention would differ: the cap is applied, not ignored.
    gemma2 = model("gemma2", "sdpa")  # runs eager: transformers has no sdpa for Gemma 2
    cap = gemma2.config.attn_logit_softcapping
    gemma2.config.attn_logit_softcapping = None
    for attn in attention_modules(gemma2):
        attn.attn_logit_softcapping = None
    try:
        uncapped, _, _ = hooked("gemma2", inputs, labels, 1, "sdpa")
    finally:
        gemma2.config.attn_logit_softcapping = cap
        for attn in attention_modules(gemma2):
            attn.attn_logit_softcapping = cap
    capped, layout, _ = hooked("gemma2", inputs, labels, 1, "sdpa")
    assert (capped - uncapped)[layout.real].abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi3", "smollm3"])
def test_eager_training_forward_scores_the_same(model_type):
    inputs, labels = make_batch("left")
    expected = eager_reference(model_type, inputs, labels, 0)
    score, layout, _ = hooked(model_type, inputs, labels, 0, "sdpa", impl="eager")
    torch.testing.assert_close(score * layout.real, expected * layout.real, atol=1e-5, rtol=0)


def test_flash_attention_2_training_forward_when_installed():
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("flash_attention_2 needs a GPU")
    inputs, labels = make_batch("packed")
    m = build_family_model("llama", VOCAB, "flash_attention_2").to("cuda", torch.bfloat16).eval()
    hook = AttnScoreHook(attention_modules(m)[1], "sdpa")
    layout = batch_layout(labels.cuda(), None, inputs["position_ids"].cuda())
    hook.arm(layout)
    with torch.no_grad():
        m(**{k: v.cuda() for k, v in inputs.items()}, use_cache=False)
    expected = eager_reference("llama", inputs, labels, 1)
    torch.testing.assert_close(hook.take().cpu(), expected, atol=2e-2, rtol=0)


def test_last_global_layer_per_family():
    assert last_global_layer(model("gemma3_text", "sdpa")) == 1
    assert last_global_layer(model("llama", "sdpa")) == 1
    assert last_global_layer(model("exaone4", "sdpa")) == 1  # its layers all store a window; layer 1 ignores it
    with pytest.raises(ValueError, match="mistral.*no global layer"):
        last_global_layer(model("mistral", "sdpa"))


@pytest.mark.parametrize("model_type", sorted(EAGER_ONLY))
def test_eager_only_families_refuse_sdpa_in_transformers(model_type):
    # Documents why these families train with eager in the tests: transformers itself has no sdpa path for them.
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        from transformers import AutoModelForCausalLM

        from tests.families import family_config

        AutoModelForCausalLM.from_config(family_config(model_type, VOCAB), attn_implementation="sdpa")
