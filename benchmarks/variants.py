"""The trained variants of the step-cost benchmark, all on one shared PEFT model, and their instruments.

- sft: TRL's SFTTrainer as it is.
- online: SSTokenCallback with history="base" (a no-grad forward with the adapters disabled, every micro-batch).
- cached: SSTokenCallback with history="cache" (base losses computed once before training, looked up per batch).
- output_attentions: the published code's attention path, as a reference. Every layer runs eager attention and
  returns its map (`output_attentions=True`); the last layer's map gives the score. History losses come from
  the same cache, and the same fused LM head computes the log-probs, so only the attention path differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import TrainerCallback
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.cache import CACHED_LOG_PROBS, LossCache
from sstoken_trl.layout import Layout, batch_layout
from sstoken_trl.selectors import sstoken_select


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
        step = self.sstoken.step if self.sstoken else None
        if step is not None:
            step.hook.score_fn = self.score.wrap(step.hook.score_fn)
            if step.history is not None:
                step.history.log_probs = self.history.wrap(step.history.log_probs)

    def take(self) -> dict[str, float]:
        return {"score_s": self.score.take(), "history_s": self.history.take(), "collate_s": self.collate.take()}


def prompt_mass(attn_map: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(B, T) head-averaged attention mass on prompt keys, read off a (B, H, T, T) attention map."""
    return (attn_map.float() * layout.prompt[:, None, None, :]).sum(-1).mean(dim=1) * layout.real


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
    """ssToken the published way: eager attention with maps in every layer, the last layer's map scored."""

    def __init__(self, *args: Any, sstoken: SSTokenConfig, score: Stopwatch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sstoken, self.score = sstoken, score
        self.timed_mass = score.wrap(prompt_mass)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        logp_his = inputs.pop(CACHED_LOG_PROBS)
        layout = batch_layout(inputs["labels"], inputs.get("attention_mask"))
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        captured: dict[str, torch.Tensor] = {}
        handle = base.get_decoder().layers[-1].self_attn.register_forward_hook(
            lambda module, args, out: captured.__setitem__("map", out[1])
        )
        try:
            out = model(**inputs, use_cache=False, output_attentions=True, fused_lm_head=True)
        finally:
            handle.remove()
        with torch.no_grad():
            attn = self.timed_mass(captured.pop("map"), layout)[:, 1:]
            rel = out.log_probs.detach() - logp_his
            _, keep, _ = sstoken_select(self.sstoken, layout, rel, attn, self.sstoken.gamma)
        loss = -(out.log_probs * keep).sum() / keep.sum().clamp(min=1)
        return (loss, out) if return_outputs else loss
