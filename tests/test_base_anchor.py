"""The base anchor (benchmarks/base_anchor.py): the loss is the trained tokens' NLL plus the weighted mean KL to the
base on the positions not fully trained, checked against a plain computation on the full logits."""

from __future__ import annotations

import argparse
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import SFTTrainer

from benchmarks import base_anchor, noisy_sft, real_sft
from benchmarks.knowledge_task import FactsTask
from sstoken_trl import SSTokenCallback, SSTokenConfig


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return real_sft.tiny_model(tmp_path_factory.mktemp("anchor") / "tiny-llama")


def _trainer(folder, tmp_path, anchor: base_anchor.BaseAnchor) -> tuple[SFTTrainer, object]:
    """A LoRA SFTTrainer on three new-facts rows, its adapters moved off zero, the anchor installed; TRL's forward."""
    model, tokenizer = real_sft.load(folder)
    rows = [s.row() for s in FactsTask(tokenizer).make("new_facts", 3, 0.0, random.Random(0))]
    lora = noisy_sft.lora(argparse.Namespace(lora_r=4, lora_alpha=None))
    args = noisy_sft.sft_args(str(tmp_path), 1, 3, 1e-3, 0)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # off zero: the trained model differs from its base
            param.data.normal_(0.0, 0.2)
    fused = vars(trainer.model.get_base_model())["forward"]  # TRL's fused LM head
    anchor.on_train_begin(args, trainer.state, trainer.control, model=trainer.model)
    assert vars(trainer.model.get_base_model())["forward"] is not fused
    return trainer, fused


def _reference_loss(model, batch, weight: float) -> torch.Tensor:
    """Mean NLL of the response tokens + weight x mean KL(base || current) over the other real positions."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logp = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    with torch.no_grad(), model.disable_adapter():
        logp_base = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    response, real = labels != -100, batch["attention_mask"][:, 1:].bool()
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][response].mean()
    kl = (logp_base.exp() * (logp_base - logp)).sum(-1)[real & ~response]
    assert kl.mean() > 1e-3  # the check has something to see
    return nll + weight * kl.mean()


def test_the_anchored_loss_and_its_gradient_match_the_plain_computation(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(base_anchor, "CHUNK", 7)  # several LM-head chunks per batch
    anchor = base_anchor.BaseAnchor(0.7)
    trainer, fused = _trainer(tiny_folder, tmp_path, anchor)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    params = [p for n, p in model.named_parameters() if "lora_A" in n][:3]
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    reference = _reference_loss(model, batch, 0.7)
    expected = torch.autograd.grad(reference, params)
    assert torch.allclose(loss, reference, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6)
    assert anchor.positions == int(((batch["labels"][:, 1:] == -100) & batch["attention_mask"][:, 1:].bool()).sum())
    anchor.on_train_end(trainer.args, trainer.state, trainer.control)
    assert vars(model.get_base_model())["forward"] is fused  # TRL's fused head back in place


def test_the_responses_left_out_or_weighed_below_one_are_anchored_too():
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8]])
    trained = torch.tensor([[False, True, True, False, True]])  # target positions: 1..4 are the response
    weight = torch.tensor([[1.0, 1.0, 0.5, 1.0, 1.0]])
    selection = SimpleNamespace(last_selection=SimpleNamespace(weight=weight))
    mask = base_anchor.BaseAnchor(1.0, selection)._anchored(labels, torch.ones(1, 6, dtype=torch.long), trained)
    assert mask.tolist() == [[True, False, True, True, False]]  # prompt, halved, left out
    prompt = base_anchor.BaseAnchor(1.0, selection, prompt_only=True)._anchored(labels, torch.ones(1, 6), trained)
    assert prompt.tolist() == [[True, False, False, False, False]]  # the responses free, whatever was selected
    with pytest.raises(ValueError, match="anchor_weight"):
        base_anchor.BaseAnchor(0.0)
    with pytest.raises(ValueError, match="PEFT model"):
        base_anchor.BaseAnchor(1.0).on_train_begin(None, None, None, model=torch.nn.Linear(2, 2))


def test_a_run_with_the_selection_anchors_and_leaves_trl_forward_in_place(tiny_folder, tmp_path):
    model, tokenizer = real_sft.load(tiny_folder)
    rows = [s.row() for s in FactsTask(tokenizer).make("new_facts", 8, 0.0, random.Random(0))]
    sstoken = SSTokenCallback(SSTokenConfig.recommended(select_warmup_ratio=0.0))
    anchor = base_anchor.BaseAnchor(1.0, sstoken)
    lora = noisy_sft.lora(argparse.Namespace(lora_r=4, lora_alpha=None))
    args = noisy_sft.sft_args(str(tmp_path), 2, 4, 1e-3, 0)
    trainer = noisy_sft.train(model, rows, args, tokenizer, peft_config=lora, callbacks=[sstoken, anchor])
    inner = trainer.model.get_base_model()
    assert anchor.positions > 0 and sstoken.last_selection is not None
    assert getattr(vars(inner)["forward"], "__wrapped__", None) is type(inner).forward  # TRL's fused head, no wrapper


def test_the_general_rows_term_matches_the_plain_kl_and_leaves_the_task_free(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(base_anchor, "CHUNK", 5)
    general = [[3, 9, 4, 12, 7, 8], [5, 6, 11], [2, 14, 9, 9]]
    anchor = base_anchor.BaseAnchor(0.4, general=general, general_batch=2, on_task=False, seed=1)
    trainer, _ = _trainer(tiny_folder, tmp_path, anchor)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    rng = random.Random(1)
    first, second = rng.sample(range(3), 3), rng.sample(range(3), 3)  # each pass's order
    order = first[:2]  # the rows the first step draws
    params = [p for n, p in model.named_parameters() if "lora_A" in n][:3]
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"][:, 1:]
    logp = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][labels != -100].mean()
    kls = []
    for index in order:  # one row at a time, no padding: the KL at each of its next-token positions
        ids = torch.tensor([general[index]])
        cur = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        with torch.no_grad(), model.disable_adapter():
            base = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        kls.append((base.exp() * (base - cur)).sum(-1))
    kl = torch.cat(kls).mean()
    assert kl > 1e-3
    reference = nll + 0.4 * kl
    assert torch.allclose(loss, reference, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(reference, params), strict=True):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6)
    assert anchor.positions == anchor.general_positions == sum(len(general[i]) - 1 for i in order)
    trainer.compute_loss(model, batch)  # the second step: the pass's last row, then the next pass's first
    assert anchor.general_positions == sum(len(r) - 1 for r in general) + len(general[second[0]]) - 1


def test_the_general_rows_are_checked():
    with pytest.raises(ValueError, match="general_batch"):
        base_anchor.BaseAnchor(1.0, general=[[1, 2]], general_batch=2)
    with pytest.raises(ValueError, match="on_task=False"):
        base_anchor.BaseAnchor(1.0, on_task=False)
