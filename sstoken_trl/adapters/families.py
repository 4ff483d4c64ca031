"""Decoder families beyond the design card's LLaMA / Qwen2 line, each keyed by its transformers model types."""

from sstoken_trl.adapters.base import AttnAdapter, config_window, layer_window, no_window

GEMMA2 = AttnAdapter(
    sliding_window=layer_window,
    notes="queries scaled by query_pre_attn_scalar, logit softcap; sliding and global layers alternate",
)
GEMMA3_TEXT = AttnAdapter(
    sliding_window=layer_window, notes="per-head q/k RMS norm, query_pre_attn_scalar; 5 sliding layers per global one"
)
PHI3 = AttnAdapter(sliding_window=config_window, notes="fused qkv_proj, partial RoPE; `config.sliding_window` if set")
OLMO2 = AttnAdapter(sliding_window=no_window, notes="RMS norm over the whole q and k projections")
MIXTRAL = AttnAdapter(sliding_window=config_window, notes="Mistral attention with MoE MLP")
QWEN3_MOE = AttnAdapter(sliding_window=layer_window, notes="Qwen3 attention with MoE MLP")
GRANITE = AttnAdapter(sliding_window=no_window, notes="scaling = config.attention_multiplier")
SMOLLM3 = AttnAdapter(sliding_window=layer_window, notes="no RoPE on the layers `no_rope_layers` marks 0")
GPT_OSS = AttnAdapter(sliding_window=layer_window, notes="attention sinks; sliding and global layers alternate")
