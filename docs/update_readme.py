"""Rewrite the README's configuration tables from the dataclasses: python docs/update_readme.py"""

from __future__ import annotations

import re
from pathlib import Path

from sstoken_trl.tools.arguments import fields_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- sstoken-config:start -->", "<!-- sstoken-config:end -->"
BLOCK = re.compile(re.escape(START) + r"\n(.*?)" + re.escape(END), re.DOTALL)


def readme_block(text: str) -> str:
    """The text between the configuration markers of `text`."""
    match = BLOCK.search(text)
    if match is None:
        raise ValueError(f"README.md lacks the markers {START} ... {END}.")
    return match.group(1)


def main() -> None:
    text = README.read_text(encoding="utf-8")
    readme_block(text)  # raises when the markers are gone
    README.write_text(BLOCK.sub(lambda _: f"{START}\n{fields_markdown()}{END}", text), encoding="utf-8")


if __name__ == "__main__":
    main()
