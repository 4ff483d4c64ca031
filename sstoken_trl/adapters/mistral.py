"""Mistral: LLaMA's projections; every layer uses `config.sliding_window` when it is set."""

from sstoken_trl.adapters.base import AttnAdapter, config_window

MISTRAL = AttnAdapter(sliding_window=config_window, notes="`config.sliding_window` on every layer when set")
