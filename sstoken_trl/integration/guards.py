"""Set-ups ssToken cannot run correctly, refused when the trainer is built and again at train start.

Each check raises on every process at the same point, before any forward: a refused multi-process run stops
at once instead of failing at the first step or waiting forever at a barrier.
- torch.compile (`torch_compile=True`, or a compiled model or module): the scoring hook and the selective
  forward run Python code inside the model's forward, and a compiled forward does not run it as written (the
  first step fails with "the hooked attention layer did not run").
- history="cache" with parameters sharded by FSDP or DeepSpeed ZeRO-3: the cache is built by one no-grad pass
  on the main process while the others wait, but a sharded forward needs every process; the cache's base-model
  fingerprint also reads whole weights.
"""

from __future__ import annotations

from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from transformers import Trainer

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


def shards_parameters(trainer: Trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where a forward needs every process."""
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(trainer.is_fsdp_enabled or (deepspeed is not None and deepspeed.zero_stage == 3))


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
