"""The audit's outputs: `audit.jsonl` (every sample, best first) and `audit.html` (the top samples, their suspect
spans highlighted, each token's figures on hover, each sample under an anchor named by its index: `#sample-1234`).

The page is self-contained (no scripts, no external resources) and holds only the top samples, so it stays small
whatever the size of the data set; the JSONL holds them all.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from sstoken_trl.audit.ranking import THRESHOLD, SampleAudit
from sstoken_trl.tools.visualize import CSS as SELECTION_CSS

CSS = (
    SELECTION_CSS
    + """
table { border-collapse: collapse; font-size: 0.9rem; }
td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
.suspect { color: #7a0010; font-weight: 600; }
.figures { color: #555; font-size: 0.9rem; }
"""
)


def _shade(value: float, threshold: float) -> str:
    """Red in proportion to how far the suspicion passes the threshold (full at twice the threshold)."""
    strength = min(max(value / (2 * threshold), 0.0), 1.0) if value > threshold else 0.0
    return f"background: rgba(220, 40, 60, {0.15 + 0.6 * strength:.2f});" if strength else ""


def _token(sample: SampleAudit, j: int, text: str, threshold: float) -> str:
    value = sample.suspicion[sample.signal][j]
    if math.isnan(value):
        return f'<span class="tok prompt">{html.escape(text)}</span>'
    figures = " | ".join(f"{name} {values[j]:.3f}" for name, values in sample.suspicion.items())
    style = _shade(value, threshold)
    css = "tok suspect" if style else "tok"
    return f'<span class="{css}" style="{style}" title="{html.escape(figures)}">{html.escape(text)}</span>'


def strongest(spans: list[dict[str, Any]], count: int = 3) -> list[dict[str, Any]]:
    """The `count` most suspect spans, most suspect first."""
    return sorted(spans, key=lambda span: -span["value"])[:count]


def render_page(
    samples: list[SampleAudit],
    lines: dict[int, dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    title: str,
    about: str,
    threshold: float = THRESHOLD,
) -> str:
    """The page of `samples` (best first); `lines` are their JSONL records by index; `about` says what was ranked."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="summary">{html.escape(about)}</p>',
        f"<details><summary>The ranking: the {len(samples)} samples below, with their most suspect spans</summary>",
        '<table class="ranking"><tr><th>rank</th><th>sample</th><th>score</th><th>suspect spans</th></tr>',
    ]
    for rank, sample in enumerate(samples, 1):
        line = lines[sample.index]
        spans = ", ".join(f"{s['text']!r} {s['value']:.1f}" for s in strongest(line["spans"]))
        parts.append(
            f'<tr><td>{rank}</td><td><a href="#sample-{sample.index}">{sample.index}</a></td>'
            f"<td>{line['score']:.2f}</td><td>{html.escape(spans)}</td></tr>"
        )
    parts.append("</table></details>")
    for rank, sample in enumerate(samples, 1):
        line = lines[sample.index]
        figures = ", ".join(f"{name} {value:.2f}" for name, value in line["scores"].items())
        extra = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sample.extra.items())
        texts = [tokenizer.decode([t], skip_special_tokens=False) for t in sample.ids]
        parts += [
            f'<section class="sample" id="sample-{sample.index}">',
            f'<h2>#{rank}: <a href="#sample-{sample.index}">sample {sample.index}</a></h2>',
            f'<p class="figures">score {line["score"]:.2f} ({html.escape(figures)})'
            + (f"; {html.escape(extra)}" if extra else "")
            + "</p>",
            '<div class="text">' + "".join(_token(sample, j, t, threshold) for j, t in enumerate(texts)) + "</div>",
            "</section>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_outputs(
    lines: Iterable[dict[str, Any]],
    top: list[SampleAudit],
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    title: str,
    about: str,
    threshold: float = THRESHOLD,
) -> tuple[Path, Path]:
    """`audit.jsonl` (the ranked `lines`) and `audit.html` (the `top` samples) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, page = out_dir / "audit.jsonl", out_dir / "audit.html"
    wanted, shown = {s.index for s in top}, {}
    with jsonl.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
            if line["index"] in wanted:
                shown[line["index"]] = line
    page.write_text(render_page(top, shown, tokenizer, title, about, threshold), encoding="utf-8")
    return jsonl, page
