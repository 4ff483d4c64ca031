"""AttnScore from the scoring hook equals transformers' own eager attention maps (output_attentions=True)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sstoken_trl.adapters import get_adapter
from sstoken_trl.hook import AttnScoreHook
from sstoken_trl.layout import batch_layout
from sstoken_trl.tiny import build_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
LAYOUTS = ["right", "left", "packed"]
VOCAB = 97


def make_batch(layout: str, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Three samples of different lengths with a prompt then a response; the model inputs and the labels."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [11, 7, 9], [4, 3, 5]
    ids = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    labels = [torch.cat([torch.full((p,), -100), x[p:]]) for x, p in zip(ids, prompts, strict=True)]
    if layout == "packed":
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        return {"input_ids": torch.cat(ids)[None], "position_ids": position_ids}, torch.cat(labels)[None]
    t = max(lengths)
    input_ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    label_rows = torch.full((3, t), -100)
    for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
        span = slice(0, len(x)) if layout == "right" else slice(t - len(x), t)
        input_ids[row, span], mask[row, span], label_rows[row, span] = x, 1, y
    return {"input_ids": input_ids, "attention_mask": mask}, label_rows


def eager_reference(model_type: str, inputs: dict, labels: torch.Tensor, layer: int, **shape) -> torch.Tensor:
    """Head-averaged attention mass on prompt tokens, read off the eager model's returned attention maps."""
    model = build_model(model_type, VOCAB, attn_implementation="eager", **shape).eval()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
    layout = batch_layout(labels, inputs.get("attention_mask"), inputs.get("position_ids"))
    return (out.attentions[layer] * layout.prompt[:, None, None, :]).sum(-1).mean(1)


def hooked_score(model_type: str, inputs: dict, labels: torch.Tensor, layer: int, backend: str, **shape):
    model = build_model(model_type, VOCAB, attn_implementation="sdpa", **shape).eval()
    hook = AttnScoreHook(model.model.layers[layer].self_attn, get_adapter(model_type), backend)
    layout = batch_layout(labels, inputs.get("attention_mask"), inputs.get("position_ids"))
    hook.arm(layout)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    return hook.take(), layout


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_hook_matches_eager_output_attentions(model_type, layout_name, backend):
    inputs, labels = make_batch(layout_name)
    for layer in (0, 1):
        score, layout = hooked_score(model_type, inputs, labels, layer, backend)
        expected = eager_reference(model_type, inputs, labels, layer)
        assert score.shape == labels.shape
        torch.testing.assert_close(score * layout.real, expected * layout.real, atol=1e-5, rtol=0)
        assert (score[layout.real] > 0).all()  # every real query sees its document's first (prompt) token


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_sliding_window_layer_matches_eager(backend):
    inputs, labels = make_batch("right")
    score, layout = hooked_score("mistral", inputs, labels, 1, backend, sliding_window=4)
    expected = eager_reference("mistral", inputs, labels, 1, sliding_window=4)
    torch.testing.assert_close(score * layout.real, expected * layout.real, atol=1e-5, rtol=0)
    # With a window of 4, the last token of an 11-token sample with a 4-token prompt sees no prompt token.
    assert score[0, 10] == 0


def test_gqa_is_exercised():
    model = build_model("llama", VOCAB)
    attn = model.model.layers[0].self_attn
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    assert attn.num_key_value_groups == 2


def test_sdpa_backend_runs_on_a_fused_kernel_without_materialising_weights():
    # The CPU flash kernel never builds the (B, H, T, T) map; restricted to it, a materialising path would fail.
    inputs, labels = make_batch("left")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        score, layout = hooked_score("llama", inputs, labels, 1, "sdpa")
    torch.testing.assert_close(
        score * layout.real, eager_reference("llama", inputs, labels, 1) * layout.real, atol=1e-5, rtol=0
    )
