"""Reading a recipe file: a YAML mapping whose values fit the fields they set, checked before TRL parses it.

TRL's parser takes a recipe's values as argparse defaults, which argparse converts only when they are strings:
an empty value (None), a list or a mapping reached the dataclasses as it was and failed there with a traceback.
`check_values` holds each value to what the field's type hint accepts (a string to what its flag accepts), so
every malformed value is a ValueError naming the key, what it takes and how to fix it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union

import yaml

RECIPE_SHAPE = "a recipe is `key: value` lines (TRL's flat YAML), as in recipes/demo-cpu.yaml"
_SCALARS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}
_FLAG_TYPES = {"float": float, "int": int, "string_to_bool": bool}  # a flag's parser -> what a string must read as
_PLURALS = {str: "strings", int: "whole numbers", float: "numbers", bool: "true/false values"}


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"the key {_yaml(key)} is given twice (lines {first} and {second})")


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in lines:
                raise _DuplicateKey(key, lines[key], line)
            if isinstance(key, typing.Hashable):
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's `key: value` mapping; a ValueError saying what is wrong when the file is not one."""
    try:
        content = yaml.load(Path(path).read_text(), Loader=_RecipeLoader)
    except _DuplicateKey as err:
        raise ValueError(f"{path}: {err}; YAML would keep the second silently: keep one of them.") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{path} is not valid YAML: {problem}{where}; {RECIPE_SHAPE}.") from err
    if content is None:
        raise ValueError(f"{path} is empty; {RECIPE_SHAPE}.")
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds {_a(content)}, not a mapping; {RECIPE_SHAPE}.")
    for key in content:
        if not isinstance(key, str):
            raise ValueError(f"{path}: the key {_yaml(key)} is not a name; {RECIPE_SHAPE}.")
    return content


def check_values(recipe: dict[str, Any], parser: argparse.ArgumentParser, path: str | Path) -> None:
    """Raise a ValueError on the first recipe value its field cannot take (keys no field has are left to TRL)."""
    hints = {
        f.name: typing.get_type_hints(cls)[f.name] for cls in parser.dataclass_types for f in dataclasses.fields(cls)
    }
    flags = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
    if "env" in recipe and not isinstance(recipe["env"], dict):  # TRL's key for environment variables
        env = _yaml(recipe["env"])
        raise ValueError(f"{path}: env: {env} is wrong: env takes a mapping of variable names to values.")
    for key, value in recipe.items():
        if key in flags and key not in hints:  # `help`
            raise ValueError(f"{path}: {key} is a command-line option, not a recipe key; delete it from the recipe.")
        problem = _problem(value, hints[key], flags[key]) if key in hints else None
        if problem is not None:
            raise ValueError(_message(path, key, value, problem, flags[key].default))


def _problem(value: Any, hint: Any, action: argparse.Action) -> str | None:
    """What is wrong with `value` for a field of type `hint` set through `action`; None when nothing is."""
    takes = f"takes {_kind(hint, choices=action.choices)}"
    if value is None:
        return None if _fits(None, hint) or action.default is None else takes
    if isinstance(value, str) and callable(action.type):  # as argparse does with a string default
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return f"takes {_kind(_FLAG_TYPES.get(getattr(action.type, '__name__', ''), hint), choices=action.choices)}"
    if action.choices is not None and isinstance(value, str | Enum) and value not in action.choices:
        return takes
    if _fits(value, hint) or (isinstance(value, str) and _fits([value], hint)):  # `all-linear` for a list
        return None
    if isinstance(value, bool) and _fits("text", hint):
        return takes + " (YAML reads an unquoted yes/no/on/off as true/false: quote the word, e.g. 'no')"
    if isinstance(value, int | float | date) and _fits("text", hint):
        return takes + f" (quote it to make it one: '{_yaml(value)}')"
    return (_item_problem(value, hint) if isinstance(value, list) else None) or takes


def _item_problem(items: list[Any], hint: Any) -> str | None:
    """For a list of dataclass items given as mappings (TRL's `datasets`): what is wrong with the first bad one."""
    classes = [a for a in _list_items(hint) if dataclasses.is_dataclass(a)]
    for number, item in enumerate(items, start=1):
        if classes and not isinstance(item, dict):
            return f"takes {_kind(hint)}; item {number} is {_a(item)}"
        problem = _mapping_problem(item, classes[0]) if classes else None
        if problem is not None:
            return f"item {number} {problem}"
    return None


def _mapping_problem(item: dict[str, Any], cls: type) -> str | None:
    """What is wrong with `item` as the keyword arguments of dataclass `cls`; None when nothing is."""
    hints, names = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    unknown, missing = [k for k in item if k not in names], [k for k in required if k not in item]
    if unknown or missing:
        wrong = f"has the unknown key {unknown[0]!r}" if unknown else f"lacks the key {missing[0]!r}"
        return f"{wrong}; the keys are {', '.join(names)} ({', '.join(required)} required)"
    for key, value in item.items():
        if not _fits(value, hints[key]):
            return f"has `{key}: {_yaml(value)}`, which should be {_kind(hints[key])}"
    return None


def _list_items(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [a for arg in typing.get_args(hint) for a in _list_items(arg)]
    return list(typing.get_args(hint)[:1]) if typing.get_origin(hint) is list else []


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value`, as YAML reads it, is of type `hint` (bool is not a number here, int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else int | float) and not isinstance(value, bool)
    if (hint is list or origin is list) and args and dataclasses.is_dataclass(args[0]):  # built from mappings
        return isinstance(value, list) and _item_problem(value, hint) is None
    if hint is list or origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value if args)
    if hint is dict or origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values() if args)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return isinstance(value, hint) if isinstance(hint, type) else True  # a typing form TRL does not use today


def _kind(hint: Any, plural: bool = False, choices: list[Any] | None = None) -> str:
    """`hint` in words: 'a number', 'a string or a list of strings', "one of 'no', 'steps'"..."""
    if choices is not None:
        return "one of " + ", ".join(repr(getattr(c, "value", c)) for c in choices)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_kind(a, plural) for a in args if a is not type(None)))
    if origin is Literal:
        return ("values among " if plural else "one of ") + ", ".join(repr(a) for a in args)
    if hint in _SCALARS:
        return (_PLURALS if plural else _SCALARS)[hint]
    if hint is list or origin is list:
        return ("lists" if plural else "a list") + (f" of {_kind(args[0], plural=True)}" if args else "")
    if hint is dict or origin is dict:
        return "mappings" if plural else "a mapping"
    if isinstance(hint, type) and issubclass(hint, Enum):
        return ("values among " if plural else "one of ") + ", ".join(repr(m.value) for m in hint)
    if dataclasses.is_dataclass(hint) and plural:  # TRL's `datasets:` items, built from mappings
        return f"mappings with the keys {', '.join(f.name for f in dataclasses.fields(hint))}"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} object (set in Python: a recipe cannot write one)"
    if hint is Any:
        return "any values" if plural else "any value"
    return f"{getattr(hint, '__name__', hint)} values" if plural else f"a {getattr(hint, '__name__', hint)}"


def _message(path: str | Path, key: str, value: Any, problem: str, default: Any) -> str:
    default = default.value if isinstance(default, Enum) else default
    keep = "delete the key to keep the default" + (f" ({_yaml(default)})" if default is not None else " (unset)")
    if value is None:
        return f"{path}: {key} has no value, and it {problem}. Give it a value, or {keep}."
    return f"{path}: {key}: {_yaml(value)} is wrong: {key} {problem}. Fix the value, or {keep}."


def _yaml(value: Any) -> str:
    """`value` as it would be written in a recipe (one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _a(value: Any) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", type(None): "nothing"}
    return f"{kinds.get(type(value), 'a ' + type(value).__name__)} ({_yaml(value)})"
