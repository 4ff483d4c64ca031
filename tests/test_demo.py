"""The offline demo: its shipped data, and the README's first command end to end (shortened), offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset

from sstoken_trl.tools.arguments import parse_recipe
from sstoken_trl.tools.cli import main, train
from sstoken_trl.tools.demo import DATA_FILE, demo_rows
from tests.test_readme import update_readme
from tests.test_visualize import Page

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo-cpu.yaml"


def test_shipped_data_is_the_generated_template_text():
    rows = load_dataset("json", data_files=str(DATA_FILE), split="train").to_list()
    assert rows == demo_rows(), "regenerate: python -c 'from sstoken_trl.tools.demo import write_demo_data as w; w()'"
    assert all(r["text"].count("<|User|>") == r["text"].count("<|Assistant|>") >= 1 for r in rows)
    assert any(r["text"].count("<|Assistant|>") == 2 for r in rows)  # multi-turn samples too


def test_data_is_declared_package_data():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["sstoken_trl"]
    package = ROOT / "sstoken_trl"
    assert DATA_FILE in {p for pattern in patterns for p in package.glob(pattern)}


def run_demo(*flags: str, processes: int = 1) -> subprocess.CompletedProcess:
    """The demo recipe under `accelerate launch` (the torchrun launcher; the recipe's use_cpu makes it gloo DDP)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
    launch += ["--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launch, "-m", "sstoken_trl.tools.cli", "--config", str(RECIPE), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo, built and trained once by two processes with the network off (fewer steps than the recipe)."""
    root = tmp_path_factory.mktemp("demo")
    flags = ["--model_name_or_path", str(root / "base"), "--output_dir", str(root / "sstoken")]
    # A 10-step base is nearly uniform, its surprise far below 3 nats: a lower threshold, so that tokens are dropped.
    short = [
        "--sstoken_tiny_base_steps",
        "10",
        "--max_steps",
        "5",
        "--logging_steps",
        "1",
        "--sstoken_surprise_nats",
        "0.2",
    ]
    done = run_demo(*flags, *short, processes=2)
    assert done.returncode == 0, done.stderr[-5000:]
    return root, flags, done


def test_demo_builds_trains_and_reports(demo):
    root, _, done = demo
    assert done.stdout.count("Building a tiny LLaMA-shaped model") == 1  # the main process builds, once
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (root / "base" / name).is_file()
    assert (root / "sstoken" / "adapter_model.safetensors").is_file()
    assert "ssToken selection of the last micro-batch: 8 samples" in done.stdout
    assert re.search(r"last logged step 5: .*selected_fraction", done.stdout)
    page = Page((root / "sstoken" / "selection.html").read_text())
    assert len(page.samples) == 8
    statuses = {t["status"] for sample in page.samples for t in sample}
    assert {"prompt", "kept", "down"} <= statuses  # the recommendation leaves suspects in at half weight
    assert "dropped" not in statuses


def test_readme_demo_block_is_what_a_real_run_prints(demo):
    """The README's demo block (generated from the full recipe: python docs/update_readme.py --demo) against this
    shortened run: the same lines and wording, figures aside; its samples are samples of the demo data."""
    root, _, done = demo
    printed = update_readme.readme_view(done.stdout.replace(str(root), "outputs/demo-cpu"))
    shown = update_readme.output_block(update_readme.README.read_text(encoding="utf-8"), "demo-cpu")
    assert update_readme.stable(shown) == update_readme.stable(printed), "run: python docs/update_readme.py --demo"
    rows = {row["text"] for row in demo_rows()}
    samples = re.findall(r"^  sample \d+: (.*)$", shown, flags=re.MULTILINE)
    assert len(samples) == 3
    left_out = int(re.search(r"(\d+) left out at loss weight", shown).group(1))
    assert any("[" in text for text in samples) == (left_out > 0)  # brackets mark the tokens left out
    for text in samples:
        assert re.sub(r"[\[\]{}]|</s>", "", text) in rows  # marks and end-of-sequence tokens removed
    assert "kernels" not in done.stderr and "FutureWarning" not in done.stderr  # no dependency noise


def test_demo_reuses_what_it_built(demo, capsys):
    root, flags, _ = demo
    weights = (root / "base" / "model.safetensors").read_bytes()
    main(["--config", str(RECIPE), *flags, "--max_steps", "2"])
    printed = capsys.readouterr().out
    assert f"Reusing the tiny base model at {root / 'base'}" in printed
    assert (root / "base" / "model.safetensors").read_bytes() == weights
    assert "ssToken selection of the last micro-batch" in printed


def test_qlora_settings_train_a_4bit_model_end_to_end(demo, tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    root, flags, _ = demo
    qlora = ["--load_in_4bit", "true", "--use_bnb_nested_quant", "true", "--dtype", "bfloat16", "--max_steps", "2"]
    trainer = train(parse_recipe(["--config", str(RECIPE), *flags, *qlora, "--output_dir", str(tmp_path)]))
    model = trainer.model.get_base_model()
    assert model.is_loaded_in_4bit
    assert isinstance(model.model.layers[0].mlp.up_proj.base_layer, bitsandbytes.nn.Linear4bit)
    assert trainer.state.global_step == 2 and (tmp_path / "adapter_model.safetensors").is_file()
