"""A selection as coloured tokens: a self-contained HTML page and a plain-text summary.

Every response token is one of: kept, kept thanks to the attention score (kept by the combined score but not
by REL alone), or dropped; hovering shows its REL, AttnScore and combined score. Prompt tokens are shown
unscored. The `sstoken-inspect` command lives in `sstoken_trl.tools.inspection`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.integration.selective_forward import BatchSelection

STATUSES = {
    "kept": "kept",
    "attention": "kept thanks to the attention score",
    "dropped": "dropped",
    "prompt": "prompt (not scored)",
}


@dataclass
class Token:
    text: str
    status: str  # a key of STATUSES
    rel: float = math.nan
    attn: float = math.nan
    score: float = math.nan


def _samples(selection: BatchSelection) -> list[tuple[int, list[int]]]:
    """(row, positions) of every sample of the batch: the real tokens of one document of a row, in order."""
    real, doc = selection.real.cpu(), selection.doc.cpu()
    out = []
    for b in range(real.size(0)):
        positions = real[b].nonzero().flatten().tolist()
        for d in sorted(set(doc[b, positions].tolist())):
            out.append((b, [j for j in positions if doc[b, j] == d]))
    return out


def sample_tokens(selection: BatchSelection, tokenizer: PreTrainedTokenizerBase) -> list[list[Token]]:
    """Per sample of the batch, its tokens with their status and scores (token j is scored at position j - 1).

    Samples come from the batch's own layout (padding, documents of a packed row), never from token ids."""
    by_rel = selection.keep_rel.cpu()
    response, keep = selection.response.cpu(), selection.keep.cpu()
    rel, attn, score = (t.detach().float().cpu() for t in (selection.rel, selection.attn_score, selection.score))
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
            tokens.append(Token(text, status, rel[b, t].item(), attn[b, t].item(), score[b, t].item()))
        rows.append(tokens)
    return rows


def _counts(tokens: list[Token]) -> dict[str, int]:
    return {status: sum(t.status == status for t in tokens) for status in STATUSES}


def _headline(counts: dict[str, int]) -> str:
    n = counts["kept"] + counts["attention"] + counts["dropped"]
    kept = counts["kept"] + counts["attention"]
    share = f" ({100 * kept / n:.1f}%)" if n else ""
    return f"{n} response tokens, {kept} kept{share}, {counts['attention']} of them thanks to the attention score"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; color: #222; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; }
.tok { border-radius: 3px; padding: 1px 0; }
.prompt { color: #888; }
.kept { background: #b7e4c7; }
.attention { background: #a9d6f5; }
.dropped { color: #a33; background: #f8d7da; text-decoration: line-through; }
.tok[title]:hover { outline: 2px solid #333; }
.legend .tok { margin-right: 1rem; padding: 2px 6px; }
section { border-top: 1px solid #ddd; margin-top: 1rem; }
"""


def _span(token: Token) -> str:
    attrs = f'class="tok {token.status}"'
    if token.status != "prompt":
        title = f"REL {token.rel:+.4f} | AttnScore {token.attn:.4f} | Score {token.score:.4f}"
        attrs += (
            f' title="{title}" data-rel="{token.rel:.6g}" data-attn="{token.attn:.6g}" data-score="{token.score:.6g}"'
        )
    return f"<span {attrs}>{html.escape(token.text)}</span>"


def render_html(
    selection: BatchSelection,
    tokenizer: PreTrainedTokenizerBase,
    config: SSTokenConfig,
    title: str = "ssToken selection",
) -> str:
    """A self-contained HTML page of the selection (no scripts, no external resources)."""
    rows = sample_tokens(selection, tokenizer)
    total = _counts([t for row in rows for t in row])
    settings = f"rho {config.select_ratio}, gamma {config.gamma}, layer {config.attn_layer}, scope {config.scope}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="summary">{len(rows)} samples, {_headline(total)}. Settings: {html.escape(settings)}.</p>',
        '<p class="legend">'
        + "".join(f'<span class="tok {s}">{html.escape(label)}</span>' for s, label in STATUSES.items())
        + " Hover a response token for its REL, AttnScore and combined score.</p>",
    ]
    for i, row in enumerate(rows):
        parts.append(f'<section class="sample" id="sample-{i}"><h2>Sample {i + 1}</h2>')
        parts.append(f"<p>{_headline(_counts(row))}.</p>")
        parts.append('<div class="text">' + "".join(_span(t) for t in row) + "</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def summarize(
    selection: BatchSelection,
    tokenizer: PreTrainedTokenizerBase,
    max_samples: int = 3,
    heading: str = "ssToken selection of the last micro-batch",
) -> str:
    """Plain-text summary: counts, mean scores of kept vs dropped tokens, and a few samples marked up."""
    rows = sample_tokens(selection, tokenizer)
    flat = [t for row in rows for t in row]
    kept = [t for t in flat if t.status in ("kept", "attention")]
    dropped = [t for t in flat if t.status == "dropped"]
    lines = [
        f"{heading}: {len(rows)} samples, {_headline(_counts(flat))}.",
        f"  mean over kept | dropped tokens: REL {_mean([t.rel for t in kept]):+.4f} | "
        f"{_mean([t.rel for t in dropped]):+.4f}, AttnScore {_mean([t.attn for t in kept]):.4f} | "
        f"{_mean([t.attn for t in dropped]):.4f}",
        "  kept tokens as they are, [dropped] in brackets, {kept thanks to the attention score} in braces:",
    ]
    marks = {"prompt": "{}", "kept": "{}", "attention": "{{{}}}", "dropped": "[{}]"}
    for i, row in enumerate(rows[:max_samples]):
        text = "".join(marks[t.status].format(t.text) for t in row).replace("\n", "\\n")
        lines.append(f"  {i + 1}. {text}")
    return "\n".join(lines)


__all__ = ["STATUSES", "Token", "render_html", "sample_tokens", "summarize"]
