"""Set-ups ssToken cannot run are refused when the trainer is built, on every process: no late failure, no hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.integration.guards import check_runtime
from sstoken_trl.tools.tiny import build_model
from tests.conftest import cpu_sft_args, prompt_completion_rows

ROOT = Path(__file__).resolve().parents[1]


def trainer(tokenizer, model=None, config=None, **overrides):
    return SFTTrainer(
        model=model if model is not None else build_model("llama", len(tokenizer)),
        args=SFTConfig(**cpu_sft_args(**overrides)),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        callbacks=[SSTokenCallback(config or SSTokenConfig())],
    )


def test_torch_compile_is_refused_when_the_trainer_is_built(tokenizer):
    # Without the guard this trainer builds, and the first step fails ("the hooked attention layer did not run").
    with pytest.raises(ValueError, match="torch_compile=False"):
        trainer(tokenizer, torch_compile=True, torch_compile_backend="eager")


def test_a_compiled_layer_is_refused(tokenizer):
    model = build_model("llama", len(tokenizer))
    model.model.layers[-1] = torch.compile(model.model.layers[-1], backend="eager")  # regional compilation
    with pytest.raises(ValueError, match="does not support torch.compile"):
        trainer(tokenizer, model=model)


def test_cache_history_is_refused_when_parameters_are_sharded(tokenizer, tmp_path):
    cached = SSTokenConfig(history="cache", history_cache_dir=str(tmp_path / "cache"))
    sft = trainer(tokenizer, config=cached)
    check_runtime(sft, cached)  # one process, nothing sharded: allowed
    sft.is_fsdp_enabled = True  # what Trainer sets under an FSDP accelerate config
    with pytest.raises(ValueError, match="history='base'"):
        check_runtime(sft, cached)
    check_runtime(sft, SSTokenConfig(history="base"))  # the online base history runs on every process


def launch(mode: str, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "tests" / "scripts" / "cache_ranks.py"), str(out), mode]
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return done, time.monotonic() - t0


def test_sharded_cache_build_stops_every_process_at_once(tmp_path):
    done, seconds = launch("sharded", tmp_path / "run")
    assert done.returncode != 0
    assert done.stderr.count("history='cache' is not supported with parameters sharded") == 2, done.stderr[-3000:]
    assert not list(tmp_path.glob("run-rank*.txt")) and not (tmp_path / "run-cache").exists()
    assert seconds < 120  # both ranks stopped before any barrier, instead of waiting on each other


def test_cache_history_still_builds_and_trains_under_ddp(tmp_path):
    done, _ = launch("ddp", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run-cache" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.glob("run-rank*.txt")) == ["run-rank0.txt", "run-rank1.txt"]
