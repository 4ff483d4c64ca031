"""The commands' `--help`, rendered from their dataclasses' fields: one entry per flag, in titled groups."""

from __future__ import annotations

import shutil
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any

FLAG_COLUMN = 36  # where the help text of a flag starts


@dataclass(frozen=True)
class Option:
    flag: str  # "--sstoken_select_ratio FLOAT"
    help: str


def _metavar(hint: Any, choices: Sequence[str] | None) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return {bool: "{true,false}", int: "INT", float: "FLOAT", str: "TEXT"}.get(hint, "VALUE")


def dataclass_options(cls: type) -> list[Option]:
    """One option per field of the dataclass `cls`: `--name METAVAR`, its help and its default."""
    hints = typing.get_type_hints(cls)
    options = []
    for f in fields(cls):
        default = "required" if f.default is MISSING and f.default_factory is MISSING else f"default: {f.default}"
        if f.default is MISSING and f.default_factory is not MISSING:
            default = f"default: {f.default_factory()}"
        text = f"{f.metadata.get('help', '')} ({default})".strip()
        options.append(Option(f"--{f.name} {_metavar(hints[f.name], f.metadata.get('choices'))}", text))
    return options


def render_help(usage: str, description: str, groups: Sequence[tuple[str, Sequence[Option]]], epilog: str = "") -> str:
    """usage, description, each group's title and flags (help wrapped beside or under a long flag), epilog."""
    width = max(80, min(120, shutil.get_terminal_size((120, 24)).columns))
    lines = [f"usage: {usage}", "", *textwrap.wrap(description, width, break_on_hyphens=False), ""]
    indent = " " * FLAG_COLUMN
    for title, options in groups:
        lines.append(f"{title}:")
        for option in options:
            head = f"  {option.flag}"
            wrapped = textwrap.wrap(option.help, width - FLAG_COLUMN, break_on_hyphens=False) or [""]
            if len(head) < FLAG_COLUMN - 1:
                lines.append(head.ljust(FLAG_COLUMN) + wrapped[0])
                wrapped = wrapped[1:]
            else:
                lines.append(head)
            lines += [indent + line for line in wrapped]
        lines.append("")
    if epilog:
        lines += [*textwrap.wrap(epilog, width, break_on_hyphens=False), ""]
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["Option", "dataclass_options", "render_help"]
