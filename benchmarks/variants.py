"""The trained variants of the step-cost benchmark, all on one shared PEFT model, and their instruments.

- sft: TRL's SFTTrainer as it is.
- online: SSTokenCallback with history="base" (a no-grad forward with the adapters disabled, every micro-batch).
- cached: SSTokenCallback with history="cache" (base losses computed once before training, looked up per batch).
- recommended: SSTokenConfig.recommended() (loss truncation in one run, no history), with its selection warm-up
  off so that every timed step selects (the warm-up steps are plain SFT).
- recommended_anchor: the same plus the base anchor (benchmarks/base_anchor.py: a no-grad forward with the adapters
  disabled and the LM head of both models over the positions not fully trained), a forgetting candidate.
- recommended_anchor_prompt: the same with the anchor on the prompt's positions only (`prompt_only=True`).
- recommended_anchor_general: the recommendation with the anchor on general rows alone (two rows of the data's own
  shape per step, a forward without gradient and one with: the general chat rows of benchmarks/real_sft).
- output_attentions: the published code's attention path, as a reference. Every layer runs eager attention and
  returns its map (`output_attentions=True`); the last layer's map gives the score. History losses come from
  the same cache, and the same fused LM head computes the log-probs, so only the attention path differs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from benchmarks.base_anchor import ANCHOR_WEIGHT, GENERAL_BATCH, BaseAnchor
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.history.cache import CACHED_LOG_PROBS, LossCache
from sstoken_trl.scoring.layout import Layout, batch_layout
from sstoken_trl.selection.selectors import sstoken_select

VARIANTS = ("sft", "online", "cached", "output_attentions", "recommended", "recommended_anchor")
VARIANTS += ("recommended_anchor_prompt", "recommended_anchor_general")


class Stopwatch:
    """Sums the time spent in wrapped calls; CUDA events on a GPU (read after a synchronize), else a clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out

        return timed

    def take(self) -> float:
        """Seconds since the last take; on a GPU call it after a synchronize."""
        total = self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1000.0
        self.seconds, self.events = 0.0, []
        return total


class Instruments(TrainerCallback):
    """Times the scoring layer, the history log-probs and the train collate function of one variant."""

    def __init__(self, device: torch.device, sstoken: SSTokenCallback | None = None) -> None:
        self.sstoken = sstoken
        self.score = Stopwatch(device)
        self.history = Stopwatch(device)
        self.collate = Stopwatch(torch.device("cpu"))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loader = kwargs["train_dataloader"]
        loader = getattr(loader, "base_dataloader", loader)
        loader.collate_fn = self.collate.wrap(loader.collate_fn)
        step = self.sstoken.selective_forward if self.sstoken else None
        if step is not None:
            if step.hook is not None:  # no hook when the selection reads no attention (gamma 1, loss truncation)
                step.hook.score_fn = self.score.wrap(step.hook.score_fn)
            if step.history is not None:
                step.history.log_probs = self.history.wrap(step.history.log_probs)

    def take(self) -> dict[str, float]:
        return {"score_s": self.score.take(), "history_s": self.history.take(), "collate_s": self.collate.take()}


def prompt_mass(attn_map: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(B, T) head-averaged attention mass on prompt keys, read off a (B, H, T, T) attention map."""
    mass = torch.matmul(attn_map, layout.prompt.to(attn_map.dtype)[:, None, :, None])  # (B, H, T, 1)
    return mass[..., 0].float().mean(dim=1) * layout.real


class CachedHistoryCollator:
    """TRL's collator plus the cached base log-probs of the batch (the cache is opened on first use)."""

    def __init__(self, pad_token_id: int, cache_dir: str) -> None:
        self.pad = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
        self.cache_dir = cache_dir
        self.cache: LossCache | None = None

    def __call__(self, examples: list) -> dict[str, Any]:
        batch = self.pad(examples)
        self.cache = self.cache or LossCache(self.cache_dir)
        batch[CACHED_LOG_PROBS] = self.cache.log_probs(batch)
        return batch


class OutputAttentionsTrainer(SFTTrainer):
    """ssToken the published way: eager attention with maps in every layer, the last layer's map scored.

    The maps of all layers stay referenced until the backward is done, as `outputs.attentions` does in a
    training loop; the fused LM head does not return them, so forward hooks collect them.
    """

    def __init__(self, *args: Any, sstoken: SSTokenConfig, score: Stopwatch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sstoken = sstoken
        self.timed_mass = score.wrap(prompt_mass)
        self.attentions: list[torch.Tensor] | None = None

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self.attentions = None

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        logp_his = inputs.pop(CACHED_LOG_PROBS)
        layout = batch_layout(inputs["labels"], inputs.get("attention_mask"))
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        maps: list[torch.Tensor] = []

        def keep_map(module: nn.Module, args: tuple, out: tuple) -> None:
            maps.append(out[1])  # (B, H, T, T), returned because output_attentions=True

        handles = [layer.self_attn.register_forward_hook(keep_map) for layer in base.get_decoder().layers]
        try:
            out = model(**inputs, use_cache=False, output_attentions=True, fused_lm_head=True)
        finally:
            for handle in handles:  # before the backward: a checkpointed layer's recompute adds no map
                handle.remove()
        self.attentions = maps
        with torch.no_grad():
            attn = self.timed_mass(maps[-1], layout)[:, 1:]
            rel = out.log_probs.detach() - logp_his
            _, keep, _ = sstoken_select(self.sstoken, layout, rel, attn, self.sstoken.gamma)
        loss = -(out.log_probs * keep).sum() / keep.sum().clamp(min=1)
        return (loss, out) if return_outputs else loss


class Seat:
    """A variant's view of the shared model: the forward slot TRL's fused head lives in, the attention kernel."""

    def __init__(self, inner: PreTrainedModel, pristine: Any, attn_implementation: str) -> None:
        self.inner, self.pristine, self.forward = inner, pristine, pristine
        self.attn_implementation = attn_implementation

    def __call__(self, taking: bool) -> None:
        if taking:
            vars(self.inner)["forward"] = self.forward
            self.inner.set_attn_implementation(self.attn_implementation)
        else:
            self.forward = vars(self.inner)["forward"]
            vars(self.inner)["forward"] = self.pristine


def make_trainers(
    args: argparse.Namespace, model: PeftModel, tokenizer: Any, dataset: Dataset, device: torch.device, tmp: str
) -> tuple[dict[str, SFTTrainer], dict[str, Instruments]]:
    """One trainer per variant in `args.variants`, all on `model` with one shared AdamW."""
    names = args.variants.split(",")
    if set(names) - set(VARIANTS):
        raise ValueError(f"unknown variants {sorted(set(names) - set(VARIANTS))}; choose from {VARIANTS}")
    attn = names.index("output_attentions") if "output_attentions" in names else None
    if attn is not None and ("cached" not in names or names.index("cached") > attn):
        raise ValueError("'output_attentions' needs 'cached' before it: that variant builds the history cache.")
    cuda = device.type == "cuda"
    config = SFTConfig(
        output_dir=os.path.join(tmp, "out"),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        max_length=None,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)  # shared: one set of Adam states for all
    sstoken = dict(select_ratio=args.select_ratio, gamma=args.gamma)
    cache_dir = os.path.join(tmp, "cache")
    trainers, instruments = {}, {}
    for name in names:
        common = dict(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        common["optimizers"] = (optimizer, None)
        if name == "sft":
            inst = Instruments(device)
            trainer = SFTTrainer(**common, callbacks=[inst])
        elif name.startswith("recommended"):
            callback = SSTokenCallback(SSTokenConfig.recommended(select_warmup_ratio=0.0))
            inst = Instruments(device, callback)
            anchor: list[BaseAnchor] = []
            if name == "recommended_anchor_general":  # two of the data's own rows stand in for general text
                anchor = [BaseAnchor(ANCHOR_WEIGHT, general=dataset["input_ids"][:GENERAL_BATCH], on_task=False)]
            elif "anchor" in name:
                anchor = [BaseAnchor(ANCHOR_WEIGHT, callback, prompt_only=name == "recommended_anchor_prompt")]
            trainer = SFTTrainer(**common, callbacks=[callback, inst, *anchor])
        elif name in ("online", "cached"):
            history = dict(history="cache", history_cache_dir=cache_dir) if name == "cached" else {}
            callback = SSTokenCallback(SSTokenConfig(**sstoken, **history))
            inst = Instruments(device, callback)
            trainer = SFTTrainer(**common, callbacks=[callback, inst])
        else:
            inst = Instruments(device)
            collator = CachedHistoryCollator(tokenizer.pad_token_id, cache_dir)
            trainer = OutputAttentionsTrainer(
                **common, data_collator=collator, callbacks=[inst], sstoken=SSTokenConfig(**sstoken), score=inst.score
            )
        trainer.remove_callback(PrinterCallback)
        trainers[name], instruments[name] = trainer, inst
    return trainers, instruments
