"""TokenCleaning: global top-rho by L_base - L_ref over the pool, against a plain loop over full logits; CLI run."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import yaml
from datasets import Dataset

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.data.collator import pretokenize
from sstoken_trl.selection.token_cleaning import clean_tokens
from sstoken_trl.tools.arguments import parse_recipe
from sstoken_trl.tools.cli import check_recipe, train
from sstoken_trl.tools.tiny import build_model
from tests.conftest import tiny_cli_run
from tests.reference import token_log_probs

VOCAB = 90


def pool_rows() -> list[dict[str, list[int]]]:
    """Rows of different lengths; one with two response spans, one whose only label is the first token."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, spans in [(9, [(4, 9)]), (14, [(3, 7), (10, 14)]), (6, [(2, 6)]), (12, [(5, 12)]), (5, [(0, 1)])]:
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * length
        for start, end in spans:
            labels[start:end] = ids[start:end]
        rows.append({"input_ids": ids, "labels": labels, "other": length})
    return rows


def reference_cleaning(rows, base, ref, rho) -> tuple[list[list[int]], float]:
    """Plain loop: per-token losses from each model's full logits, one global ranking, ties to the earlier token."""
    pool = []
    for r, row in enumerate(rows):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp_base = token_log_probs(base(input_ids=ids).logits, ids)[0]
            logp_ref = token_log_probs(ref(input_ids=ids).logits, ids)[0]
        for t in range(1, len(row["labels"])):
            if row["labels"][t] != -100:
                loss_base, loss_ref = -logp_base[t - 1].item(), -logp_ref[t - 1].item()
                pool.append((loss_base - loss_ref, r, t))
    k = math.ceil(Fraction(str(rho)) * len(pool))
    kept = {(r, t) for _, r, t in sorted(pool, key=lambda p: (-p[0], p[1], p[2]))[:k]}
    labels = [[lab if (r, t) in kept else -100 for t, lab in enumerate(row["labels"])] for r, row in enumerate(rows)]
    return labels, k / len(pool)


@pytest.mark.parametrize(("rho", "batch_size"), [(0.6, 2), (0.3, 8), (1.0, 1)])
def test_kept_tokens_are_the_global_top_rho_of_a_plain_loop(rho, batch_size):
    base = build_model("llama", VOCAB, seed=1, attention_dropout=0.3).train()  # dropout must be off while scoring
    ref = build_model("llama", VOCAB, seed=2).eval()
    rows = pool_rows()
    cleaned, share = clean_tokens(Dataset.from_list(rows), base, ref, rho, batch_size=batch_size)
    expected, expected_share = reference_cleaning(rows, base.eval(), ref, rho)
    assert cleaned["labels"] == expected and share == pytest.approx(expected_share)
    assert cleaned["input_ids"] == [r["input_ids"] for r in rows] and cleaned["other"] == [r["other"] for r in rows]
    for row, labels in zip(rows, cleaned["labels"], strict=True):  # kept tokens keep their label, nothing is added
        assert all(lab == -100 or lab == row["labels"][t] != -100 for t, lab in enumerate(labels))
    per_sample = [
        sum(lab != -100 for lab in labels) / max(1, sum(x != -100 for x in r["labels"][1:]))
        for r, labels in zip(rows, expected, strict=True)
    ]
    if rho < 1:
        assert len({round(s, 3) for s in per_sample}) > 1  # global, not per sample: shares differ between rows
    assert "forward" not in vars(base) and "forward" not in vars(ref)  # the fused head installed for scoring is gone


def test_bad_input_is_refused():
    base, ref = build_model("llama", VOCAB, seed=1), build_model("llama", VOCAB, seed=2)
    prompts_only = Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [5, -100, -100]}])
    with pytest.raises(ValueError, match="no response token"):
        clean_tokens(prompts_only, base, ref, 0.5)
    with pytest.raises(ValueError, match="pretokenize"):
        clean_tokens(Dataset.from_list([{"text": "a b"}]), base, ref, 0.5)
    with pytest.raises(ValueError, match="select_ratio"):
        clean_tokens(Dataset.from_list(pool_rows()), base, ref, 0.0)
    with pytest.raises(ValueError, match="clean_tokens"):
        SSTokenCallback(SSTokenConfig(selector="token_cleaning"))


def test_recipe_without_reference_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "output_dir": "o", "use_cpu": True, "use_peft": True}))
    recipe = parse_recipe(["--config", str(path), "--sstoken_selector", "token_cleaning"])
    with pytest.raises(ValueError, match="sstoken_history_model"):
        check_recipe(recipe)


def test_cli_cleans_then_trains_only_on_kept_tokens(tmp_path, capsys):
    path, rows, tokenizer = tiny_cli_run(
        tmp_path,
        {"base": 1, "reference": 2},
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        sstoken_selector="token_cleaning",
        sstoken_history_model=str(tmp_path / "reference"),
        sstoken_select_ratio=0.5,
    )
    trainer = train(parse_recipe(["--config", str(path)]))
    assert trainer.state.global_step == 3
    assert "TokenCleaning: kept 50.0% of the training set's response tokens" in capsys.readouterr().out

    base = build_model("llama", len(tokenizer), seed=1)
    reference = build_model("llama", len(tokenizer), seed=2)
    pretokenized = pretokenize(Dataset.from_list(rows), tokenizer).select_columns(["input_ids", "labels"])
    expected, _ = reference_cleaning(pretokenized.to_list(), base.eval(), reference.eval(), 0.5)
    trained_on = {tuple(r["input_ids"]): r["labels"] for r in trainer.train_dataset}
    assert [trained_on[tuple(ids)] for ids in pretokenized["input_ids"]] == expected
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SSTokenCallback))
    assert callback.config.selector == "full"
    last = callback.last_selection
    assert torch.equal(last.keep, last.labels[:, 1:] != -100)  # trained on every label left, i.e. the kept tokens
    assert 0 < last.keep.sum() < sum(sum(x != -100 for x in r["labels"][1:]) for r in pretokenized)
