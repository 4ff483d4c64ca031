"""Which settings each selector reads, so that a setting it would ignore is refused instead of silently unused.

A setting given a value other than its default that the chosen selector never reads stops the configuration with
the reason (SSTokenConfig refuses it): a user who sets `history_model` for a selector that reads no history, or
`surprise_nats` for ssToken, believes it acts. `full` is the exception: it is the plain-SFT baseline, reached from
any recipe with one flag, so it reads every setting and ignores them all by design.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

from sstoken_trl.selection.selectors import get_selector

if TYPE_CHECKING:
    from sstoken_trl.config import SSTokenConfig

# Read by every selector that selects per micro-batch (the seed also breaks ties).
SELECTING = {"select_ratio", "scope", "select_warmup_ratio", "drop_weight", "seed"}
# Read by the selectors that implement them.
ENDS = {"protect_response_end"}
REL = {"rel_norm", "his_loss_clip", "rel_keep_threshold", "rel_warmup_steps", "rel_warmup_ratio"}
ATTENTION = {"attn_layer", "attn_backend"}
HISTORY_BY_SOURCE = {
    "model": {"history_model"},
    "ema": {"ema_alpha", "ema_update_steps", "ema_on_cpu"},
    "cache": {"history_cache_dir"},
}
OWN = {  # each selector's own settings, beside the groups above
    "random": SELECTING,
    "rho1": SELECTING,
    "sstoken": SELECTING | ENDS | {"gamma"},
    "loss_truncation": SELECTING | ENDS | {"truncation_loss"},
    "self_truncation": SELECTING | ENDS | {"surprise_nats"},
    "entropy_weighted": {"select_warmup_ratio", "seed"},
}


def read_settings(config: SSTokenConfig) -> set[str]:
    """The settings `config.selector` reads, given the rest of the configuration."""
    names = {f.name for f in fields(config)}
    if config.selector not in OWN:  # full (the baseline switch) and the offline selectors
        return names
    selector = get_selector(config.selector)
    read = {"selector", "audit_dir"} | OWN[config.selector]  # every selection can be recorded
    if config.selector == "sstoken":
        if config.gamma > 0:
            read |= REL
        if selector.needs_attention(config, config.gamma) or config.rel_warmup_steps or config.rel_warmup_ratio:
            read |= ATTENTION
    if selector.needs_history(config, config.gamma):
        read |= {"history"} | HISTORY_BY_SOURCE.get(config.history, set())
    return read


def ignored_settings(config: SSTokenConfig) -> list[str]:
    """The settings given a value other than their default that `config.selector` does not read."""
    read = read_settings(config)
    return [f.name for f in fields(config) if f.name not in read and getattr(config, f.name) != f.default]


def readers(name: str) -> str:
    """Who reads the setting `name` (full aside), for messages."""
    if name in ATTENTION:
        return "sstoken with gamma < 1"
    if name in REL:
        return "sstoken with gamma > 0"
    for source, knobs in HISTORY_BY_SOURCE.items():
        if name in knobs:
            return f"history={source!r}, with a selector that reads a history (sstoken, rho1, loss_truncation)"
    if name == "history":
        return "the selectors that read a history: sstoken (gamma > 0), rho1, loss_truncation"
    return ", ".join(s for s, own in OWN.items() if name in own) or "no selector"


class IgnoredSettingError(ValueError):
    """A setting given a value that the chosen selector would not read."""


def check_read(config: SSTokenConfig) -> None:
    """Raise, naming each setting the selector would ignore, who reads it and what to do."""
    ignored = ignored_settings(config)
    if not ignored:
        return
    reasons = "; ".join(f"{name}={getattr(config, name)!r} (read by {readers(name)})" for name in ignored)
    raise IgnoredSettingError(
        f"selector={config.selector!r} would ignore {reasons}. Unset {'it' if len(ignored) == 1 else 'them'}, or "
        "choose the settings that read them."
    )


__all__ = ["IgnoredSettingError", "check_read", "ignored_settings", "read_settings", "readers"]
