"""Command-line / recipe arguments of sstoken-train, on top of TRL's own dataclasses.

`SSTokenArguments` is generated from `SSTokenConfig`'s fields (each prefixed `sstoken_`), so the two cannot
drift; constructing it builds and validates the `SSTokenConfig`, so a bad value fails at parse time.
`RunArguments` holds the few settings of the command itself (data template, demo model), prefixed the same
way: every recipe key that TRL's `trl sft` does not know starts with `sstoken_`. `--help` shows `--config` and
these two groups, generated from the dataclasses' fields; `--help-all` adds TRL's own arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.data.spans import ASSISTANT_TAG, USER_TAG
from sstoken_trl.selection.settings import IgnoredSettingError
from sstoken_trl.tools.help import Option, dataclass_options, render_help
from sstoken_trl.tools.recipe_file import check_values, read_recipe

PREFIX = "sstoken_"


def _to_config(self: Any, recommended: bool = False, given: set[str] | None = None) -> SSTokenConfig:
    """The `SSTokenConfig` these arguments describe; `recommended`: starting from `SSTokenConfig.recommended()`.

    With `recommended`, the fields named in `given` (set in the recipe or on the command line, see `given_keys`)
    and those set away from the paper's default keep their value; the others take the recommended one.
    """
    values = {f.name: getattr(self, PREFIX + f.name) for f in fields(SSTokenConfig)}
    if recommended:
        given = given or set()
        explicit = {
            f.name: values[f.name] for f in fields(SSTokenConfig) if f.name in given or values[f.name] != f.default
        }
        return SSTokenConfig.recommended(**explicit)
    return SSTokenConfig(**values)


def given_keys(argv: list[str]) -> set[str]:
    """ssToken fields set explicitly: `--sstoken_x` flags and `sstoken_x` keys of the `--config` recipe."""
    flags, keys = _given(argv)
    return flags | keys


def _given(argv: list[str]) -> tuple[set[str], set[str]]:
    """(fields set by `--sstoken_x` flags, fields set by `sstoken_x` keys of the `--config` recipe)."""
    flags = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--" + PREFIX)}
    path = _config_path(argv)
    keys = set(read_recipe(path)) if path is not None and Path(path).is_file() else set()
    return (
        {name.removeprefix(PREFIX) for name in flags},
        {name.removeprefix(PREFIX) for name in keys if name.startswith(PREFIX)},
    )


class SSTokenSettingError(ValueError):
    """A bad ssToken value; `as_written` names the fields as the user spelled them."""

    def as_written(self, argv: list[str]) -> ValueError:
        """This error with each ssToken field (of `SSTokenConfig` or `RunArguments`) named as a flag
        (`--sstoken_x V`) when it was given as one, else as a recipe key (`sstoken_x: V`)."""
        flags, _ = _given(argv)
        message = str(self)
        names = [f.name for f in fields(SSTokenConfig)] + [f.name.removeprefix(PREFIX) for f in fields(RunArguments)]
        for name in sorted(names, key=len, reverse=True):
            flag = name in flags

            def spell(match: re.Match, name: str = name, flag: bool = flag) -> str:
                value = match.group(1)
                if value is None:
                    return f"--{PREFIX}{name}" if flag else PREFIX + name
                return f"--{PREFIX}{name} {value}" if flag else f"{PREFIX}{name}: {value}"

            pattern = rf"(?<![\w-])(?:{PREFIX})?{name}(?:=('[^']*'|<[^>]*>|-?[\w.]*\w))?(?![\w])"
            message = re.sub(pattern, spell, message)
        return ValueError(f"Invalid ssToken setting: {message}")


def _validate(self: Any) -> None:
    """Each value checked as soon as it is parsed; whether the selector reads it is checked once the recommendation
    is known (`parse_recipe`)."""
    try:
        self.to_config()
    except IgnoredSettingError:
        pass
    except ValueError as err:
        raise SSTokenSettingError(str(err)) from err


def _generated_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(SSTokenConfig)
    specs = []
    for f in fields(SSTokenConfig):
        default = {"default": f.default} if f.default is not MISSING else {"default_factory": f.default_factory}
        specs.append((PREFIX + f.name, hints[f.name], field(metadata=dict(f.metadata), **default)))
    return specs


SSTokenArguments = make_dataclass(
    "SSTokenArguments",
    _generated_fields(),
    namespace={"to_config": _to_config, "__post_init__": _validate, "__module__": __name__},
)
SSTokenArguments.__doc__ = "`SSTokenConfig`'s fields, prefixed `sstoken_` (generated: see `SSTokenConfig` for help)."
SSTokenArguments._argument_group_name = (
    "ssToken selection settings (SSTokenConfig; a recipe key is the flag without --)"
)


@dataclass
class RunArguments:
    """Settings of the sstoken-train command that are neither TRL's nor the selection's."""

    sstoken_recommended: bool = field(
        default=False,
        metadata={
            "help": "Start from SSTokenConfig.recommended() (docs/selectors.md) instead of the paper-exact settings: "
            "loss truncation inside one run, against the model being trained (no history model); sstoken_ keys "
            "you set still win."
        },
    )
    sstoken_user_tag: str = field(
        default=USER_TAG, metadata={"help": "Tag that opens a user turn in template-text (`text`) samples."}
    )
    sstoken_assistant_tag: str = field(
        default=ASSISTANT_TAG, metadata={"help": "Tag that opens an assistant turn (the response) in template text."}
    )
    sstoken_on_bad_sample: str = field(
        default="error",
        metadata={
            "help": "A sample with no response to train on: 'error' stops with its row index, 'skip' drops it.",
            "choices": ["error", "skip"],
        },
    )
    sstoken_torch_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads torch may use (torch.set_num_threads); None keeps torch's default. Small models "
            "on a busy CPU run fastest with 1."
        },
    )
    sstoken_build_tiny_model: bool = field(
        default=False,
        metadata={
            "help": "Demo: if model_name_or_path does not exist, build a small LLaMA-shaped model and tokenizer "
            "there (tokenizer from the training data) and give it a short plain-SFT base training on other generated "
            "samples of three of the demo's five tasks; reused when it exists."
        },
    )
    sstoken_tiny_base_steps: int = field(
        default=120, metadata={"help": "Demo: optimizer steps of the plain-SFT base training of the tiny model."}
    )
    sstoken_chitchat_conversations: int = field(
        default=0,
        metadata={
            "help": "Demo: if dataset_name does not exist, write this many real conversations of the installed "
            "chitchat-dataset package there as `messages` rows (speakers alternate as user / assistant); 0: off."
        },
    )
    sstoken_chitchat_max_turns: int | None = field(
        default=None, metadata={"help": "Demo: keep the first this many turns of each chitchat conversation."}
    )

    _argument_group_name = "ssToken command settings (sstoken-train itself)"

    def __post_init__(self) -> None:
        if self.sstoken_torch_threads is not None and self.sstoken_torch_threads < 1:
            raise SSTokenSettingError(f"sstoken_torch_threads={self.sstoken_torch_threads} must be >= 1 (or unset).")
        if self.sstoken_tiny_base_steps < 1:
            raise SSTokenSettingError(f"sstoken_tiny_base_steps={self.sstoken_tiny_base_steps} must be >= 1.")
        if self.sstoken_chitchat_conversations < 0:
            raise SSTokenSettingError(
                f"sstoken_chitchat_conversations={self.sstoken_chitchat_conversations} must be >= 0."
            )
        if self.sstoken_chitchat_max_turns is not None and self.sstoken_chitchat_max_turns < 2:
            raise SSTokenSettingError(
                f"sstoken_chitchat_max_turns={self.sstoken_chitchat_max_turns} must be >= 2 (or unset)."
            )


TRL_DATACLASSES = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)
DATACLASSES = (*TRL_DATACLASSES, SSTokenArguments, RunArguments)


@dataclass
class Recipe:
    """Everything one sstoken-train run is configured with."""

    script: ScriptArguments
    training: SFTConfig
    model: ModelConfig
    data: DatasetMixtureConfig
    sstoken: SSTokenConfig
    run: RunArguments


DESCRIPTION = """\
Fine-tune a causal language model with TRL's SFTTrainer and ssToken token selection: each micro-batch trains
only on the response tokens the selection keeps. One YAML recipe sets everything (TRL's flat `trl sft` keys plus
the sstoken_ keys below); flags override its keys. Offline CPU demo: sstoken-train --config recipes/demo-cpu.yaml
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each help text; the description kept as written."""


class _Parser(TrlParser):
    """TRL's parser, raising a ValueError on a bad flag (one `sstoken-train: error:` line, no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(f"{message.rstrip('.')}. `{self.prog} --help` lists the flags.")


def make_parser(prog: str | None = "sstoken-train") -> TrlParser:
    """TRL's parser over TRL's dataclasses plus the sstoken_ ones (`--config FILE`, flags override it)."""
    return _Parser(
        DATACLASSES,
        prog=prog,
        usage=f"{prog} --config RECIPE.yaml [--KEY VALUE ...]",
        allow_abbrev=False,
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
    )


RECIPE_OPTIONS = [
    Option(
        "--config RECIPE.yaml",
        "TRL's flat YAML: the keys below and TRL's; flags override them. Shipped recipes: recipes/*.yaml.",
    ),
    Option("-h, --help", "Show this help and exit."),
    Option("--help-all", "Also list TRL's arguments, and exit."),
]


def _group_title(cls: type) -> str:
    return getattr(cls, "_argument_group_name", cls.__name__)


def short_help(prog: str = "sstoken-train") -> str:
    """`--help`: the description, `--config`, the ssToken groups (from the dataclasses), a pointer to TRL's."""
    count = sum(len(fields(cls)) for cls in TRL_DATACLASSES)
    names = ", ".join(cls.__name__ for cls in TRL_DATACLASSES)
    epilog = (
        f"TRL's arguments: the {count} fields of TRL's {names} are recipe keys and flags too (--model_name_or_path, "
        "--dataset_name, --output_dir, --learning_rate, --max_steps, --per_device_train_batch_size, --lora_r, "
        f"--load_in_4bit, ...). `{prog} --help-all` lists them all."
    )
    groups = [("recipe", RECIPE_OPTIONS)]
    groups += [(_group_title(cls), dataclass_options(cls)) for cls in (SSTokenArguments, RunArguments)]
    return render_help(f"{prog} --config RECIPE.yaml [--KEY VALUE ...]", DESCRIPTION, groups, epilog)


def _print_help(argv: list[str], prog: str = "sstoken-train") -> None:
    """`--help` / `-h`: the short help; `--help-all`: every argument. Both exit with status 0."""
    if "--help-all" in argv:
        print_help(make_parser(prog).format_help())
    if "--help" in argv or "-h" in argv:
        print_help(short_help(prog))


def print_help(text: str) -> None:
    """Print `text` and exit with status 0, also when stdout is a pipe closed early (`--help | head`)."""
    try:
        print(text.rstrip(), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
    raise SystemExit(0)


def exit_on_error(prog: str, run: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a command's `run(argv)`; a bad input (ValueError, FileNotFoundError) ends it with `prog: error: ...` on
    stderr and status 2, as argparse does for a bad flag."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def _config_path(argv: list[str]) -> str | None:
    if "--config" not in argv:
        return None
    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise ValueError("--config needs a path to a YAML recipe, e.g. --config recipes/demo-cpu.yaml.")
    return argv[index + 1]


def parse_checked(parser: TrlParser, argv: list[str]) -> list[Any]:
    """The parser's dataclasses from `--config FILE` and flags, every recipe check of `sstoken-train` applied: a
    missing or malformed recipe, a key given twice, an unknown key or flag and a bad value (in the recipe or a flag)
    raise a ValueError naming it and what to do."""
    path = _config_path(argv)
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(
            f"Recipe {path!r} not found; the shipped recipes live in the project's recipes/ folder."
        )
    if path is not None:
        check_values(read_recipe(path), parser, path)
    try:
        parsed = parser.parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)
    except SSTokenSettingError as err:
        raise err.as_written(argv) from err
    *values, from_config, from_flags = parsed
    if from_config:
        keys = ", ".join(repr(k[2:]) for k in from_config[::2])
        raise ValueError(
            f"{path}: unknown key(s) {keys}: not a field of {_field_owners(parser)}. Check the spelling; "
            f"`{parser.prog} --help` lists them."
        )
    if from_flags:
        raise ValueError(
            f"Unknown command-line argument(s) {from_flags}. Flags are recipe keys with two dashes "
            f"(--learning_rate 1e-4, --sstoken_select_ratio 0.6); `{parser.prog} --help` lists them."
        )
    return values


def _field_owners(parser: TrlParser) -> str:
    """`TRL's ScriptArguments, SFTConfig, ...` for the error on an unknown key: whose fields a recipe may set."""
    names = [cls.__name__ for cls in parser.dataclass_types if not cls.__module__.startswith("sstoken_trl")]
    ours = f"nor an {PREFIX} setting"
    return f"TRL's {', '.join(names[:-1])} or {names[-1]}, {ours}" if names else f"{parser.prog}'s arguments, {ours}"


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """Parse `--config FILE` and flags into a `Recipe` (`parse_checked`), and check that it can train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _print_help(argv)
    script, training, model, data, sstoken_args, run = parse_checked(make_parser(), argv)
    check_trainable(training, _config_path(argv), argv)
    try:
        sstoken = sstoken_args.to_config(recommended=run.sstoken_recommended, given=given_keys(argv))
    except ValueError as err:
        raise SSTokenSettingError(str(err)).as_written(argv) from err
    return Recipe(script, training, model, data, sstoken, run)


def check_trainable(training: SFTConfig, path: str | None, argv: list[str]) -> None:
    """A learning rate, step count or epoch count that cannot train stops here, before anything is loaded."""
    checks = [
        ("learning_rate", training.learning_rate > 0, "a positive number (the recipes use 1e-4 to 2e-4)"),
        (
            "max_steps",
            training.max_steps > 0 or training.max_steps == -1,
            "a positive whole number, or -1 to train num_train_epochs",
        ),
        (
            "num_train_epochs",
            training.max_steps != -1 or training.num_train_epochs > 0,
            "a positive number (or set max_steps)",
        ),
    ]
    for key, trains, takes in checks:
        if not trains:
            value = getattr(training, key)
            flag = any(arg.split("=", 1)[0] == f"--{key}" for arg in argv)
            where = f"--{key} {value}" if flag or path is None else f"{path}: {key}: {value}"
            raise ValueError(f"{where} cannot train: {key} takes {takes}.")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(name: str, default: Any, help_text: str, python_name: str | None = None) -> str:
    default_text = "`None`" if default is None else f"`{_cell(str(default))}`"
    first = f"| `{name}` | `{python_name}` " if python_name else f"| `{name}` "
    return f"{first}| {default_text} | {_cell(help_text)} |"


def fields_markdown() -> str:
    """docs/configuration.md's tables of every sstoken_ key, generated from the dataclasses (so they cannot drift)."""
    lines = [
        "Selection settings (`SSTokenConfig`; in a recipe or on the command line with the `sstoken_` prefix):",
        "",
        "| recipe key | `SSTokenConfig` field | default | what it does |",
        "|---|---|---|---|",
    ]
    for name, (default, help_text) in SSTokenConfig.field_help().items():
        lines.append(_row(PREFIX + name, default, help_text, name))
    lines += ["", "Settings of the `sstoken-train` command:", ""]
    lines += ["| recipe key | default | what it does |", "|---|---|---|"]
    lines += [_row(f.name, f.default, f.metadata.get("help", "")) for f in fields(RunArguments)]
    return "\n".join(lines) + "\n"


__all__ = [
    "DATACLASSES",
    "PREFIX",
    "Recipe",
    "RunArguments",
    "SSTokenArguments",
    "SSTokenSettingError",
    "TRL_DATACLASSES",
    "fields_markdown",
    "make_parser",
    "parse_recipe",
    "print_help",
    "short_help",
]
