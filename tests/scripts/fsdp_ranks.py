"""ssToken's own pieces on a tiny PEFT LLaMA sharded by torch FSDP2, and on an unsharded copy, over one global batch.

Run as `python -m torch.distributed.run --nproc_per_node 2 fsdp_ranks.py OUT`. Every rank builds the same two
models: one kept whole (the reference, run on the whole global batch, as one process would), and one sharded with
`fully_shard` per decoder layer and at the root (a CPU device mesh over gloo), run on this rank's half of the
batch. Both go through the scoring hook, the selective forward and a history source built by the project's
registry, for every case (history base / ema / snapshot / model, gamma 0 / 0.5 / 1, padded / packed rows).
Each rank writes OUT-rank{r}.pt: per case, what each model selected per sample (keyed by its token ids), the
global loss and the full LoRA gradients of both, and what the scored layer's weights were when the score ran.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from sstoken_trl import SSTokenConfig
from sstoken_trl.history import EMAHistory, HistoryContext, SnapshotHistory, build_history
from sstoken_trl.history.model import shard_fsdp2
from sstoken_trl.integration.selective_forward import SelectiveForward
from sstoken_trl.scoring.hook import hook_scoring_layer
from sstoken_trl.selection.budget import SelectionBudget
from sstoken_trl.selection.selectors import budget_ratio
from sstoken_trl.tools.tiny import build_model, build_tokenizer
from sstoken_trl.trl_internals import DataCollatorForLanguageModeling, add_fused_lm_head, fused_model
from tests.conftest import prompt_completion_rows

GLOBAL_BATCH = 8
HISTORIES = ("base", "ema", "snapshot", "model")
GAMMAS = (0.0, 0.5, 1.0)
LAYOUTS = ("padded", "packed")
DTYPE = torch.float64  # sharded and whole models then agree to ~1e-15, far from any near-tie in the ranking


def samples(tokenizer: Any) -> list[dict[str, list[int]]]:
    out = []
    for r in prompt_completion_rows(GLOBAL_BATCH, seed=5):
        prompt = tokenizer(r["prompt"])["input_ids"]
        completion = tokenizer(r["completion"])["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return out


def peft_model(vocab: int) -> torch.nn.Module:
    model = build_model("llama", vocab, seed=0).to(DTYPE)
    add_fused_lm_head(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, lora)


def history_model(vocab: int) -> torch.nn.Module:
    return build_model("llama", vocab, seed=7).to(DTYPE)


class Driven:
    """One model driven as SSTokenCallback drives the trainer's: hook, selective forward, history source."""

    def __init__(self, model: torch.nn.Module, config: SSTokenConfig, history: str, his_model: Any) -> None:
        self.model, self.inner = model, fused_model(model)
        self.fused_forward = self.inner.forward
        self.hook = hook_scoring_layer(self.inner, config)
        context = HistoryContext(config, model, self.inner, self.fused_forward, his_model)
        if history == "ema":  # built as EMAHistory.from_context builds it, without a trainer
            self.history = EMAHistory.build(model, config, max_steps=10)
        elif history == "snapshot":
            self.history = SnapshotHistory.build(model, config, max_steps=10)
        else:
            self.history = build_history(context)
        self.selective = SelectiveForward(self.fused_forward, config, self.hook, self.history, 10, 0)
        self.inner.forward = self.selective
        self.config = config

    def set_gamma(self, gamma: float) -> None:
        self.config.gamma = gamma

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(**batch, fused_lm_head=True, use_cache=False)


def collate(rows: list[dict], layout: str, config: SSTokenConfig, step: int) -> dict[str, Any]:
    """A batch as the trainer hands it to optimizer step `step` (0-based): collated, then marked for its step."""
    base = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=layout == "packed")
    budget = SelectionBudget(base, budget_ratio(config), config.scope, config.select_warmup(10))
    batch = budget(rows)
    budget.mark_step([batch], step)
    return batch


def per_sample(selection: Any) -> dict[str, dict[str, list]]:
    """Kept target positions, REL and AttnScore of each sample (document of a row), by its token ids."""
    out = {}
    for row in range(selection.input_ids.size(0)):
        real, doc = selection.real[row], selection.doc[row]
        for d in doc[real].unique().tolist():
            pos = torch.nonzero(real & (doc == d)).flatten()
            start, end = int(pos[0]), int(pos[-1]) + 1
            key = " ".join(map(str, selection.input_ids[row, start:end].tolist()))
            span = slice(start, end - 1)  # target positions of the sample: t predicts token t + 1
            out[key] = {
                "kept": torch.nonzero(selection.keep[row, span]).flatten().tolist(),
                "rel": selection.rel[row, span].tolist(),
                "attn_score": selection.attn_score[row, span].tolist(),
            }
    return out


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = g.detach().clone()
    return grads


def kept_loss(out: Any, kept_global: torch.Tensor, world: int) -> torch.Tensor:
    """TRL's loss on the masked fused output: summed NLL of kept tokens over the global kept count, times the
    number of processes (the trainer's scaling, which FSDP's gradient averaging undoes)."""
    return -out.log_probs.sum() / kept_global * world


def train_step(driven: Driven, batch: dict[str, Any], world: int, lr: float) -> None:
    """One SGD step on every label (plain SFT loss), then the history source's after-optimizer-step hook."""
    plain = {k: v for k, v in batch.items() if not k.startswith("sstoken_")}
    out = driven.model(**plain, fused_lm_head=True, use_cache=False)
    count = out.label_mask.sum().to(DTYPE)
    if world > 1:
        dist.all_reduce(count)
    (-out.log_probs.sum() / count * world).backward()
    with torch.no_grad():
        for p in driven.model.parameters():
            if p.requires_grad:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


def run_case(driven: Driven, batch: dict[str, Any], world: int) -> dict[str, Any]:
    for p in driven.model.parameters():
        p.grad = None
    out = driven.forward(batch)
    kept = out.label_mask.sum().to(DTYPE)
    if world > 1:
        dist.all_reduce(kept)
    loss = kept_loss(out, kept, world)
    loss.backward()
    total = loss.detach().clone()
    if world > 1:
        dist.all_reduce(total)
    return {
        "samples": per_sample(driven.selective.last),
        "loss": float(total) / world,
        "grads": lora_grads(driven.model),
    }


def watch_gathering(hook: Any, record: list) -> None:
    """Wrap the hook's score function: note, when the score runs, what the scored layer's q weight is."""
    score_fn = hook.score_fn

    def watched(call: Any, layout: Any) -> torch.Tensor:
        weight = hook.attn_module.q_proj.base_layer.weight
        record.append({"dtensor": isinstance(weight, DTensor), "shape": list(weight.shape)})
        return score_fn(call, layout)

    hook.score_fn = watched


def ema_with_trained_root_weights(vocab: int, mesh: Any) -> str:
    """The refusal of an EMA whose trained weights include one FSDP gathers with the root (the embeddings)."""
    model = build_model("llama", vocab, seed=0).to(DTYPE)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    model = get_peft_model(model, lora)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        EMAHistory(model, alpha=0.9, update_steps=1)
    except ValueError as err:
        return str(err)
    return "not refused"


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in prompt_completion_rows(200, seed=1)], 300)
    rows = samples(tokenizer)
    mine = rows[rank * GLOBAL_BATCH // world : (rank + 1) * GLOBAL_BATCH // world]
    vocab = len(tokenizer)
    results: dict[str, Any] = {"cases": {}}
    for history in HISTORIES:
        ema = {"ema_alpha": 0.5} if history == "ema" else {}  # a setting only the EMA history reads
        config = SSTokenConfig(history=history, select_ratio=0.6, select_warmup_ratio=0.1, **ema)
        whole, sharded = peft_model(vocab), peft_model(vocab)
        for layer in sharded.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        his_whole = his_sharded = None
        if history == "model":
            his_whole = history_model(vocab)
            his_sharded = shard_fsdp2(history_model(vocab), mesh=mesh)
            results["history_model_sharded"] = all(isinstance(p, DTensor) for p in his_sharded.parameters())
        ref = Driven(whole, copy.deepcopy(config), history, his_whole)
        shd = Driven(sharded, copy.deepcopy(config), history, his_sharded)
        gathered: list = []
        watch_gathering(shd.hook, gathered)
        # Two SGD steps, so that EMA and snapshot differ from the current weights (snapshot: after step 1).
        for step in (1, 2):
            ref_batch, shd_batch = collate(rows, "padded", config, step - 1), collate(mine, "padded", config, step - 1)
            train_step(ref, ref_batch, 1, lr=0.5)
            train_step(shd, shd_batch, world, lr=0.5)
            for d in (ref, shd):
                d.history.after_optimizer_step(step)
                d.selective.global_step = step
        weight = shd.hook.attn_module.q_proj.base_layer.weight
        results["between_forwards"] = {"dtensor": isinstance(weight, DTensor), "local": list(weight.to_local().shape)}
        for gamma in GAMMAS:
            for layout in LAYOUTS:
                for d in (ref, shd):
                    d.set_gamma(gamma)
                before = len(gathered)
                one = run_case(ref, collate(rows, layout, config, 2), 1)
                part = run_case(shd, collate(mine, layout, config, 2), world)
                results["cases"][f"{history}, gamma {gamma}, {layout}"] = {
                    "whole": one,
                    "sharded": part,
                    "gathered": gathered[before:],
                }
    results["root_weights_refusal"] = ema_with_trained_root_weights(vocab, mesh)
    torch.save(results, f"{out}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
