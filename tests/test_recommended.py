"""The recommended selection is one recipe key away, and the paper-exact one stays the default."""

from __future__ import annotations

import pytest
import yaml

from benchmarks.noisy_sft import RECOMMENDED_ONE_RUN
from sstoken_trl.config import RECOMMENDED, SSTokenConfig
from sstoken_trl.selection.selectors import uses_history
from sstoken_trl.tools.arguments import parse_recipe

BASE = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "output_dir": "o", "use_cpu": True, "bf16": False}


def recipe(tmp_path, **keys) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, **keys}))
    return ["--config", str(path)]


def test_paper_exact_is_the_default():
    assert SSTokenConfig().protect_response_end is False
    assert SSTokenConfig().rel_norm == "minmax" and SSTokenConfig().his_loss_clip is None


def test_recommended_key_gives_the_recommended_config(tmp_path):
    config = parse_recipe(recipe(tmp_path, sstoken_recommended=True)).sstoken
    assert config == SSTokenConfig.recommended()
    assert parse_recipe(recipe(tmp_path)).sstoken == SSTokenConfig()


def test_keys_set_away_from_the_paper_default_win_over_the_recommendation(tmp_path):
    argv = recipe(tmp_path, sstoken_recommended=True, sstoken_select_ratio=0.9)
    config = parse_recipe([*argv, "--sstoken_surprise_nats", "2.0"]).sstoken
    assert config == SSTokenConfig.recommended(select_ratio=0.9, surprise_nats=2.0)
    assert parse_recipe([*argv, "--sstoken_recommended", "false"]).sstoken == SSTokenConfig(select_ratio=0.9)
    with pytest.raises(ValueError, match="would ignore --sstoken_his_loss_clip 2.0") as ignored:
        parse_recipe([*argv, "--sstoken_his_loss_clip", "2.0"])  # a setting the recommended selector does not read
    assert "read by sstoken with sstoken_gamma > 0" in str(ignored.value)
    switched = parse_recipe([*argv, "--sstoken_selector", "random"]).sstoken  # a baseline, one flag away
    assert switched == SSTokenConfig.recommended(select_ratio=0.9, selector="random")


def test_recommended_with_a_bad_value_fails_at_parse_time(tmp_path):
    with pytest.raises(ValueError, match="sstoken_.*his_loss_clip"):
        parse_recipe(recipe(tmp_path, sstoken_recommended=True, sstoken_his_loss_clip=-1.0))


def test_every_recommended_field_is_a_config_field():
    assert set(RECOMMENDED) <= set(SSTokenConfig.field_help())


def test_keys_given_at_the_paper_default_win_too(tmp_path):
    argv = recipe(tmp_path, sstoken_recommended=True, sstoken_select_ratio=0.6)  # the paper's rho, in the recipe
    config = parse_recipe([*argv, "--sstoken_scope=sample", "--sstoken_select_warmup_ratio", "0.0"]).sstoken
    assert config == SSTokenConfig.recommended(select_ratio=0.6, scope="sample", select_warmup_ratio=0.0)
    assert config.select_ratio != SSTokenConfig.recommended().select_ratio  # it did not take the recommended rho


def test_one_run_recommendation_refuses_the_paper_gamma_with_rel_in_nats():
    with pytest.raises(ValueError, match="use gamma=1.0, or rel_norm='rank'"):
        SSTokenConfig(**dict(RECOMMENDED_ONE_RUN, gamma=0.5))
    config = SSTokenConfig(**dict(RECOMMENDED_ONE_RUN, gamma=0.5, rel_norm="rank"))
    assert (config.gamma, config.rel_norm, config.scope) == (0.5, "rank", "batch")
    assert config.selector == "sstoken" and config.history == "base"


def test_recommended_is_loss_truncation_in_one_run_without_a_history_model():
    config = SSTokenConfig.recommended()
    assert config.selector == "self_truncation" and 0 < config.select_warmup_ratio < 1 and config.protect_response_end
    assert not uses_history(config) and config.history_model is None  # one run, no second model


def test_loss_truncation_needs_a_model_history_and_says_which(tmp_path):
    with pytest.raises(ValueError, match="set history='model' and history_model"):
        SSTokenConfig(selector="loss_truncation", history="base")
    flags = ["--sstoken_selector", "loss_truncation", "--sstoken_history", "ema"]
    with pytest.raises(ValueError, match="not --sstoken_history 'ema'"):  # named as the flag it was given
        parse_recipe([*recipe(tmp_path, sstoken_recommended=True), *flags])
