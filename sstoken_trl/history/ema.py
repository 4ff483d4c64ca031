"""history="ema": the history model follows the trained weights, theta_his <- alpha * theta_his + (1 - alpha) * theta.

That is the paper's Eq. 4, applied every `update_steps` optimizer steps to the trainable parameters only: with
PEFT the adapters (memory = adapter size), without PEFT every weight (memory = model size in fp32, or host
memory with `on_cpu`). theta_his starts at the weights training starts from and is kept in fp32 whatever the
parameters' dtype: in bf16 an update of (1 - alpha) * (theta - theta_his) is mostly below the rounding step and
would leave theta_his where it started. For a history forward the EMA weights are swapped into the model, in the
parameters' own dtype, under no_grad with dropout off, then swapped back: a pointer swap for fp32 parameters on
the shadow's device, a cast (or a copy in and out from the CPU) otherwise.

Under FSDP2 each process averages the shard of every parameter it holds (the DTensor's local tensor): theta_his
is sharded as the parameters are and costs 1 / world size of a whole copy. Its weights are copied into those
shards in place for a history forward (a pointer swap would leave FSDP gathering its own storage), so each
layer's all-gather hands the layer theta_his. That needs every trained weight inside a module sharded on its own
(a decoder layer): the root module's weights are gathered once for the whole forward, before the swap, so a
trained weight there (modules_to_save, LoRA on the embeddings) is refused. Checkpointing a sharded theta_his is
refused at train start (`integration/guards.py`): only the main process writes the history state into a
checkpoint. DeepSpeed is refused there too (ZeRO-3 keeps no whole parameter on a process; the refusal names the
memory a whole copy would take).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from sstoken_trl.dropout import dropout_off
from sstoken_trl.history.source import Forward, HistoryContext, HistorySource

if TYPE_CHECKING:
    from sstoken_trl.config import SSTokenConfig

EMA_FILE = "sstoken_ema.safetensors"
FORMAT = "sstoken-ema/1"
SHADOW_DTYPE = torch.float32


def held(p: torch.Tensor) -> torch.Tensor:
    """The values of `p` this process holds: its shard under FSDP2 (a view of FSDP's storage), else `p`."""
    return p.to_local() if isinstance(p, DTensor) else p


def gathered_with_root(model: nn.Module) -> list[str]:
    """Trainable parameters that FSDP2 gathers with the root module: no fully_shard-ed submodule holds them."""
    units = [name + "." for name, m in model.named_modules() if name and isinstance(m, FSDPModule)]
    return [n for n, p in model.named_parameters() if p.requires_grad and not any(map(n.startswith, units))]


class EMAHistory(HistorySource):
    """EMA of the trainable weights of `model` (the trainer's model: a PeftModel or a plain model)."""

    def __init__(self, model: nn.Module, alpha: float, update_steps: int, on_cpu: bool = False) -> None:
        self.model = model
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("history='ema' averages the trained weights, but the model has no trainable parameter.")
        self.alpha, self.update_steps, self.on_cpu = alpha, update_steps, on_cpu
        self.shadow = {
            name: held(p.detach()).to("cpu" if on_cpu else p.device, dtype=SHADOW_DTYPE, copy=True)
            for name, p in self.params.items()
        }
        self.sharded = any(isinstance(p, DTensor) for p in self.params.values())
        outside = gathered_with_root(model) if self.sharded else []
        if outside:
            raise ValueError(
                f"The averaged history (ema / snapshot) under FSDP2 needs every trained weight inside a module sharded "
                f"on its own (a decoder layer), but {', '.join(outside[:3])} are gathered with the root module for "
                "the whole forward, so the averaged weights cannot be swapped in for the history forward. Train "
                "without modules_to_save and without LoRA outside the decoder layers, or use history='base'."
            )
        self.updated_at = 0  # optimizer step of the last update

    @classmethod
    def from_context(cls, context: HistoryContext) -> EMAHistory:
        source = context.config.history  # "ema", or "snapshot" for the subclass
        trainer = context.require_trainer(source)
        max_steps = trainer.state.max_steps if context.max_steps is None else context.max_steps
        history = cls.build(context.model, context.config, max_steps)
        folder = context.resume_folder()
        if folder is not None:
            history.restore(folder)
        return history

    @classmethod
    def build(cls, model: nn.Module, config: SSTokenConfig, max_steps: int) -> EMAHistory:
        return cls(model, config.ema_alpha, config.ema_update_steps, config.ema_on_cpu)

    def numel(self) -> int:
        """Number of averaged values (the adapter size under PEFT)."""
        return sum(t.numel() for t in self.shadow.values())

    @torch.no_grad()
    def after_optimizer_step(self, global_step: int) -> None:
        """Eq. 4 after optimizer step `global_step`, when it is a multiple of `update_steps`."""
        if global_step % self.update_steps:
            return
        for name, p in self.params.items():
            shadow = self.shadow[name]
            shadow.lerp_(held(p.detach()).to(shadow.device, dtype=shadow.dtype), 1.0 - self.alpha)
        self.updated_at = global_step

    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor:
        """log p_his under theta_his, dropout off (LoRA dropout included), no gradients."""
        with torch.no_grad(), dropout_off(self.model), self.swapped_in():
            return forward(**inputs, fused_lm_head=True).log_probs

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model carries theta_his (in its own dtype) inside the block and its own weights again after it."""
        if self.on_cpu or self.sharded:  # copied in and out, in place
            values = {name: held(p.detach()) for name, p in self.params.items()}
            kept = {name: v.to("cpu" if self.on_cpu else v.device, copy=True) for name, v in values.items()}
            for name, v in values.items():
                v.copy_(self.shadow[name])
            try:
                yield
            finally:
                for name, v in values.items():
                    v.copy_(kept[name])
            return
        kept = {name: p.data for name, p in self.params.items()}
        for name, p in self.params.items():
            p.data = self.shadow[name].to(p.dtype)  # the shadow itself when the parameter is fp32
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.data = kept[name]

    def save(self, folder: Path) -> None:
        """Write theta_his into a checkpoint folder (safetensors)."""
        tensors = {name: t.detach().contiguous() for name, t in self.shadow.items()}
        metadata = {"format": FORMAT, "updated_at": str(self.updated_at), "alpha": repr(self.alpha)}
        save_file(tensors, str(Path(folder) / EMA_FILE), metadata=metadata)

    def restore(self, folder: Path) -> None:
        """Restore theta_his from a checkpoint folder written by `save`; raises on a missing or mismatched file."""
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"Resuming with history='ema' from {folder}, which holds no {EMA_FILE}: the checkpoint was not "
                "saved by an ssToken run with history='ema'. Resume from such a checkpoint, or start a new run."
            )
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            updated_at = int((f.metadata() or {}).get("updated_at", 0))
        if set(tensors) != set(self.shadow) or any(tensors[n].shape != t.shape for n, t in self.shadow.items()):
            raise ValueError(
                f"{path} holds EMA weights for other parameters than the model's trainable ones "
                "(different model or PEFT config): it cannot be restored."
            )
        for name, shadow in self.shadow.items():
            shadow.copy_(tensors[name])
        self.updated_at = updated_at
