"""Set-ups ssToken cannot run correctly, refused when the trainer is built and again at train start.

Each check raises on every process at the same point, before any forward: a refused multi-process run stops
at once instead of failing at the first step or waiting forever at a barrier.
- torch.compile (`torch_compile=True`, or a compiled model or module): the scoring hook and the selective
  forward run Python code inside the model's forward, and a compiled forward does not run it as written (the
  first step fails with "the hooked attention layer did not run").
- history="cache" with parameters sharded by FSDP or DeepSpeed ZeRO-3: the cache is built by one no-grad pass
  on the main process while the others wait, but a sharded forward needs every process; the cache's base-model
  fingerprint also reads whole weights.
- history="ema" / "snapshot" under DeepSpeed: ZeRO-3 keeps no whole parameter on any process, and a whole fp32
  copy of the trained weights on every process would take the memory the refusal names; ZeRO-1/2 are not tested.
  Under FSDP2 the averaged weights are sharded like the parameters (history/ema.py), but only the main process
  writes the history state into a checkpoint, so a sharded EMA is refused when the run saves checkpoints.
- any history source but "base" under FSDP1: only FSDP2 is supported for them (history/model.py shards the
  history model per layer with FSDP2).
A history model under ZeRO-3 is given its own DeepSpeed engine, and one loaded partitioned outside an engine is
refused, by history/model.py when it is built.
"""

from __future__ import annotations

from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from sstoken_trl.config import SSTokenConfig


def is_compiled(model: nn.Module) -> bool:
    """True if the model, or any module inside it, is a torch.compile wrapper."""
    return any(isinstance(m, OptimizedModule) for m in model.modules())


def check_not_compiled(trainer: Trainer) -> None:
    """Raise if the trainer compiles the model, or was given a compiled one."""
    compiled = [m for m in (trainer.model, getattr(trainer, "model_wrapped", None)) if isinstance(m, nn.Module)]
    if trainer.args.torch_compile or any(is_compiled(m) for m in compiled):
        raise ValueError(
            "ssToken does not support torch.compile: its scoring hook and selective forward run inside the model's "
            "forward, which a compiled forward does not run as written. Set torch_compile=False (recipe key "
            "`torch_compile: false`, flag `--torch_compile false`) and pass an uncompiled model."
        )


def zero3(trainer: Trainer) -> bool:
    """True under DeepSpeed ZeRO-3: accelerate's plugin says so, or a ZeRO-3 config is registered in transformers
    (TrainingArguments registers it; from_pretrained then partitions every model it loads)."""
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool((deepspeed is not None and deepspeed.zero_stage == 3) or is_deepspeed_zero3_enabled())


def shards_parameters(trainer: Trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where a forward needs every process."""
    return bool(trainer.is_fsdp_enabled or zero3(trainer))


def trainable_numel(model: nn.Module) -> int:
    """Number of trainable values, counted whole also where ZeRO-3 partitioned them (`ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def check_averaged_history(trainer: Trainer, config: SSTokenConfig) -> None:
    """Raise for history='ema' / 'snapshot' where their weights cannot be kept (see the module docstring)."""
    source = config.history
    if source not in ("ema", "snapshot"):
        return
    if trainer.is_deepspeed_enabled or zero3(trainer):
        numel = trainable_numel(trainer.model)
        raise ValueError(
            f"history={source!r} is not supported with DeepSpeed. Under ZeRO-3 no process holds the whole trained "
            f"weights, and a whole fp32 copy of the {numel:,} trainable values on every process would take "
            f"{4 * numel / 2**20:,.1f} MiB there (ZeRO-1/2 are not tested). Train with FSDP2 (the averaged weights "
            "are then sharded like the parameters), or DDP, or use history='base'."
        )
    if trainer.is_fsdp_enabled and trainer.args.save_strategy != "no":
        raise ValueError(
            f"history={source!r} under FSDP keeps its averaged weights sharded like the parameters, and saving "
            "them into checkpoints is not supported (only the main process writes the history state). Set "
            "save_strategy='no' (recipe key `save_strategy: no`), or train with DDP, or use history='base'."
        )


def check_fsdp_version(trainer: Trainer, config: SSTokenConfig) -> None:
    """Raise for a history source other than 'base' under FSDP1."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and getattr(plugin, "fsdp_version", None) == 1 and config.history != "base":
        raise ValueError(
            f"history={config.history!r} under FSDP1 is not supported: set fsdp_version: 2 in the accelerate "
            "config (recipes/accelerate/fsdp-8gpu.yaml does), or use history='base'."
        )


def check_history_sharding(trainer: Trainer, config: SSTokenConfig) -> None:
    """Raise for history='cache' under FSDP / ZeRO-3 (see the module docstring)."""
    if config.history == "cache" and shards_parameters(trainer):
        raise ValueError(
            "history='cache' is not supported with parameters sharded by FSDP or DeepSpeed ZeRO-3: the cache is "
            "built by a forward pass on the main process alone, and a sharded forward needs every process (the "
            "run would hang). Use history='base' (the same base-model losses, computed online by every process), "
            "or train with DDP / ZeRO-1 / ZeRO-2."
        )


def check_runtime(trainer: Trainer, config: SSTokenConfig) -> None:
    """Every check of this module."""
    check_not_compiled(trainer)
    check_history_sharding(trainer, config)
    check_averaged_history(trainer, config)
    check_fsdp_version(trainer, config)
