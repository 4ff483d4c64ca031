"""LLaMA: q_proj / k_proj without per-head norm, full causal attention."""

from sstoken_trl.adapters.base import AttnAdapter, no_window, project_qk

LLAMA = AttnAdapter(query_key=project_qk, sliding_window=no_window)
