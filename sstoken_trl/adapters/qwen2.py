"""Qwen2: biased q/k projections; sliding window on the layers whose type is "sliding_attention"."""

from sstoken_trl.adapters.base import AttnAdapter, layer_window

QWEN2 = AttnAdapter(sliding_window=layer_window, notes="biased q/k; window on `layer_types` sliding layers")
