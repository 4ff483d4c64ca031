"""Loss truncation: drop L_ref > c log V, at most 1 - rho of the pool, never a response end; plain loop; CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from datasets import Dataset

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.data.collator import pretokenize
from sstoken_trl.selection.loss_truncation import truncate_tokens
from sstoken_trl.tools.arguments import parse_recipe
from sstoken_trl.tools.cli import check_recipe, train
from sstoken_trl.tools.tiny import build_model, build_tokenizer
from tests.conftest import prompt_completion_rows
from tests.reference import token_log_probs
from tests.test_token_cleaning import VOCAB, pool_rows


def reference_truncation(rows, ref, rho, c) -> tuple[list[list[int]], float]:
    """Plain loop over full logits: suspects are L_ref > c log V but a span's last token; the highest ones
    (earlier first on ties) are dropped, at most N - ceil(rho N)."""
    pool, vocab = [], ref.get_output_embeddings().weight.size(0)
    for r, row in enumerate(rows):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = token_log_probs(ref(input_ids=ids).logits, ids)[0]
        labels = row["labels"]
        for t in range(1, len(labels)):
            if labels[t] != -100:
                end = t + 1 == len(labels) or labels[t + 1] == -100
                pool.append((-logp[t - 1].item(), end, r, t))
    most = len(pool) - math.ceil(rho * len(pool) - 1e-9)
    suspects = sorted((p for p in pool if p[0] > c * math.log(vocab) and not p[1]), key=lambda p: -p[0])
    dropped = {(r, t) for _, _, r, t in suspects[:most]}
    labels = [
        [-100 if t == 0 or (r, t) in dropped else lab for t, lab in enumerate(row["labels"])]  # 0 predicts nothing
        for r, row in enumerate(rows)
    ]
    return labels, 1 - len(dropped) / len(pool)


@pytest.mark.parametrize(("rho", "c", "batch_size"), [(0.8, 1.0, 2), (0.5, 1.0, 8), (0.9, 0.99, 1), (0.8, 1.05, 3)])
def test_dropped_tokens_are_those_of_a_plain_loop(rho, c, batch_size):
    ref = build_model("llama", VOCAB, seed=2, attention_dropout=0.3).train()  # dropout must be off while scoring
    rows = pool_rows()
    truncated, share = truncate_tokens(Dataset.from_list(rows), ref, rho, c, batch_size=batch_size)
    expected, expected_share = reference_truncation(rows, ref.eval(), rho, c)
    assert truncated["labels"] == expected and share == pytest.approx(expected_share)
    assert truncated["input_ids"] == [r["input_ids"] for r in rows] and truncated["other"] == [r["other"] for r in rows]
    assert 0 < share < 1 or c > 1  # something was dropped where the threshold sits inside the losses
    assert "forward" not in vars(ref)  # the fused head installed for scoring is gone


def test_bad_input_is_refused(tmp_path):
    ref = build_model("llama", VOCAB, seed=2)
    with pytest.raises(ValueError, match="no response token"):
        truncate_tokens(Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [5, -100, -100]}]), ref)
    with pytest.raises(ValueError, match="select_ratio"):
        truncate_tokens(Dataset.from_list(pool_rows()), ref, 0.0)
    with pytest.raises(ValueError, match="truncation_loss"):
        SSTokenConfig(selector="loss_truncation", truncation_loss=0.0)
    with pytest.raises(ValueError, match="truncate_tokens"):
        SSTokenCallback(SSTokenConfig(selector="loss_truncation"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "output_dir": "o", "use_cpu": True, "use_peft": True}))
    with pytest.raises(ValueError, match="plain-SFT run on the same data"):
        check_recipe(parse_recipe(["--config", str(path), "--sstoken_selector", "loss_truncation"]))


def test_cli_truncates_then_trains_only_on_kept_tokens(tmp_path, capsys):
    rows = prompt_completion_rows(24, seed=3)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=200)
    for name, seed in (("base", 1), ("reference", 2)):
        tokenizer.save_pretrained(tmp_path / name)
        build_model("llama", len(tokenizer), seed=seed).save_pretrained(tmp_path / name)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model_name_or_path": str(tmp_path / "base"),
        "dataset_name": str(data),
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "use_peft": True,
        "lora_r": 4,
        "lora_target_modules": ["q_proj", "v_proj"],
        "activation_checkpointing": False,
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "report_to": [],
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "sstoken_selector": "loss_truncation",
        "sstoken_history_model": str(tmp_path / "reference"),
        "sstoken_select_ratio": 0.7,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trainer = train(parse_recipe(["--config", str(path)]))
    assert trainer.state.global_step == 2
    assert "Loss truncation: kept" in capsys.readouterr().out

    reference = build_model("llama", len(tokenizer), seed=2).eval()
    pretokenized = pretokenize(Dataset.from_list(rows), tokenizer).select_columns(["input_ids", "labels"])
    expected, share = reference_truncation(pretokenized.to_list(), reference, 0.7, 1.0)
    assert share < 1  # the random reference rates some tokens below a uniform guess
    trained_on = {tuple(r["input_ids"]): r["labels"] for r in trainer.train_dataset}
    assert [trained_on[tuple(ids)] for ids in pretokenized["input_ids"]] == expected
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SSTokenCallback))
    assert callback.config.selector == "full"
