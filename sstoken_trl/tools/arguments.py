"""Command-line / recipe arguments of sstoken-train, on top of TRL's own dataclasses.

`SSTokenArguments` is generated from `SSTokenConfig`'s fields (each prefixed `sstoken_`), so the two cannot
drift; constructing it builds and validates the `SSTokenConfig`, so a bad value fails at parse time.
`RunArguments` holds the few settings of the command itself (data template, demo model), prefixed the same
way: every recipe key that TRL's `trl sft` does not know starts with `sstoken_`.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

from sstoken_trl.config import RECOMMENDED, SSTokenConfig
from sstoken_trl.data.spans import ASSISTANT_TAG, USER_TAG

PREFIX = "sstoken_"


def _to_config(self: Any, recommended: bool = False, given: set[str] | None = None) -> SSTokenConfig:
    """The `SSTokenConfig` these arguments describe; `recommended`: starting from `SSTokenConfig.recommended()`.

    With `recommended`, the fields named in `given` (set in the recipe or on the command line, see `given_keys`)
    and those set away from the paper's default keep their value; the others take the recommended one.
    """
    values = {f.name: getattr(self, PREFIX + f.name) for f in fields(SSTokenConfig)}
    if recommended:
        paper, given = SSTokenConfig(), given or set()
        values = {
            name: v if name in given or v != getattr(paper, name) else RECOMMENDED.get(name, v)
            for name, v in values.items()
        }
    return SSTokenConfig(**values)


def given_keys(argv: list[str]) -> set[str]:
    """ssToken fields set explicitly: `--sstoken_x` flags and `sstoken_x` keys of the `--config` recipe."""
    names = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--" + PREFIX)}
    path = _config_path(argv)
    if path is not None and Path(path).is_file():
        names |= set(yaml.safe_load(Path(path).read_text()) or {})
    return {name.removeprefix(PREFIX) for name in names if name.startswith(PREFIX)}


def _validate(self: Any) -> None:
    try:
        self.to_config()
    except ValueError as err:
        raise ValueError(f"Invalid ssToken setting (recipe keys and flags carry the prefix {PREFIX!r}): {err}") from err


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


@dataclass
class RunArguments:
    """Settings of the sstoken-train command that are neither TRL's nor the selection's."""

    sstoken_recommended: bool = field(
        default=False,
        metadata={
            "help": "Start from SSTokenConfig.recommended() (docs/selectors.md) instead of the paper-exact settings: "
            "loss truncation in two runs, run 1 (plain SFT) trained first into output_dir/reference unless "
            "sstoken_history_model is given; sstoken_ keys you set still win."
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

    def __post_init__(self) -> None:
        if self.sstoken_torch_threads is not None and self.sstoken_torch_threads < 1:
            raise ValueError(f"sstoken_torch_threads={self.sstoken_torch_threads} must be >= 1 (or unset).")
        if self.sstoken_tiny_base_steps < 1:
            raise ValueError(f"sstoken_tiny_base_steps={self.sstoken_tiny_base_steps} must be >= 1.")
        if self.sstoken_chitchat_conversations < 0:
            raise ValueError(f"sstoken_chitchat_conversations={self.sstoken_chitchat_conversations} must be >= 0.")
        if self.sstoken_chitchat_max_turns is not None and self.sstoken_chitchat_max_turns < 2:
            raise ValueError(f"sstoken_chitchat_max_turns={self.sstoken_chitchat_max_turns} must be >= 2 (or unset).")


DATACLASSES = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, SSTokenArguments, RunArguments)


@dataclass
class Recipe:
    """Everything one sstoken-train run is configured with."""

    script: ScriptArguments
    training: SFTConfig
    model: ModelConfig
    data: DatasetMixtureConfig
    sstoken: SSTokenConfig
    run: RunArguments


def make_parser(prog: str | None = "sstoken-train") -> TrlParser:
    """TRL's parser over TRL's dataclasses plus the sstoken_ ones (`--config FILE`, flags override it)."""
    return TrlParser(DATACLASSES, prog=prog, allow_abbrev=False)


def _config_path(argv: list[str]) -> str | None:
    if "--config" not in argv:
        return None
    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise ValueError("--config needs a path to a YAML recipe, e.g. --config recipes/demo-cpu.yaml.")
    return argv[index + 1]


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """Parse `--config FILE` and flags into a `Recipe`; unknown keys and bad values raise a ValueError naming them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path(argv)
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(
            f"Recipe {path!r} not found; the shipped recipes live in the project's recipes/ folder."
        )
    parsed = make_parser().parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)
    *values, from_config, from_flags = parsed
    if from_config:
        keys = ", ".join(repr(k[2:]) for k in from_config[::2])
        raise ValueError(
            f"{path}: unknown key(s) {keys}: not a field of TRL's ScriptArguments, SFTConfig, ModelConfig or "
            f"DatasetMixtureConfig, nor an {PREFIX} setting. Check the spelling; `sstoken-train --help` lists them."
        )
    if from_flags:
        raise ValueError(
            f"Unknown command-line argument(s) {from_flags}. Flags are recipe keys with two dashes "
            "(--learning_rate 1e-4, --sstoken_select_ratio 0.6); `sstoken-train --help` lists them."
        )
    script, training, model, data, sstoken_args, run = values
    try:
        sstoken = sstoken_args.to_config(recommended=run.sstoken_recommended, given=given_keys(argv))
    except ValueError as err:
        raise ValueError(f"Invalid ssToken setting (recipe keys and flags carry the prefix {PREFIX!r}): {err}") from err
    return Recipe(script, training, model, data, sstoken, run)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(name: str, default: Any, help_text: str, python_name: str | None = None) -> str:
    default_text = "`None`" if default is None else f"`{_cell(str(default))}`"
    first = f"| `{name}` | `{python_name}` " if python_name else f"| `{name}` "
    return f"{first}| {default_text} | {_cell(help_text)} |"


def fields_markdown() -> str:
    """The README's tables of every sstoken_ key, generated from the dataclasses (so they cannot drift)."""
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
    "fields_markdown",
    "make_parser",
    "parse_recipe",
]
