"""LLaMA: q_proj / k_proj without per-head norm, full causal attention."""

from sstoken_trl.adapters.base import AttnAdapter, no_window

LLAMA = AttnAdapter(sliding_window=no_window, notes="full causal attention on every layer")
