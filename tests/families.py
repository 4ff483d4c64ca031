"""Tiny random configs of every supported decoder family: what differs where AttnScore is computed is switched on.

Two layers: layer 0 slides (window 4) where the family can, layer 1 is global, so both kinds are tested. The first
13 families were the first supported set; the rest are scored by the same code, with no per-family adapter.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from sstoken_trl.tools.tiny import TINY_SHAPE

WINDOW = 4
ALTERNATING = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": WINDOW}
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {**ALTERNATING, "use_sliding_window": True},
    "qwen3": {**ALTERNATING, "use_sliding_window": True, "head_dim": 16},
    "gemma2": {**ALTERNATING, "head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0},
    "gemma3_text": {**ALTERNATING, "head_dim": 16, "query_pre_attn_scalar": 24},
    "phi3": {"sliding_window": WINDOW, "partial_rotary_factor": 0.5},
    "olmo2": {},
    "mixtral": {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {
        **ALTERNATING,
        "use_sliding_window": True,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
    },
    "granite": {"attention_multiplier": 0.4},
    "smollm3": {**ALTERNATING, "use_sliding_window": True, "no_rope_layers": [1, 0]},
    "gpt_oss": {**ALTERNATING, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma": {"head_dim": 24},
    "olmo": {"clip_qkv": 0.5},
    "olmo3": ALTERNATING,
    "cohere": {"use_qk_norm": True},
    "cohere2": ALTERNATING,
    "glm": {"head_dim": 16},
    "glm4": {"head_dim": 16},
    "exaone4": ALTERNATING,
    "ministral": {**ALTERNATING, "head_dim": 16},
    "starcoder2": {"sliding_window": WINDOW},
    "stablelm": {"qk_layernorm": True},
    "gpt_neox": {},
    "phi": {"qk_layernorm": True},
    "gpt2": {},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
}
# Families whose attention goes through transformers' attention registry only from a given transformers release:
# before it, the structural gate must stop them (no registry call).
REGISTRY_SINCE = {"falcon": "5.25.0"}
EAGER_ONLY = {"gemma2", "gpt_oss"}  # transformers refuses sdpa for these (softcap, sinks)


def scored_here(model_type: str) -> bool:
    """Whether the installed transformers routes the family's attention through the registry (so it is scored)."""
    since = REGISTRY_SINCE.get(model_type)
    return since is None or Version(transformers.__version__) >= Version(since)


def gate_stops() -> AbstractContextManager:
    """The error a family gets where its layer makes no registry call."""
    return pytest.raises(ValueError, match="made no call into transformers' attention registry")


def family_config(model_type: str, vocab_size: int, **overrides) -> PretrainedConfig:
    # initializer_range 0.2: logits large enough that the softcap and the windows change the attention.
    kwargs = {**TINY_SHAPE, "initializer_range": 0.2, **FAMILY_CONFIGS[model_type], **overrides}
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, tie_word_embeddings=False, **ids, **kwargs)


def build_family_model(
    model_type: str, vocab_size: int, attn_implementation: str = "sdpa", seed: int = 0, **overrides
) -> PreTrainedModel:
    """A seeded random model of the family; sdpa falls back to eager only where transformers has no sdpa."""
    if model_type in EAGER_ONLY and attn_implementation == "sdpa":
        attn_implementation = "eager"
    torch.manual_seed(seed)
    config = family_config(model_type, vocab_size, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
