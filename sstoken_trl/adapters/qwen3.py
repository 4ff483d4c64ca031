"""Qwen3: RMS norm on each query and key head before RoPE; sliding window per layer type, as Qwen2."""

from sstoken_trl.adapters.base import AttnAdapter, layer_window

QWEN3 = AttnAdapter(sliding_window=layer_window, notes="per-head q/k RMS norm; window per layer type")
