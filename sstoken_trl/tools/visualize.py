"""A selection as coloured tokens: a self-contained HTML page and a plain-text summary.

Every response token is one of: kept, kept thanks to the attention score (kept by the combined score but not
by REL alone), or dropped; hovering shows the signals the selection reads (REL, AttnScore, Score; a signal that is
zero by construction for the configured selector is left out). Both name the rule in words (`describe_rule`).
Prompt tokens are shown unscored. The `sstoken-inspect` command lives in `sstoken_trl.tools.inspection`.
"""

from __future__ import annotations

import html
import math
import textwrap
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.integration.selective_forward import BatchSelection
from sstoken_trl.tools.describe import Rule, describe_rule

STATUSES = {
    "kept": "kept",
    "attention": "kept thanks to the attention score",
    "down": "left out, still trained at drop_weight",
    "dropped": "dropped",
    "prompt": "prompt (not scored)",
}
LEFT_OUT = ("down", "dropped")  # the tokens a selection leaves out of the full-weight loss


@dataclass
class Token:
    text: str
    status: str  # a key of STATUSES
    rel: float = math.nan
    attn: float = math.nan
    score: float = math.nan
    weight: float = math.nan  # the token's loss weight, where the selection weighs tokens


def looks_like_content(text: str, before: str = "") -> bool:
    """A number or a name: a token with a digit, or a word that starts with a capital letter where a sentence does
    not start (`before`: the text ahead of it). Such tokens are what data teaching new facts or computed answers is
    for, so a selection that leaves them out is worth a look."""
    word = text.strip()
    if any(c.isdigit() for c in word):
        return True
    trailing = before[len(before.rstrip()) :]
    opens_sentence = not before.strip() or before.rstrip()[-1] in ".!?:>" or "\n" in trailing
    return len(word) > 1 and word[0].isupper() and word[1:].islower() and not opens_sentence


def content_note(tokens: list[Token]) -> str | None:
    """A warning when left-out tokens look like content (numbers, names), with examples; None when none does."""
    left = [t for t in tokens if t.status in LEFT_OUT]
    content = [
        t.text.strip()
        for i, t in enumerate(tokens)
        if t.status in LEFT_OUT and looks_like_content(t.text, tokens[i - 1].text if i else "")
    ]
    if not content:
        return None
    examples = ", ".join(repr(text) for text in dict.fromkeys(content))
    return (
        f"{len(content)} of the {len(left)} left-out tokens look like content (numbers, names): {examples}. On data "
        "that teaches new facts or computed answers these are what the model must learn; compare a run with "
        "--sstoken_selector full on held-out data before trusting the selection there."
    )


def _samples(selection: BatchSelection) -> list[tuple[int, list[int]]]:
    """(row, positions) of every sample of the batch: the real tokens of one document of a row, in order."""
    real, doc = selection.real.cpu(), selection.doc.cpu()
    out = []
    for b in range(real.size(0)):
        positions = real[b].nonzero().flatten().tolist()
        for d in sorted(set(doc[b, positions].tolist())):
            out.append((b, [j for j in positions if doc[b, j] == d]))
    return out


def sample_tokens(
    selection: BatchSelection, tokenizer: PreTrainedTokenizerBase, drop_weight: float = 0.0
) -> list[list[Token]]:
    """Per sample of the batch, its tokens with their status and scores (token j is scored at position j - 1); a
    kept token weighing exactly `drop_weight` > 0 is one the selection left out ("down").

    Samples come from the batch's own layout (padding, documents of a packed row), never from token ids."""
    by_rel = selection.keep_rel.cpu()
    response, keep = selection.response.cpu(), selection.keep.cpu()
    rel, attn, score = (t.detach().float().cpu() for t in (selection.rel, selection.attn_score, selection.score))
    weight = torch.ones_like(score) if selection.weight is None else selection.weight.detach().float().cpu()
    ids = selection.input_ids.tolist()
    rows = []
    for b, positions in _samples(selection):
        tokens = []
        for i, j in enumerate(positions):
            text = tokenizer.decode([ids[b][j]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            t = j - 1
            if i == 0 or not response[b, t]:
                tokens.append(Token(text, "prompt"))
                continue
            status = "dropped" if not keep[b, t] else ("kept" if by_rel[b, t] else "attention")
            if status == "kept" and drop_weight > 0 and weight[b, t].item() == torch.tensor(drop_weight).item():
                status = "down"
            values = (rel[b, t].item(), attn[b, t].item(), score[b, t].item(), weight[b, t].item())
            tokens.append(Token(text, status, *values))
        rows.append(tokens)
    return rows


def _counts(tokens: list[Token]) -> dict[str, int]:
    return {status: sum(t.status == status for t in tokens) for status in STATUSES}


def _headline(counts: dict[str, int], rule: Rule) -> str:
    n = counts["kept"] + counts["attention"] + counts["down"] + counts["dropped"]
    kept = counts["kept"] + counts["attention"]
    share = f" ({100 * kept / n:.1f}%)" if n else ""
    text = f"{n} response tokens, {kept} kept{share}"
    if "AttnScore" in rule.columns:
        text += f", {counts['attention']} of them thanks to the attention score"
    if rule.drop_weight:
        text += f", {counts['down']} left out at loss weight {rule.drop_weight:g}"
    return text


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _figure(value: float, sign: str) -> str:
    """A mean as printed; `none` for the mean of an empty group."""
    return "none" if math.isnan(value) else f"{value:{sign}.4f}"


def _listed(names: tuple[str, ...]) -> str:
    """("REL", "Score") -> "REL and Score"."""
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _values(token: Token) -> dict[str, float]:
    return {"REL": token.rel, "AttnScore": token.attn, "Score": token.score, "Weight": token.weight}


def _statuses(rule: Rule) -> dict[str, str]:
    """The statuses a token can have under `rule` (none is kept thanks to attention without an attention term, none
    is left out at a weight without drop_weight)."""
    statuses = {s: label for s, label in STATUSES.items() if s != "attention" or "AttnScore" in rule.columns}
    if rule.drop_weight:
        statuses["down"] = f"left out, still trained at loss weight {rule.drop_weight:g}"
        statuses.pop("dropped")  # a token whose log-prob is not finite stays dropped: too rare to list
    else:
        statuses.pop("down")
    return statuses


def chosen_samples(rows: list[list[Token]], max_samples: int) -> list[int]:
    """Indices (in batch order) of the samples that say most: the one with most dropped tokens, the one with most
    tokens kept thanks to the attention score (each when there is one), then those with most of either."""
    counts = [_counts(row) for row in rows]
    picks: list[int] = []
    for status in ("dropped", "down", "attention"):
        best = max(range(len(rows)), key=lambda i: (counts[i][status], -i), default=None)
        if best is not None and counts[best][status] and best not in picks:
            picks.append(best)
    left_out = {i: counts[i]["dropped"] + counts[i]["down"] + counts[i]["attention"] for i in range(len(rows))}
    for i in sorted(range(len(rows)), key=lambda i: (-left_out[i], i)):
        if i not in picks:
            picks.append(i)
    return sorted(picks[:max_samples])


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; color: #222; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; }
.tok { border-radius: 3px; padding: 1px 0; }
.prompt { color: #888; }
.kept { background: #b7e4c7; }
.attention { background: #a9d6f5; }
.dropped { color: #a33; background: #f8d7da; text-decoration: line-through; }
.down { color: #8a5a00; background: #fde9b8; }
.note { background: #fff3cd; padding: 0.5rem; border-radius: 4px; }
.tok[title]:hover { outline: 2px solid #333; }
.legend .tok { margin-right: 1rem; padding: 2px 6px; }
section { border-top: 1px solid #ddd; margin-top: 1rem; }
"""


def _span(token: Token, rule: Rule) -> str:
    attrs = f'class="tok {token.status}"'
    if token.status != "prompt":
        values = _values(token)
        shown = [
            f"{name} {values[name]:+.4f}" if name == "REL" else f"{name} {values[name]:.4f}" for name in rule.columns
        ]
        if shown:
            attrs += f' title="{" | ".join(shown)}"'
        attrs += f' data-rel="{token.rel:.6g}" data-attn="{token.attn:.6g}" data-score="{token.score:.6g}"'
    return f"<span {attrs}>{html.escape(token.text)}</span>"


def render_html(
    selection: BatchSelection,
    tokenizer: PreTrainedTokenizerBase,
    config: SSTokenConfig,
    title: str = "ssToken selection",
    vocab_size: int | None = None,
    history: bool = True,
) -> str:
    """A self-contained HTML page of the selection (no scripts, no external resources).

    `vocab_size` (the model's) is needed to state thresholds in nats (loss truncation, his_loss_clip); `history`
    False: the selection ran without a history model."""
    rule = describe_rule(config, vocab_size, history)
    rows = sample_tokens(selection, tokenizer, config.drop_weight)
    total = _counts([t for row in rows for t in row])
    note = content_note([t for row in rows for t in row])
    hover = f" Hover a response token for its {_listed(rule.columns)}." if rule.columns else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="summary">{len(rows)} samples, {_headline(total, rule)}.</p>',
        f'<p class="rule">Selection, {html.escape(rule.name)}: {html.escape(rule.text)}</p>',
        '<p class="legend">'
        + "".join(f'<span class="tok {s}">{html.escape(label)}</span>' for s, label in _statuses(rule).items())
        + html.escape(hover)
        + "</p>",
    ]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    for i, row in enumerate(rows):
        parts.append(f'<section class="sample" id="sample-{i + 1}"><h2>Sample {i + 1}</h2>')
        parts.append(f"<p>{_headline(_counts(row), rule)}.</p>")
        parts.append('<div class="text">' + "".join(_span(t, rule) for t in row) + "</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def summarize(
    selection: BatchSelection,
    tokenizer: PreTrainedTokenizerBase,
    config: SSTokenConfig,
    vocab_size: int | None = None,
    history: bool = True,
    max_samples: int = 3,
    page: str | None = None,
    heading: str = "ssToken selection of the last micro-batch",
) -> str:
    """Plain-text summary: counts, the rule, mean signals of kept vs dropped tokens, the samples that say most
    marked up (`chosen_samples`), and where the rest is (`page`, the HTML page)."""
    rule = describe_rule(config, vocab_size, history)
    rows = sample_tokens(selection, tokenizer, config.drop_weight)
    flat = [t for row in rows for t in row]
    kept = [t for t in flat if t.status in ("kept", "attention")]
    dropped = [t for t in flat if t.status in LEFT_OUT]
    lines = [f"{heading}: {len(rows)} samples, {_headline(_counts(flat), rule)}."]
    wrap = dict(initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)
    lines += textwrap.wrap(f"Selection, {rule.name}: {rule.text}", 116, **wrap)  # paths stay whole
    if rule.columns:
        means = []
        for name in rule.columns:
            sign = "+" if name == "REL" else ""
            pair = [_mean([_values(t)[name] for t in group]) for group in (kept, dropped)]
            means.append(f"{name} {_figure(pair[0], sign)} | {_figure(pair[1], sign)}")
        left = "left out" if rule.drop_weight else "dropped"
        lines.append(f"  mean over kept | {left} tokens: {', '.join(means)}")
    braces = ", {kept thanks to the attention score} in braces" if "attention" in _statuses(rule) else ""
    left = f"[left out, trained at weight {rule.drop_weight:g}]" if rule.drop_weight else "[dropped]"
    lines.append(f"  kept tokens as they are, {left} in brackets{braces}:")
    marks = {"prompt": "{}", "kept": "{}", "attention": "{{{}}}", "down": "[{}]", "dropped": "[{}]"}
    shown = chosen_samples(rows, max_samples)
    for i in shown:
        text = "".join(marks[t.status].format(t.text) for t in rows[i]).replace("\n", "\\n")
        lines.append(f"  sample {i + 1}: {text}")
    note = content_note(flat)
    if note:
        lines += textwrap.wrap(f"Note: {note}", 116, **wrap)
    rest = len(rows) - len(shown)
    if page is not None:
        other = f"The other {rest} samples, and" if rest else "These samples, and"
        lines.append(f"  {other} each token's {_listed(rule.columns) or 'status'} on hover: {page}")
    elif rest:
        lines.append(f"  ({rest} more samples not shown)")
    return "\n".join(lines)


__all__ = [
    "STATUSES",
    "Token",
    "chosen_samples",
    "content_note",
    "looks_like_content",
    "render_html",
    "sample_tokens",
    "summarize",
]
