"""Mistral: LLaMA's projections; every layer uses `config.sliding_window` when it is set."""

from torch import nn

from sstoken_trl.adapters.base import AttnAdapter, project_qk


def mistral_window(attn: nn.Module) -> int | None:
    return getattr(attn.config, "sliding_window", None)


MISTRAL = AttnAdapter(query_key=project_qk, sliding_window=mistral_window)
