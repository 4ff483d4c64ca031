"""The README stays true: generated configuration tables, set-up commands, and every command line it shows."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import torch
from trl import TrlParser

from sstoken_trl.tools.arguments import SSTokenArguments, fields_markdown, parse_recipe
from sstoken_trl.tools.inspection import InspectArguments

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CPU = [] if torch.cuda.is_available() else ["--use_cpu", "true"]


def commands(program: str) -> list[list[str]]:
    """Argument lists of every `program ...` line in the README's code blocks (backslash continuations joined)."""
    text = README.replace("\\\n", " ")
    found = re.findall(rf"(?:^|&& ){re.escape(program)} (.*)$", text, flags=re.MULTILINE)
    return [shlex.split(args) for args in found]


def test_configuration_tables_are_generated_from_the_dataclasses():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "docs" / "update_readme.py")
    update_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(update_readme)
    assert update_readme.readme_block(README) == fields_markdown(), "run: python docs/update_readme.py"


def test_setup_commands_are_the_documented_ones():
    assert 'pip install "torch==2.13.0" -e ".[test]" && sstoken-train --config recipes/demo-cpu.yaml\n' in README
    assert "\npython -m pytest\n" in README


def test_every_recipe_and_accelerate_config_is_documented_and_exists():
    for path in [*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "recipes" / "accelerate").glob("*.yaml")]:
        assert str(path.relative_to(ROOT)) in README
    for mentioned in re.findall(r"recipes/[\w./-]+\.yaml", README):
        assert (ROOT / mentioned).is_file(), mentioned


def test_training_command_lines_parse():
    train_lines = commands("sstoken-train")
    launched = [
        shlex.split(line.split("-m sstoken_trl.tools.cli", 1)[1])
        for line in README.splitlines()
        if "-m sstoken_trl.tools.cli" in line
    ]
    assert len(train_lines) >= 3 and len(launched) == 2
    for args in train_lines + launched:
        parse_recipe([*args, *CPU])


def test_inspect_command_line_parses():
    (args,) = commands("sstoken-inspect")
    parser = TrlParser((InspectArguments, SSTokenArguments))
    inspect_args, _ = parser.parse_args_into_dataclasses(args)
    assert inspect_args.adapter == "outputs/demo-cpu/sstoken" and Path(ROOT / inspect_args.data).is_file()


def test_evaluation_command_is_lm_eval_with_the_adapter():
    expected = "lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER_DIR,dtype=bfloat16 --tasks "
    line = next(line for line in README.splitlines() if line.startswith("lm_eval"))
    assert line.startswith(expected) and line.endswith(" --batch_size auto")
