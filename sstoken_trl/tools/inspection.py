"""`sstoken-inspect`: score samples with ssToken outside training and write the selection page.

One pass of the core's selective forward (`SelectiveForward`: history log-probs, the forward with the
AttnScore hook, `sstoken_select`) on a collated batch, without SFTTrainer. With a PEFT adapter the history is
the base model (adapters disabled), as in training with history "base".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig, TrlParser

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.data.collator import SSTokenCollator
from sstoken_trl.data.spans import ASSISTANT_TAG, USER_TAG
from sstoken_trl.history import HistoryContext, HistorySource, build_history
from sstoken_trl.integration.selective_forward import BatchSelection, SelectiveForward
from sstoken_trl.scoring.hook import hook_scoring_layer
from sstoken_trl.selection.budget import REAL_LABELS
from sstoken_trl.tools.arguments import (
    SSTokenArguments,
    SSTokenSettingError,
    exit_on_error,
    given_keys,
    parse_checked,
    print_help,
)
from sstoken_trl.tools.help import dataclass_options, render_help
from sstoken_trl.tools.loading import load_data, load_model, load_tokenizer
from sstoken_trl.tools.visualize import render_html, summarize
from sstoken_trl.trl_internals import add_fused_lm_head, fused_model, has_fused_head


@dataclass
class InspectArguments:
    """What to score and where to write the page."""

    _argument_group_name = "what to inspect"

    model: str = field(metadata={"help": "Base model: a hub id or a local folder."})
    data: str = field(metadata={"help": "Samples: a local .jsonl / .json / .csv / .parquet file or a hub dataset."})
    adapter: str | None = field(
        default=None, metadata={"help": "PEFT adapter folder (e.g. sstoken-train's output_dir) to load on the model."}
    )
    split: str = field(default="train", metadata={"help": "Dataset split to read."})
    start: int = field(default=0, metadata={"help": "Index of the first sample shown."})
    num_samples: int = field(default=4, metadata={"help": "Number of samples scored and shown."})
    output: str = field(default="selection.html", metadata={"help": "Where to write the HTML page."})
    max_length: int | None = field(default=1024, metadata={"help": "Keep the first max_length tokens of a sample."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype.", "choices": ["bfloat16", "float32"]})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention implementation (sdpa, ...)."})
    user_tag: str = field(default=USER_TAG, metadata={"help": "User-turn tag of template-text samples."})
    assistant_tag: str = field(default=ASSISTANT_TAG, metadata={"help": "Assistant-turn tag of template text."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    sstoken_recommended: bool = field(
        default=False,
        metadata={"help": "Score with SSTokenConfig.recommended() (as sstoken-train's key); sstoken_ flags still win."},
    )


def load_for_inspection(
    args: InspectArguments, head_outputs: tuple[str, ...] = ("log_probs",)
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (+ adapter) in eval mode with TRL's fused LM head (computing `head_outputs`), and its tokenizer (the
    adapter's, if saved)."""
    model_args = ModelConfig(
        model_name_or_path=args.model, dtype=args.dtype, attn_implementation=args.attn_implementation
    )
    model = load_model(model_args, args.trust_remote_code).to(PartialState().device)
    add_fused_lm_head(model, outputs=head_outputs)
    if args.adapter is not None:
        model = PeftModel.from_pretrained(model, args.adapter)
    has_tokenizer = args.adapter is not None and (Path(args.adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(args.adapter if has_tokenizer else args.model, trust_remote_code=args.trust_remote_code)
    return model.eval(), tokenizer


INSPECTED_HISTORIES = ("base", "model")


def history_source(model: torch.nn.Module, inner: PreTrainedModel, config: SSTokenConfig) -> HistorySource | None:
    """The history of `config` for this model; None (REL 0, selection by AttnScore alone) when there is none."""
    if config.history not in INSPECTED_HISTORIES:
        raise ValueError(f"sstoken-inspect supports history 'base' and 'model', not {config.history!r}.")
    if config.history == "base" and not isinstance(model, PeftModel):
        print("No adapter given, so no history model: REL is 0 and tokens are ranked by AttnScore alone.")
        return None
    if config.history == "model" and config.history_model is None:
        raise ValueError("history 'model' needs --sstoken_history_model PATH.")
    return build_history(HistoryContext(config, model, inner, inner.forward, config.history_model))


def score_batch(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], config: SSTokenConfig
) -> tuple[BatchSelection, bool]:
    """The selection ssToken makes on `batch` (input_ids, attention_mask, labels), under no_grad, and whether it
    had a history model (without one REL is 0)."""
    inner = fused_model(model)
    if not has_fused_head(model):
        raise ValueError(
            "The model needs TRL's fused LM head: call sstoken_trl.trl_internals.add_fused_lm_head(model)."
        )
    hook = hook_scoring_layer(inner, config)
    vocab_size = inner.config.get_text_config().vocab_size
    history = history_source(model, inner, config)
    step = SelectiveForward(inner.forward, config, hook, history, 0, vocab_size)
    step.global_step = step.rel_warmup  # past the warm-up: gamma as configured
    try:
        with torch.no_grad():
            step(**batch, **{REAL_LABELS: batch["labels"]}, fused_lm_head=True, use_cache=False)
    finally:
        hook.remove()
    return step.last, history is not None


DESCRIPTION = (
    "Score a few samples with a model (and a PEFT adapter, e.g. sstoken-train's output_dir) as ssToken would in "
    "training, print which response tokens the selection keeps, and write them as an HTML page with each token's "
    "scores. With an adapter the history is the base model (adapters off), as in training with history 'base'."
)


def short_help(prog: str = "sstoken-inspect") -> str:
    """`--help`: the description, the inspect arguments, then the sstoken_ selection settings."""
    groups = [(cls._argument_group_name, dataclass_options(cls)) for cls in (InspectArguments, SSTokenArguments)]
    usage = f"{prog} --model MODEL --data FILE [--adapter DIR] [--output selection.html] [--sstoken_KEY VALUE ...]"
    epilog = "The same settings may come from a YAML file of these keys: --config FILE (flags override it)."
    return render_help(usage, DESCRIPTION, groups, epilog)


def run_inspect(argv: list[str] | None = None) -> Path:
    """The `sstoken-inspect` command; returns the path of the HTML page."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print_help(short_help())
    parser = TrlParser((InspectArguments, SSTokenArguments), prog="sstoken-inspect", allow_abbrev=False)
    args, sstoken_args = parse_checked(parser, argv)
    try:
        config = sstoken_args.to_config(recommended=args.sstoken_recommended, given=given_keys(argv))
    except ValueError as err:
        raise SSTokenSettingError(str(err)).as_written(argv) from err
    rows = load_data(args.data)[args.split]
    if not 0 <= args.start < len(rows):
        raise ValueError(f"--start {args.start} is outside the {len(rows)} rows of split {args.split!r}.")
    samples = [rows[i] for i in range(args.start, min(args.start + args.num_samples, len(rows)))]
    model, tokenizer = load_for_inspection(args)
    collator = SSTokenCollator(tokenizer, args.user_tag, args.assistant_tag, max_length=args.max_length)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collator(samples).items()}
    selection, has_history = score_batch(model, batch, config)
    title = f"ssToken selection: {args.model}" + (f" + {args.adapter}" if args.adapter else "")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    vocab_size = fused_model(model).config.get_text_config().vocab_size
    page = render_html(selection, tokenizer, config, title=title, vocab_size=vocab_size, history=has_history)
    output.write_text(page, encoding="utf-8")
    shown = dict(vocab_size=vocab_size, history=has_history, max_samples=len(samples), page=str(output))
    print(summarize(selection, tokenizer, config, **shown, heading="ssToken selection"))
    return output


def main(argv: list[str] | None = None) -> None:
    """sstoken-inspect: score a few samples with a model (+ adapter) and write the selection as HTML."""
    exit_on_error("sstoken-inspect", run_inspect, argv)


if __name__ == "__main__":
    main()


__all__ = ["InspectArguments", "load_for_inspection", "main", "run_inspect", "score_batch"]
