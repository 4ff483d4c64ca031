"""history="model": a separate frozen model (full fine-tuning without PEFT, RHO-1's reference, loss truncation's run 1).

Under a sharding engine the model is prepared as TRL prepares its reference models (trl.models.utils), so that a
history forward runs on every process with the weights gathered:
- FSDP2: `fully_shard` per decoder layer and at the root, with the trainer's mesh, mixed precision and offload
  policy. TRL shards only the root, which gathers the whole model for each forward; per layer, one layer's
  weights are whole at a time, as in the trained model.
- DeepSpeed: TRL's `prepare_deepspeed`, an inference engine over the model (ZeRO-3: partitioned like the trained
  model; ZeRO-1/2: a whole copy on every process).
A model that ZeRO-3 partitions at load (`zero3_init_flag`: transformers' `from_pretrained` runs under
`zero.Init` once a ZeRO-3 config is registered) holds no weights of its own outside an engine, so without a
DeepSpeed trainer it is refused before loading, with what to do. FSDP1 is refused at trainer build
(integration/guards.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from sstoken_trl.history.source import Forward, HistoryContext, HistorySource
from sstoken_trl.tools.loading import resolve_model
from sstoken_trl.trl_internals import add_fused_lm_head, has_fused_head


def zero3_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned the model's parameters (each carries a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def shard_fsdp2(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """`fully_shard` each decoder layer (the classes in `_no_split_modules`), then the root; frozen, eval mode."""
    from torch.distributed.fsdp import fully_shard

    model.eval().requires_grad_(False)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def _zero3_refusal(trainer: Trainer | None) -> str:
    where = "outside training" if trainer is None else "in a trainer that runs no DeepSpeed engine"
    return (
        f"history='model' {where}, with a DeepSpeed ZeRO-3 config registered in transformers "
        "(zero3_init_flag): the history model is partitioned across processes when it is loaded and holds no "
        "weights of its own outside a DeepSpeed engine, so calling it would fail or read empty weights. Train "
        "with the ZeRO-3 config through the trainer (accelerate launch with a DeepSpeed config: the history model "
        "is then given its own engine), or run without DeepSpeed (FSDP2, DDP or one process)."
    )


def prepare_for_engine(model: nn.Module, trainer: Trainer | None) -> nn.Module:
    """The frozen history model, callable on every process under the trainer's engine (see the module docstring)."""
    deepspeed = trainer is not None and trainer.is_deepspeed_enabled
    if zero3_partitioned(model) and not deepspeed:
        raise ValueError(_zero3_refusal(trainer))
    if deepspeed:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(model, trainer.accelerator)
    if trainer is not None and trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin = trainer.accelerator.state.fsdp_plugin
        mesh = getattr(trainer.accelerator, "torch_device_mesh", None)
        dims = getattr(getattr(trainer.accelerator, "parallelism_config", None), "fsdp_dim_names", None)
        return shard_fsdp2(
            model.to(trainer.accelerator.device),
            mesh=mesh[tuple(dims)] if mesh is not None and dims else None,  # None: every process
            reshard_after_forward=plugin.reshard_after_forward,
            offload_policy=plugin.cpu_offload,
            mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        )
    return model


class ModelHistory(HistorySource):
    """A separate frozen model, given as an instance or loaded from a path (a folder, hub id or GGUF file) in the
    trained model's dtype."""

    def __init__(self, model: PreTrainedModel | str, like: PreTrainedModel, trainer: Trainer | None = None) -> None:
        if isinstance(model, str):
            if is_deepspeed_zero3_enabled() and not (trainer is not None and trainer.is_deepspeed_enabled):
                raise ValueError(_zero3_refusal(trainer))
            model = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=like.dtype)
        if not zero3_partitioned(model):
            model = model.to(like.device)
        model = model.eval().requires_grad_(False)
        if not has_fused_head(model):
            add_fused_lm_head(model)
        self.model = prepare_for_engine(model, trainer)

    @classmethod
    def from_context(cls, context: HistoryContext) -> ModelHistory:
        if context.history_model is None:
            raise ValueError("history='model' needs a history model: pass history_model=<path or model>.")
        return cls(context.history_model, like=context.inner, trainer=context.trainer)

    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**inputs, fused_lm_head=True).log_probs
