"""The decoder families tested in CI, keyed by `config.model_type`: one table, what differs where AttnScore is read.

Nothing here is needed to score a family: every model whose scored layer calls transformers' attention registry
once per forward is scored by the same code. A family in this table is tested against transformers' eager
`output_attentions` and in a real SFTTrainer step; any other one is checked on the spot on its first scored
micro-batch (`scoring.check`).
"""

from __future__ import annotations

TESTED_FAMILIES: dict[str, str] = {
    "llama": "full causal attention on every layer",
    "mistral": "`config.sliding_window` on every layer when set",
    "mixtral": "Mistral attention, MoE MLP",
    "qwen2": "biased q/k; window on the `layer_types` sliding layers",
    "qwen3": "per-head q/k RMS norm",
    "qwen3_moe": "Qwen3 attention, MoE MLP",
    "gemma": "head_dim set apart from hidden_size / heads",
    "gemma2": "`query_pre_attn_scalar`, logit softcap; sliding / global alternate",
    "gemma3_text": "per-head q/k norm, `query_pre_attn_scalar`; 5 sliding layers per global",
    "phi3": "fused `qkv_proj`, partial RoPE; `sliding_window` on every layer when set",
    "olmo": "clipped q/k/v (`clip_qkv`)",
    "olmo2": "q/k RMS norm over the whole projection",
    "olmo3": "OLMo 2 attention; sliding / global layers from `layer_types`",
    "granite": "scaling = `attention_multiplier`",
    "smollm3": "no RoPE on the layers `no_rope_layers` marks 0",
    "gpt_oss": "attention sinks; sliding / global alternate",
    "cohere": "parallel attention and MLP, interleaved RoPE",
    "cohere2": "sliding layers with RoPE, global layers without",
    "glm": "partial, interleaved RoPE",
    "glm4": "GLM attention with extra post-norms",
    "exaone4": "q/k norm; `sliding_window` stored on every layer, applied on `layer_types` sliding layers only",
    "ministral": "Mistral attention; sliding / global layers from `layer_types`",
    "starcoder2": "biased projections, `sliding_window` on every layer",
    "stablelm": "partial RoPE, optional per-head q/k layer norm",
    "gpt_neox": "fused `query_key_value` under `layer.attention`, partial RoPE",
    "phi": "partial RoPE, optional q/k layer norm",
    "gpt2": "learned positions, fused `c_attn` under `layer.attn`",
    "falcon": "fused `query_key_value` under `layer.self_attention`, multi-query or grouped KV; from transformers "
    "5.25 (earlier releases compute attention inside the layer: stopped at train start); ALiBi (`alibi=True`) refused",
}
