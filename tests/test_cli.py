"""sstoken-train's recipe parsing, model loading and data loading, on real TRL / transformers / PEFT objects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import typing
from dataclasses import MISSING, fields

import pytest
import torch
import yaml
from peft import LoraConfig
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, get_peft_config

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.tools.arguments import (
    DATACLASSES,
    PREFIX,
    TRL_DATACLASSES,
    RunArguments,
    SSTokenArguments,
    parse_recipe,
)
from sstoken_trl.tools.cli import check_recipe, main
from sstoken_trl.tools.loading import load_model, load_splits
from sstoken_trl.tools.tiny import build_model

BASE = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "output_dir": "o", "use_cpu": True, "use_peft": True}
BASE["activation_checkpointing"] = False  # TRL's default is on, under a name transformers deprecated


def write_recipe(tmp_path, **keys) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, **keys}))
    return str(path)


def test_sstoken_arguments_are_generated_from_every_config_field():
    generated = {f.name: f for f in fields(SSTokenArguments)}
    hints, generated_hints = typing.get_type_hints(SSTokenConfig), typing.get_type_hints(SSTokenArguments)
    assert sorted(generated) == sorted(PREFIX + f.name for f in fields(SSTokenConfig))
    for f in fields(SSTokenConfig):
        twin = generated[PREFIX + f.name]
        assert twin.default == f.default and twin.default is not MISSING
        assert twin.metadata["help"] == f.metadata["help"]
        assert generated_hints[twin.name] == hints[f.name]


def test_recipe_keys_are_unique_and_ours_are_prefixed():
    names = [f.name for cls in DATACLASSES for f in fields(cls)]
    assert len(names) == len(set(names))
    assert all(f.name.startswith(PREFIX) for cls in (SSTokenArguments, RunArguments) for f in fields(cls))
    assert not any(f.name.startswith(PREFIX) for cls in DATACLASSES[:4] for f in fields(cls))


def test_flags_override_the_yaml(tmp_path):
    path = write_recipe(tmp_path, sstoken_select_ratio=0.7, sstoken_gamma=0.2, learning_rate="1e-4", lora_r=8)
    recipe = parse_recipe(["--config", path, "--sstoken_select_ratio", "0.9", "--lora_r", "32"])
    assert isinstance(recipe.sstoken, SSTokenConfig)
    assert (recipe.sstoken.select_ratio, recipe.sstoken.gamma) == (0.9, 0.2)
    assert (recipe.model.lora_r, recipe.training.learning_rate) == (32, 1e-4)


@pytest.mark.parametrize(
    ("keys", "flags", "named"),
    [
        ({"lora_rank": 8}, [], "'lora_rank'"),
        ({"select_ratio": 0.5}, [], "'select_ratio'"),  # an ssToken key without its prefix
        ({}, ["--sstoken_selec_ratio", "0.5"], "--sstoken_selec_ratio"),  # no abbreviations either
    ],
)
def test_unknown_keys_fail_with_the_key_named(tmp_path, keys, flags, named):
    with pytest.raises(ValueError, match=named):
        parse_recipe(["--config", write_recipe(tmp_path, **keys), *flags])


@pytest.mark.parametrize(
    ("keys", "flags", "named"),
    [
        ({"sstoken_select_ratio": 1.5}, [], "sstoken_select_ratio: 1.5 must be in (0, 1]"),
        ({"sstoken_history": "past"}, [], "sstoken_history: 'past' is not supported"),
        ({}, ["--sstoken_select_ratio", "1.5"], "--sstoken_select_ratio 1.5 must be in (0, 1]"),
        ({}, ["--sstoken_gamma=2"], "--sstoken_gamma 2.0 must be in [0, 1]"),
        # run through the recommended configuration: the recipe's key, the field it conflicts with as a flag
        ({"sstoken_selector": "loss_truncation"}, ["--sstoken_history", "base"], "not --sstoken_history 'base': set"),
        ({"sstoken_torch_threads": 0}, [], "sstoken_torch_threads: 0 must be >= 1"),  # a command setting
        ({}, ["--sstoken_tiny_base_steps", "0"], "--sstoken_tiny_base_steps 0 must be >= 1"),
    ],
)
def test_invalid_sstoken_values_name_the_key_or_flag_as_written(tmp_path, keys, flags, named):
    with pytest.raises(ValueError) as error:
        parse_recipe(["--config", write_recipe(tmp_path, **keys), *flags])
    assert named in str(error.value)
    assert not re.search(r"\w=", str(error.value))  # no `field=value` as the dataclasses write it


def test_main_names_the_flag_and_exits_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", write_recipe(tmp_path), "--sstoken_select_ratio", "1.5"])
    assert exit_info.value.code == 2
    assert "sstoken-train: error: Invalid ssToken setting: --sstoken_select_ratio 1.5" in capsys.readouterr().err


def _command(name: str) -> str:
    command = shutil.which(name)
    assert command, f"the {name} entry point is not installed: pip install -e ."
    return command


@pytest.fixture(scope="module")
def train_help() -> subprocess.CompletedProcess:
    """`sstoken-train --help` as a user runs it: the installed command, in a fresh process."""
    done = subprocess.run([_command("sstoken-train"), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_help_shows_the_description_config_and_sstoken_flags_first(train_help):
    """`sstoken-train --help | head -40`: what the command does, --config, the ssToken flags; TRL's are a pointer."""
    head = train_help.stdout.splitlines()[:40]
    assert head[0].startswith("usage: sstoken-train --config RECIPE.yaml")
    described = "Fine-tune a causal language model with TRL's SFTTrainer and ssToken token selection"
    assert described in " ".join(" ".join(head).split())  # however wide the terminal wraps it
    flags = [line.split()[0] for line in head if line.startswith("  --")]
    assert flags[0] == "--config" and "--sstoken_select_ratio" in flags and "--sstoken_gamma" in flags


def test_help_lists_every_sstoken_field_by_group_and_points_to_trl(train_help):
    text = train_help.stdout
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    ours = [f"--{f.name}" for cls in (SSTokenArguments, RunArguments) for f in fields(cls)]
    assert flags == ["--config", "--help-all", *ours]  # generated from the dataclasses, in their order
    selection, command = text.index("ssToken selection settings"), text.index("ssToken command settings")
    assert selection < text.index("--sstoken_select_ratio") < command < text.index("--sstoken_recommended")
    pointer = " ".join(text.strip().split("\n\n")[-1].split())
    assert pointer.startswith("TRL's arguments:") and "`sstoken-train --help-all` lists them all." in pointer
    assert not {"--gradient_accumulation_steps", "--lora_alpha", "--dataset_text_field"} & set(text.split())
    full = subprocess.run([_command("sstoken-train"), "--help-all"], capture_output=True, text=True, timeout=300)
    trl = [f"--{f.name}" for cls in TRL_DATACLASSES for f in fields(cls)]
    assert full.returncode == 0 and all(flag in full.stdout for flag in trl + ours)


def test_help_prints_no_dependency_notice(train_help):
    """No line about bitsandbytes' optional `kernels` package (nor any warning) on `sstoken-train --help`."""
    printed = (train_help.stdout + train_help.stderr).splitlines()
    assert not [line for line in printed if "kernels" in line]
    assert train_help.stderr == ""


def test_inspect_help_shows_its_arguments_then_the_sstoken_flags():
    done = subprocess.run([_command("sstoken-inspect"), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    flags = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  --")]
    assert flags[:3] == ["--model", "--data", "--adapter"] and "--sstoken_select_ratio" in flags
    assert flags.index("--sstoken_recommended") < flags.index("--sstoken_select_ratio")
    assert "Score a few samples with a model (and a PEFT adapter" in " ".join(done.stdout.split())


def test_main_exits_with_the_reason(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", write_recipe(tmp_path, lora_rank=8)])
    assert exit_info.value.code == 2
    assert "unknown key(s) 'lora_rank'" in capsys.readouterr().err


def test_history_base_without_peft_is_refused_before_loading(tmp_path):
    recipe = parse_recipe(["--config", write_recipe(tmp_path, use_peft=False)])
    with pytest.raises(ValueError, match="use_peft: true"):
        check_recipe(recipe)


def test_recipes_are_read_with_a_safe_loader(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("output_dir: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ValueError, match="could not determine a constructor for the tag"):
        parse_recipe(["--config", str(path)])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model = build_model("llama", vocab_size=128, seed=3)
    model.save_pretrained(path)
    return path, model


def test_load_model_follows_model_config(saved_model):
    path, original = saved_model
    args = ModelConfig(model_name_or_path=str(path), dtype="bfloat16", attn_implementation="eager")
    model = load_model(args)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    weight = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[weight], original.state_dict()[weight].bfloat16())


def test_load_model_in_4bit_for_qlora(saved_model):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    path, _ = saved_model
    args = ModelConfig(
        model_name_or_path=str(path),
        dtype="bfloat16",
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
        use_peft=True,
        lora_r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        lora_target_modules=["q_proj", "v_proj"],
    )
    model = load_model(args)
    assert model.is_loaded_in_4bit
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bitsandbytes.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested
    peft = get_peft_config(args)
    assert isinstance(peft, LoraConfig)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, set(peft.target_modules)) == (64, 16, 0.1, {"q_proj", "v_proj"})


def test_missing_model_is_a_clear_error():
    with pytest.raises(ValueError, match="model_name_or_path"):
        load_model(ModelConfig())


def test_data_from_a_local_jsonl_file(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evaluation = load_splits(ScriptArguments(dataset_name=str(path)), DatasetMixtureConfig(), with_eval=False)
    assert train.to_list() == rows and evaluation is None
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_splits(ScriptArguments(dataset_name=str(tmp_path / "nope.jsonl")), DatasetMixtureConfig(), False)
    with pytest.raises(ValueError, match="split 'test'"):
        load_splits(ScriptArguments(dataset_name=str(path)), DatasetMixtureConfig(), with_eval=True)


def test_packaged_data_path_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mixture = DatasetMixtureConfig(datasets=[{"path": "json", "data_files": "sstoken_trl/data/demo.jsonl"}])
    train, _ = load_splits(ScriptArguments(), mixture, with_eval=False)
    assert len(train) > 100 and "<|Assistant|>" in train[0]["text"]


def test_no_data_is_a_clear_error():
    with pytest.raises(ValueError, match="No training data"):
        load_splits(ScriptArguments(), DatasetMixtureConfig(), with_eval=False)


def test_main_checks_the_recipe_once_then_trains(tmp_path, monkeypatch):
    import sstoken_trl.tools.cli as cli

    calls = []
    real_check = cli.check_recipe
    monkeypatch.setattr(cli, "check_recipe", lambda recipe: calls.append("check") or real_check(recipe))
    monkeypatch.setattr(cli, "_train", lambda recipe: calls.append("train"))
    main(["--config", write_recipe(tmp_path)])
    assert calls == ["check", "train"]
