"""`sstoken-train --config recipes/NAME.yaml [--any_field value ...]`: TRL's SFT script with ssToken selection.

The recipe is TRL's flat YAML (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig keys) plus the
`sstoken_` keys; flags override it. Samples of any supported format (template text, messages,
prompt/completion, token ids) are turned into `input_ids` + response-only `labels` once, then the stock
SFTTrainer trains with `SSTokenCallback`. Runs as is or under `accelerate launch -m sstoken_trl.tools.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import SFTTrainer, get_peft_config

from sstoken_trl.data.collator import pretokenize
from sstoken_trl.integration.callback import SSTokenCallback
from sstoken_trl.selection.selectors import uses_history
from sstoken_trl.selection.token_cleaning import check_token_cleaning, clean_train_split
from sstoken_trl.tools.arguments import Recipe, parse_recipe
from sstoken_trl.tools.chitchat import write_chitchat
from sstoken_trl.tools.loading import load_model, load_splits, load_tokenizer
from sstoken_trl.tools.visualize import render_html, summarize
from sstoken_trl.trl_internals import fused_model

SELECTION_PAGE = "selection.html"


def check_recipe(recipe: Recipe) -> None:
    """Raise on settings that cannot work together, before anything is loaded."""
    if recipe.sstoken.selector == "token_cleaning":
        check_token_cleaning(recipe.sstoken)
    elif uses_history(recipe.sstoken) and recipe.sstoken.history == "base" and not recipe.model.use_peft:
        raise ValueError(
            "sstoken_history: base reads the base model by switching the LoRA adapters off, so it needs "
            "use_peft: true. For full fine-tuning use sstoken_history: model with sstoken_history_model: PATH."
        )
    if recipe.sstoken.selector == "loss_truncation" and not recipe.sstoken.history_model:
        raise ValueError(
            "sstoken_selector: loss_truncation reads run 1, a plain-SFT run on the same data, as its history model. "
            "Train it first (sstoken-train --config RECIPE --sstoken_recommended false --sstoken_selector full "
            "--output_dir RUN_1), then pass --sstoken_history_model RUN_1. The recommended selection "
            "(sstoken_recommended: true) needs no second run."
        )
    if not recipe.model.model_name_or_path:
        raise ValueError("No model given: set model_name_or_path (a hub id or a local folder).")
    if not recipe.script.dataset_name and not recipe.data.datasets:
        raise ValueError(
            "No training data: set dataset_name (a hub dataset, or a local .jsonl / .json / .csv / .parquet file) "
            "or datasets (TRL's mixture list) in the recipe."
        )


def response_labels(dataset: Dataset | None, tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> Dataset | None:
    """Samples -> `input_ids` + `labels` on response tokens only (TRL's pipeline then keeps them as they are)."""
    if dataset is None:
        return None
    run = recipe.run
    return pretokenize(
        dataset,
        tokenizer,
        run.sstoken_user_tag,
        run.sstoken_assistant_tag,
        max_length=recipe.training.max_length,
        on_bad_sample=run.sstoken_on_bad_sample,
    )


def report(trainer: SFTTrainer, callback: SSTokenCallback, tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> None:
    """Print what the last micro-batch selected and write it as an HTML page into output_dir."""
    selection = callback.last_selection
    if selection is None or recipe.sstoken.selector == "token_cleaning":  # cleaned before training: no batch selection
        print(f"Adapter and tokenizer: {recipe.training.output_dir}")
        return
    page = Path(recipe.training.output_dir) / SELECTION_PAGE
    title = f"ssToken selection, last training batch: {recipe.model.model_name_or_path}"
    vocab_size = fused_model(trainer.model).config.get_text_config().vocab_size  # the one the selection used
    html = render_html(selection, tokenizer, recipe.sstoken, title=title, vocab_size=vocab_size)
    page.write_text(html, encoding="utf-8")
    logged = [entry for entry in trainer.state.log_history if "sstoken/selected_fraction" in entry]
    print(summarize(selection, tokenizer, recipe.sstoken, vocab_size, page=str(page)))
    if logged:  # each selector logs the signals it read: every sstoken/* statistic means something
        shown = {k.split("/")[1]: v for k, v in logged[-1].items() if k.startswith("sstoken/")}
        stats = ", ".join(f"{name} {v:.3f}" for name, v in shown.items())
        print(f"  last logged step {logged[-1].get('step', '?')}: {stats}")
    print(f"Adapter and tokenizer: {recipe.training.output_dir}")


def train(recipe: Recipe) -> SFTTrainer:
    """Load model, tokenizer and data as the recipe says, train with ssToken, save, report."""
    check_recipe(recipe)
    return _run(recipe)


def _run(recipe: Recipe) -> SFTTrainer:
    """`train` for a recipe already checked."""
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.run.sstoken_torch_threads or threads)
    try:
        return _train(recipe)
    finally:
        torch.set_num_threads(threads)


def ensure_demo_data(recipe: Recipe) -> None:
    """The SmolLM2 demo's data: real chitchat conversations written to dataset_name when it does not exist."""
    run, path = recipe.run, recipe.script.dataset_name
    if run.sstoken_chitchat_conversations and path and not Path(path).exists():
        with recipe.training.main_process_first(desc="chitchat demo data"):
            if not Path(path).exists():
                write_chitchat(path, run.sstoken_chitchat_conversations, run.sstoken_chitchat_max_turns)


def _train(recipe: Recipe) -> SFTTrainer:
    """One training run as the recipe says."""
    training, model_args = recipe.training, recipe.model
    ensure_demo_data(recipe)
    train_raw, eval_raw = load_splits(recipe.script, recipe.data, with_eval=training.eval_strategy != "no")
    if recipe.run.sstoken_build_tiny_model:
        from sstoken_trl.tools.demo import ensure_tiny_model

        with training.main_process_first(desc="tiny demo model"):
            ensure_tiny_model(
                model_args.model_name_or_path,
                train_raw,
                recipe.run.sstoken_tiny_base_steps,
                training.seed,
                training.max_length,
                verbose=training.process_index == 0,
            )
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, training.trust_remote_code)
    model = load_model(model_args, training.trust_remote_code, **(training.model_init_kwargs or {}))
    with training.main_process_first(desc="ssToken response spans"):
        train_set = response_labels(train_raw, tokenizer, recipe)
        eval_set = response_labels(eval_raw, tokenizer, recipe)
    sstoken = recipe.sstoken
    if sstoken.selector == "token_cleaning":  # labels cleaned once here, then plain SFT on them
        train_set, sstoken = clean_train_split(train_set, model, sstoken, training)
    callback = SSTokenCallback(sstoken)
    trainer = SFTTrainer(
        model=model,
        args=training,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model(training.output_dir)
    if trainer.is_world_process_zero():
        report(trainer, callback, tokenizer, recipe)
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def main(argv: list[str] | None = None) -> None:
    """Entry point of `sstoken-train`: a bad recipe or flag exits with status 2 and the reason."""
    try:
        recipe = parse_recipe(argv)
        check_recipe(recipe)
    except (ValueError, FileNotFoundError) as err:
        print(f"sstoken-train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    _run(recipe)


if __name__ == "__main__":
    main()
