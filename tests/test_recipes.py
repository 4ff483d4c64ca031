"""Every shipped recipe parses and validates, holds the paper's settings, and stays a valid `trl sft` config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from trl.scripts.sft import make_parser as trl_sft_parser

from sstoken_trl import SSTokenConfig
from sstoken_trl.tools.arguments import PREFIX, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MODEL_RECIPES = [p for p in RECIPES if not p.stem.endswith("-cpu")]  # the two CPU demos aside
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
# The paper's models and their rho (select ratio).
PAPER = {
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B", 0.6),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", 0.6),
    "qwen-2.5-7b": ("Qwen/Qwen2.5-7B", 0.6),
    "qwen-2.5-14b": ("Qwen/Qwen2.5-14B", 0.8),
}
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# bf16 recipes fail TrainingArguments' device check on a machine without a GPU; parse them as if on CPU there.
CPU = [] if torch.cuda.is_available() else ["--use_cpu", "true"]


def test_one_recipe_per_paper_model_and_its_qlora_variant():
    assert {p.stem for p in MODEL_RECIPES} == set(PAPER) | {f"{m}-qlora" for m in PAPER}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(path):
    recipe = parse_recipe(["--config", str(path), *CPU])
    assert recipe.sstoken == SSTokenConfig.recommended(select_ratio=recipe.sstoken.select_ratio)
    assert recipe.sstoken.selector == "self_truncation" and recipe.model.use_peft
    assert not recipe.training.trust_remote_code
    assert "trust_remote_code" not in yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_without_sstoken_keys_is_a_trl_sft_config(path, tmp_path):
    keys = yaml.safe_load(path.read_text())
    plain = {k: v for k, v in keys.items() if not k.startswith(PREFIX)}
    assert len(plain) < len(keys)
    stripped = tmp_path / path.name
    stripped.write_text(yaml.safe_dump(plain))
    trl_sft_parser().parse_args_and_config(["--config", str(stripped), *CPU])
    # ...and the sstoken_ keys are exactly what TRL does not know.
    with pytest.raises(ValueError, match="Unknown arguments from config file"):
        trl_sft_parser().parse_args_and_config(["--config", str(path), *CPU])


@pytest.mark.parametrize("path", MODEL_RECIPES, ids=lambda p: p.name)
def test_recipe_holds_the_paper_settings(path):
    recipe = parse_recipe(["--config", str(path), *CPU])
    model, training, sstoken = recipe.model, recipe.training, recipe.sstoken
    qlora = path.stem.endswith("-qlora")
    hub_id, rho = PAPER[path.stem.removesuffix("-qlora")]
    assert model.model_name_or_path == hub_id
    assert (model.lora_r, model.lora_alpha, model.lora_dropout, set(model.lora_target_modules)) == (64, 16, 0.1, LINEAR)
    assert (training.learning_rate, training.lr_scheduler_type.value, training.warmup_steps) == (1e-4, "linear", 0.03)
    assert (training.num_train_epochs, training.max_length, training.bf16, model.dtype) == (1, 2048, True, "bfloat16")
    processes = 1 if qlora else 8
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps * processes == 48
    assert sstoken == SSTokenConfig.recommended()
    assert f"sstoken_select_ratio: {rho} (the paper's rho for this model)" in path.read_text()  # one edit away
    assert model.load_in_4bit == qlora
    if qlora:
        assert model.bnb_4bit_quant_type == "nf4"
        assert path.name in path.read_text().splitlines()[1]  # its own single-GPU command line
    else:
        assert "accelerate launch --config_file recipes/accelerate/" in path.read_text()


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_are_valid_for_8_gpus(path):
    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert config.num_processes == 8 and config.mixed_precision == "bf16" and not config.use_cpu
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    assert nested and set(nested) <= options
    if config.distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    else:
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 3


def test_both_multi_gpu_backends_are_shipped():
    kinds = {load_config_from_file(str(p)).distributed_type for p in ACCELERATE}
    assert kinds == {"FSDP", "DEEPSPEED"}
