"""A selection rule in words, and which per-token signals it reads, for the selection page and summary."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.selection.selectors import get_selector

COLUMNS = ("REL", "AttnScore", "Score", "Weight")


@dataclass(frozen=True)
class Rule:
    name: str  # "loss truncation"
    text: str  # the rule, with its settings and what Score is
    columns: tuple[str, ...]  # the signals that are not zero (or constant) by construction, of COLUMNS
    drop_weight: float = 0.0  # the loss weight of a left-out token (0: dropped)


def _history(config: SSTokenConfig) -> str:
    return {
        "base": "the base model (adapters off)",
        "model": f"the model {config.history_model}",
        "ema": f"an EMA of the trained weights (alpha {config.ema_alpha})",
        "snapshot": "the model as it was when the selection warm-up ended",
        "cache": f"the base-model losses cached in {config.history_cache_dir}",
    }[config.history]


def _log_v(config: SSTokenConfig, multiple: float, vocab_size: int | None) -> str:
    """`c x log V = x nats, where V = ...`: the threshold a uniform guess over the vocabulary sets."""
    if not vocab_size or vocab_size < 2:
        raise ValueError(f"Describing selector {config.selector!r} needs the model's vocabulary size (vocab_size).")
    times = "" if multiple == 1 else f"{multiple:g} x "
    return f"{times}log V = {multiple * math.log(vocab_size):.2f} nats (V = {vocab_size}, the vocabulary size)"


def _sstoken(config: SSTokenConfig, within: str, vocab_size: int | None, history: bool) -> str:
    g = config.gamma
    rel = "REL" if config.rel_norm == "none" else f"{config.rel_norm}(REL)"
    formula = rel if g == 1 else "AttnScore" if g == 0 else f"{g:g} x {rel} + {1 - g:g} x AttnScore"
    kept = f"the top ceil({config.select_ratio:g} x n) are kept"
    sentences = [f"{within} response tokens are ranked by Score = {formula} and {kept}."]
    if not history:
        sentences.append("There is no history model, so REL is 0 and the tokens are ranked by AttnScore alone.")
    elif g > 0:
        clip = config.his_loss_clip
        clipped = f", L_his clipped at {_log_v(config, clip, vocab_size)}" if clip is not None else ""
        sentences.append(f"REL = L_his - L_cur against {_history(config)}{clipped}.")
    if g < 1:
        sentences.append(f"AttnScore: attention to the prompt at decoder layer {config.attn_layer}.")
    if config.rel_keep_threshold is not None:
        sentences.append(f"Every token with REL >= {config.rel_keep_threshold:g} nats is kept too.")
    if config.rel_warmup_steps or config.rel_warmup_ratio:
        span = f"{config.rel_warmup_steps} steps" if config.rel_warmup_steps else f"{config.rel_warmup_ratio:.0%}"
        sentences.append(f"gamma is 0 for the first {span} of training.")
    return " ".join(sentences)


def _loss_truncation(config: SSTokenConfig, within: str, vocab_size: int | None) -> str:
    end = ", never a response's last token" if config.protect_response_end else ""
    return (
        f"a token is dropped when the reference model {config.history_model} (a plain-SFT run on the same data) "
        f"has a loss on it above {_log_v(config, config.truncation_loss, vocab_size)}, i.e. rates it below a "
        f"uniform guess; highest loss first, at most {1 - config.select_ratio:.0%} of {within} response tokens{end}. "
        "Score is the reference's loss L_ref in nats; REL = L_ref - L_cur."
    )


def _self_truncation(config: SSTokenConfig, within: str) -> str:
    end = ", never a response's last token" if config.protect_response_end else ""
    c = config.surprise_nats
    left = f"counts {config.drop_weight:g} in the loss" if config.drop_weight else "is dropped"
    return (
        f"a token {left} when its loss under the model being trained exceeds that model's predictive entropy "
        f"at the position by more than {c:g} nats (L_cur - H_cur > {c:g}: the token is {math.exp(c):.0f} times less "
        f"likely than the model expects there); most surprising first, at most {1 - config.select_ratio:.0%} of "
        f"{within} response tokens{end}. No history model and no extra forward. Score is the surprise "
        "L_cur - H_cur in nats."
    )


def describe_rule(config: SSTokenConfig, vocab_size: int | None = None, history: bool = True) -> Rule:
    """The rule `config` selects by; `history` False: no history model was available (REL is 0)."""
    selector = get_selector(config.selector)
    within = "each sample's" if config.scope == "sample" else "the micro-batch's"
    rho = config.select_ratio
    if config.selector == "full":
        name, text = "full SFT", "every response token is kept (no selection)."
    elif config.selector == "random":
        name, text = (
            "random",
            f"ceil({rho:g} x n) of {within} response tokens, drawn uniformly, are kept. Score is the draw.",
        )
    elif config.selector == "rho1":
        name = "RHO-1"
        text = (
            f"the top ceil({rho:g} x n) of {within} response tokens by excess loss L_cur - L_ref are kept, against "
            f"the reference model {config.history_model}. Score is the excess loss in nats; REL = L_ref - L_cur."
        )
    elif config.selector == "loss_truncation":
        name, text = "loss truncation", _loss_truncation(config, within, vocab_size)
    elif config.selector == "self_truncation":
        soft = "soft " if config.drop_weight else ""
        name, text = f"{soft}loss truncation in one run", _self_truncation(config, within)
    elif config.selector == "entropy_weighted":
        name = "entropy-weighted loss"
        text = (
            "every response token is kept, its loss weighted by its entropy under the model being trained, "
            "H_cur / log 20 capped at 1 (like EAFT): tokens the model is confident about weigh little, right or wrong. "
            "Weight is that weight."
        )
    else:
        name, text = "ssToken", _sstoken(config, within[0].upper() + within[1:], vocab_size, history)
    if config.protect_response_end and config.selector == "sstoken":
        text += " A response's last token is always kept."
    if config.drop_weight and config.selector not in ("full", "self_truncation", "entropy_weighted"):
        text += f" The tokens left out still count {config.drop_weight:g} in the loss."
    if config.select_warmup_ratio:
        text += f" The first {config.select_warmup_ratio:.0%} of the steps train on every response token."
    columns = []
    if history and selector.needs_history(config, config.gamma):
        columns.append("REL")
    if selector.needs_attention(config, config.gamma):
        columns.append("AttnScore")
    if not selector.keeps_all and config.selector != "entropy_weighted":
        columns.append("Score")
    if config.drop_weight or config.selector == "entropy_weighted":
        columns.append("Weight")
    drop_weight = config.drop_weight if config.selector != "full" else 0.0
    return Rule(name, text, tuple(columns), drop_weight)


__all__ = ["COLUMNS", "Rule", "describe_rule"]
