"""AttnScore from the scoring hook equals transformers' own eager attention maps (output_attentions=True)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sstoken_trl.scoring.hook import AttnScoreHook
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.tools.tiny import build_model

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
    hook = AttnScoreHook(model.model.layers[layer].self_attn, backend)
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


def test_multi_turn_response_attends_to_every_earlier_prompt_turn_but_not_earlier_responses():
    # system(0-2) user1(3-5) answer1(6-8) user2(9-11) answer2(12-15): answers carry labels.
    input_ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.full((1, 16), -100)
    answers = [range(6, 9), range(12, 16)]
    for span in answers:
        labels[0, list(span)] = input_ids[0, list(span)]
    prompt_columns = [0, 1, 2, 3, 4, 5, 9, 10, 11]  # written out by hand: every non-answer token
    score, _ = hooked_score("llama", {"input_ids": input_ids}, labels, 1, "sdpa")
    model = build_model("llama", VOCAB, attn_implementation="eager").eval()
    with torch.no_grad():
        maps = model(input_ids=input_ids, output_attentions=True, use_cache=False).attentions[1]
    expected = maps[..., prompt_columns].sum(-1).mean(1)
    torch.testing.assert_close(score, expected, atol=1e-5, rtol=0)
    # Answer 2 gives attention to the first answer's tokens that does NOT count.
    to_answer1 = maps[0, :, 12:16][..., 6:9].sum(-1).mean(0)
    assert (to_answer1 > 1e-3).all()
    torch.testing.assert_close(
        score[0, 12:16] + to_answer1, maps[0, :, 12:16][..., :12].sum(-1).mean(0), atol=1e-5, rtol=0
    )


def test_lora_dropout_is_off_while_scoring():
    from peft import LoraConfig, get_peft_model

    inputs, labels = make_batch("right")
    model = build_model("llama", VOCAB)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear", init_lora_weights=False)
    )
    # Layer 0: its input is the embedding, which dropout does not touch, so only the scoring's own q/k could differ.
    attn = peft_model.get_base_model().model.layers[0].self_attn
    layout = batch_layout(labels, inputs.get("attention_mask"))
    scores = []
    for train in (True, True, False):
        peft_model.train(train)
        hook = AttnScoreHook(attn, "sdpa")
        hook.arm(layout)
        with torch.no_grad():
            peft_model(**inputs, use_cache=False)
        scores.append(hook.take())
        hook.remove()
    assert peft_model.training is False and attn.q_proj.lora_dropout["default"].training is False
    torch.testing.assert_close(scores[0], scores[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(scores[1], scores[2], atol=1e-6, rtol=0)
