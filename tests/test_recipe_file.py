"""A malformed recipe (empty value, wrong shape, not a mapping, not YAML) or flag is one `sstoken-train: error:`
line naming the key and what to do, exit status 2, for sstoken_ keys, the command's own keys and TRL's."""

from __future__ import annotations

import dataclasses
import subprocess
from enum import Enum

import pytest
import yaml

from sstoken_trl.tools.arguments import DATACLASSES, make_parser, parse_recipe
from sstoken_trl.tools.cli import main
from tests.test_cli import BASE, _command, write_recipe

KEEP = "delete the key to keep the default"


def run_main(argv: list[str], capsys) -> str:
    """`main(argv)`'s stderr, after checking it exits with status 2 and says one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("sstoken-train: error: "), err
    return err


@pytest.mark.parametrize(
    ("text", "said"),
    [
        # empty values, one per kind of key: the selection's, the command's, TRL's SFTConfig / ModelConfig
        (
            "sstoken_select_ratio:\n",
            f"sstoken_select_ratio has no value, and it takes a number. Give it a value, or {KEEP} (0.6).",
        ),
        (
            "sstoken_tiny_base_steps:\n",
            f"sstoken_tiny_base_steps has no value, and it takes a whole number. Give it a value, or {KEEP} (120).",
        ),
        ("sstoken_recommended:\n", "sstoken_recommended has no value, and it takes true or false."),
        (
            "learning_rate:\n",
            f"learning_rate has no value, and it takes a number. Give it a value, or {KEEP} (2.0e-05).",
        ),
        ("lora_r:\n", f"lora_r has no value, and it takes a whole number. Give it a value, or {KEEP} (16)."),
        ("datasets:\n", "datasets has no value, and it takes a list of mappings with the keys path, name,"),
        # a list, a mapping, a word where a number is expected
        (
            "sstoken_select_ratio: [0.5, 0.6]\n",
            "sstoken_select_ratio: [0.5, 0.6] is wrong: sstoken_select_ratio takes a number. "
            f"Fix the value, or {KEEP} (0.6).",
        ),
        (
            "sstoken_select_ratio:\n  low: 0.5\n",
            "sstoken_select_ratio: {low: 0.5} is wrong: sstoken_select_ratio takes a number.",
        ),
        ("lora_r: {a: 1}\n", "lora_r: {a: 1} is wrong: lora_r takes a whole number."),
        (
            "num_train_epochs: three\n",
            f"num_train_epochs: three is wrong: num_train_epochs takes a number. Fix the value, or {KEEP} (3.0).",
        ),
        ("max_steps: 1.5\n", "max_steps: 1.5 is wrong: max_steps takes a whole number."),
        (
            "lora_target_modules: [1, 2]\n",
            "lora_target_modules: [1, 2] is wrong: lora_target_modules takes a list of strings.",
        ),
        ("sstoken_history: [base]\n", "sstoken_history: [base] is wrong: sstoken_history takes a string."),
        ("run_name: 123\n", "run_name: 123 is wrong: run_name takes a string (quote it to make it one: '123')."),
        # a value outside a key's choices, which argparse checks on a flag but not on a recipe value
        (
            "sstoken_on_bad_sample: maybe\n",
            "sstoken_on_bad_sample: maybe is wrong: sstoken_on_bad_sample takes one of 'error', 'skip'.",
        ),
        (
            "eval_strategy: sometimes\n",
            "eval_strategy: sometimes is wrong: eval_strategy takes one of 'no', 'steps', 'epoch'.",
        ),
        (
            "save_strategy: no\n",
            "save_strategy: false is wrong: save_strategy takes one of 'no', 'steps', 'epoch', 'best' "
            "(YAML reads an unquoted yes/no/on/off as true/false: quote the word, e.g. 'no').",
        ),
        # TRL's `datasets:` list
        ("datasets: [demo.jsonl]\n", "datasets takes a list of mappings with the keys path, name,"),
        ("datasets:\n  - paht: json\n", "datasets item 1 has the unknown key 'paht'; the keys are path, name,"),
        (
            "datasets:\n  - path: json\n    data_files: 5\n",
            "datasets item 1 has `data_files: 5`, which should be a string or a list of strings or a mapping.",
        ),
        ("env:\n", "env: null is wrong: env takes a mapping of variable names to values."),
        ("help: true\n", "help is a command-line option, not a recipe key; delete it from the recipe."),
    ],
)
def test_a_malformed_value_is_one_line_naming_the_key_and_the_fix(tmp_path, capsys, text, said):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE) + text)
    err = run_main(["--config", str(path)], capsys)
    assert err.startswith(f"sstoken-train: error: {path}: ") and said in err


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            "- model_name_or_path: m\n- output_dir: o\n",
            "holds a list ([{model_name_or_path: m}, {output_dir: o}]), not a mapping",
        ),
        ("just some words\n", "holds a string (just some words), not a mapping"),
        ("# only a comment\n", "is empty"),
        (
            "output_dir: o\nlora_r: 8: 16\n",
            "is not valid YAML: mapping values are not allowed here (line 2, column 10)",
        ),
        (
            "output_dir: !!python/object/apply:os.getcwd []\n",
            "is not valid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.getcwd' (line 1, column 13)",  # read safely: not run
        ),
        ("1: 2\n", ": the key 1 is not a name"),
    ],
)
def test_a_recipe_that_is_not_a_yaml_mapping_is_one_line(tmp_path, capsys, text, said):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    err = run_main(["--config", str(path)], capsys)
    assert f"sstoken-train: error: {path}{said}" in err or f"sstoken-train: error: {path} {said}" in err
    assert "a recipe is `key: value` lines (TRL's flat YAML), as in recipes/demo-cpu.yaml." in err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (
            ["--num_train_epochs", "three"],
            "argument --num_train_epochs/--num-train-epochs: invalid float value: 'three'",
        ),
        (["--sstoken_select_ratio"], "argument --sstoken_select_ratio/--sstoken-select-ratio: expected one argument"),
        (["--sstoken_on_bad_sample", "maybe"], "invalid choice: 'maybe' (choose from 'error', 'skip')"),
    ],
)
def test_a_malformed_flag_is_one_line_without_the_usage_block(tmp_path, capsys, flags, said):
    err = run_main(["--config", write_recipe(tmp_path), *flags], capsys)
    assert said in err and err.rstrip().endswith("`sstoken-train --help` lists the flags.")


def test_a_recipe_without_data_stops_before_loading(tmp_path, capsys):
    keys = {k: v for k, v in BASE.items() if k != "dataset_name"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(keys))
    assert "No training data: set dataset_name" in run_main(["--config", str(path)], capsys)


def test_the_installed_command_prints_one_line_for_an_empty_value(tmp_path):
    """The issue's case, as a user meets it: `sstoken_select_ratio:` with nothing after it."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE) + "sstoken_select_ratio:\n")
    done = subprocess.run([_command("sstoken-train"), "--config", str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"sstoken-train: error: {path}: sstoken_select_ratio has no value")


def test_every_default_written_into_a_recipe_is_accepted_as_it_is(tmp_path):
    """No false alarm: every key of the parser, written at its default, parses as leaving it unset does."""
    names = {f.name for cls in DATACLASSES for f in dataclasses.fields(cls)}
    flags = [
        action
        for action in make_parser()._actions
        if action.dest in names and f"--{action.dest}" in action.option_strings
    ]
    defaults = {a.dest: a.default.value if isinstance(a.default, Enum) else a.default for a in flags}
    assert len(defaults) > 150 and {"sstoken_select_ratio", "sstoken_recommended", "lora_r", "datasets"} <= set(
        defaults
    )
    plain = parse_recipe(["--config", write_recipe(tmp_path)])
    path = tmp_path / "every-default.yaml"
    path.write_text(yaml.safe_dump({**defaults, **BASE}))
    spelled = parse_recipe(["--config", str(path)])
    for group in ("script", "training", "model", "data", "sstoken", "run"):
        assert getattr(spelled, group) == getattr(plain, group), group


def test_well_formed_values_of_every_shape_are_taken(tmp_path):
    """What TRL's own recipes write: a `datasets:` list of mappings, a string for a list (PEFT's `all-linear`),
    numbers YAML reads as strings (1e-4), a quoted `'no'`, a mapping; each arrives as TRL would build it."""
    text = (
        "datasets:\n  - path: json\n    data_files: [a.jsonl, b.jsonl]\n    split: train\n"
        "lora_target_modules: all-linear\nlearning_rate: 1e-4\nsave_strategy: 'no'\n"
        "model_init_kwargs: {low_cpu_mem_usage: true}\nsstoken_select_ratio: '0.5'\nsstoken_history_model:\n"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE) + text)
    recipe = parse_recipe(["--config", str(path)])
    (dataset,) = recipe.data.datasets
    assert (dataset.path, dataset.data_files, dataset.split) == ("json", ["a.jsonl", "b.jsonl"], "train")
    assert recipe.model.lora_target_modules == "all-linear" and recipe.training.learning_rate == 1e-4
    assert recipe.training.save_strategy == "no" and recipe.training.model_init_kwargs == {"low_cpu_mem_usage": True}
    assert recipe.sstoken.select_ratio == 0.5 and recipe.sstoken.history_model is None


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    body = yaml.safe_dump(BASE)
    path.write_text(f"learning_rate: 1.0e-4\n{body}learning_rate: 2.0e-4\n")
    err = run_main(["--config", str(path)], capsys)
    last = len(body.splitlines()) + 2
    assert f"the key learning_rate is given twice (lines 1 and {last})" in err and "keep one of them" in err
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"{body}env:\n  A: '1'\n  A: '2'\n")
    assert "the key A is given twice" in run_main(["--config", str(nested)], capsys)


@pytest.mark.parametrize(
    ("keys", "said"),
    [
        ({"learning_rate": 0.0}, "learning_rate: 0.0 cannot train: learning_rate takes a positive number"),
        ({"learning_rate": -1.0e-4}, "learning_rate: -0.0001 cannot train: learning_rate takes a positive number"),
        ({"max_steps": 0}, "max_steps: 0 cannot train: max_steps takes a positive whole number, or -1"),
        ({"max_steps": -5}, "max_steps: -5 cannot train: max_steps takes a positive whole number, or -1"),
        ({"max_steps": -1, "num_train_epochs": 0}, "num_train_epochs: 0 cannot train: num_train_epochs takes"),
    ],
)
def test_training_that_cannot_train_stops_before_loading(tmp_path, capsys, keys, said):
    recipe = write_recipe(tmp_path, **keys)
    assert f"{recipe}: {said}" in run_main(["--config", recipe], capsys)
    flag, value = next(iter(keys.items()))
    if len(keys) == 1:  # the same value as a flag is named as a flag
        err = run_main(["--config", write_recipe(tmp_path), f"--{flag}", str(value)], capsys)
        assert f"error: --{flag} {value}" in err and "cannot train" in err


def test_inspect_runs_the_recipe_checks_of_train(tmp_path, capsys):
    from sstoken_trl.tools.inspection import main as inspect_main

    def inspect_error(text: str) -> str:
        path = tmp_path / "inspect.yaml"
        path.write_text("model: m\ndata: d.jsonl\n" + text)
        with pytest.raises(SystemExit) as exit_info:
            inspect_main(["--config", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("sstoken-inspect: error: "), err
        return err

    assert "the key sstoken_gamma is given twice (lines 3 and 4)" in inspect_error(
        "sstoken_gamma: 0.5\nsstoken_gamma: 1\n"
    )
    assert "sstoken_select_ratio has no value, and it takes a number" in inspect_error("sstoken_select_ratio:\n")
    assert "unknown key(s) 'lora_rank': not a field of sstoken-inspect's arguments" in inspect_error("lora_rank: 8\n")
    assert "not valid YAML" in inspect_error("model: [unclosed\n")
