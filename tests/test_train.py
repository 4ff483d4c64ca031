"""SSTokenCallback inside an unmodified SFTTrainer: the tokens that get gradient, the loss, the logs."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tools.tiny import build_model
from tests.conftest import cpu_sft_args, prompt_completion_rows
from tests.reference import prompt_attention, reference_select, token_log_probs


class Probe(TrainerCallback):
    """Records each training micro-batch and which target positions received gradient through log-probs."""

    def __init__(self, sstoken: SSTokenCallback) -> None:
        self.sstoken = sstoken
        self.batches: list[dict] = []
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        step = self.sstoken.selective_forward
        fused = step.forward

        def probed(*a, **kw):
            out = fused(*a, **kw)
            if out.log_probs.requires_grad:
                record = {
                    k: kw[k].clone() for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in kw
                }
                self.batches.append(record)
                out.log_probs.register_hook(lambda g: record.__setitem__("grad", g.clone()))
            return out

        step.forward = probed

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def make_trainer(
    tokenizer, model_type="llama", rows=None, callbacks=(), trainer_cls=SFTTrainer, lora=None, eval_rows=None, **args
):
    rows = rows if rows is not None else prompt_completion_rows(16)
    config = cpu_sft_args(
        **(
            {
                "gradient_accumulation_steps": 2,
                "weight_decay": 0.0,
                "max_grad_norm": 0.0,
                "data_seed": 0,
                "disable_tqdm": False,
            }
            | args
        )
    )
    lora = lora or LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    return trainer_cls(
        model=build_model(model_type, len(tokenizer)),
        args=SFTConfig(**config),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=list(callbacks),
    )


def reference_keep(model, batch, config: SSTokenConfig):
    """Independent selection at the model's current weights: eager attention maps, full-logit log-probs, a loop."""
    base = model.get_base_model()
    base.set_attn_implementation("eager")
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        cur = model(**inputs, output_attentions=True, use_cache=False)
        with model.disable_adapter():
            his = model(**inputs, use_cache=False)
    base.set_attn_implementation("sdpa")
    rel_values = token_log_probs(cur.logits, batch["input_ids"]) - token_log_probs(his.logits, batch["input_ids"])
    layer = config.layer_index(len(cur.attentions))
    attn = prompt_attention(cur.attentions[layer], batch["labels"], batch["attention_mask"])[:, 1:]
    response = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    return reference_select(rel_values, attn, response, config.gamma, config.select_ratio), rel_values


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_gradient_flows_exactly_through_reference_selection(tokenizer, model_type):
    config = SSTokenConfig(select_ratio=0.6, gamma=0.5)
    sstoken = SSTokenCallback(config)
    probe = Probe(sstoken)
    trainer = make_trainer(tokenizer, model_type, callbacks=[sstoken, probe])
    trainer.train()
    assert len(probe.batches) == 4  # 2 steps x 2 accumulated micro-batches
    for batch in probe.batches:
        expected, rel_values = reference_keep(trainer.model, batch, config)
        assert rel_values.abs().max() > 1e-3  # the adapters make current and history differ
        assert torch.equal(batch["grad"] != 0, expected)


def test_loss_and_gradients_equal_reference_under_accumulation(tokenizer):
    sstoken = SSTokenCallback(SSTokenConfig(select_ratio=0.5, gamma=0.5))
    probe = Probe(sstoken)
    trainer = make_trainer(tokenizer, callbacks=[sstoken, probe], max_steps=1, gradient_accumulation_steps=3)
    trainer.train()
    assert len(probe.batches) == 3
    model = trainer.model
    model.train()
    model.zero_grad()
    # Reference: mean NLL over every kept token of the accumulation window, computed from full logits.
    keeps = [b["grad"] != 0 for b in probe.batches]
    total_kept = sum(int(k.sum()) for k in keeps)
    loss = 0.0
    for batch, keep in zip(probe.batches, keeps, strict=True):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logp = token_log_probs(out.logits, batch["input_ids"])
        loss = loss + -(logp * keep).sum() / total_kept
    loss.backward()
    assert total_kept == sum(int(torch.ceil(0.5 * (b["labels"][:, 1:] != -100).sum(1)).sum()) for b in probe.batches)
    logged = trainer.state.log_history[0]["loss"]
    assert abs(logged - loss.item()) < 1e-5
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(probe.grads[name], param.grad, atol=1e-5, rtol=1e-4)


def test_logs_carry_selection_statistics_and_trl_metrics(tokenizer):
    sstoken = SSTokenCallback(SSTokenConfig(select_ratio=0.6))
    trainer = make_trainer(tokenizer, callbacks=[sstoken], learning_rate=1e-3)
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        assert key in logs
    assert 0.6 <= logs["sstoken/selected_fraction"] < 0.8  # ceil(0.6 n) of short responses
    assert logs["sstoken/attn_score_mean"] > 0
    assert 0 <= logs["sstoken/kept_by_attention_fraction"] <= 1
    selection = sstoken.last_selection
    assert torch.equal(selection.keep.sum(1), torch.ceil(0.6 * selection.response.sum(1) - 1e-9).long())
    assert not (selection.keep & ~selection.response).any()


def test_scoring_runs_once_per_training_forward_with_gradient_checkpointing(tokenizer):
    sstoken = SSTokenCallback()
    calls = []

    class CountScoring(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            hook = sstoken.selective_forward.hook
            score_fn = hook.score_fn
            hook.score_fn = lambda *a: calls.append(1) or score_fn(*a)

    trainer = make_trainer(tokenizer, callbacks=[sstoken, CountScoring()], gradient_checkpointing=True)
    assert trainer.args.gradient_checkpointing
    trainer.train()
    assert len(calls) == 4  # 4 micro-batches, not 8 (the recompute in backward does not score)


def test_training_leaves_the_models_fast_attention_and_cleans_up(tokenizer):
    sstoken = SSTokenCallback()
    trainer = make_trainer(tokenizer, callbacks=[sstoken])
    inner = trainer.model.get_base_model()
    fused_forward = inner.forward
    trainer.train()
    assert inner.config._attn_implementation == "sdpa"
    assert inner.forward == fused_forward  # TRL's fused head is back
    assert not any(m._forward_pre_hooks for m in inner.modules())
    batch = next(iter(trainer.get_train_dataloader()))
    assert "sstoken_labels" not in batch


def test_bf16_training(tokenizer):
    sstoken = SSTokenCallback()
    trainer = make_trainer(tokenizer, callbacks=[sstoken], bf16=True, learning_rate=1e-3)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert sstoken.last_selection.keep.any()


def test_conversational_dataset(tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in prompt_completion_rows(16)
    ]
    sstoken = SSTokenCallback()
    probe = Probe(sstoken)
    trainer = make_trainer(tokenizer, rows=rows, callbacks=[sstoken, probe], assistant_only_loss=True)
    trainer.train()
    for batch in probe.batches:
        response = batch["labels"][:, 1:] != -100
        kept = batch["grad"] != 0
        assert not (kept & ~response).any()
        assert torch.equal(kept.sum(1), torch.ceil(0.6 * response.sum(1) - 1e-9).long())
        assert ((batch["labels"] == -100) & batch["attention_mask"].bool()).sum(1).min() >= 3  # prompt present


def test_users_own_trainer_subclass(tokenizer):
    class MyTrainer(SFTTrainer):
        seen = 0

        def compute_loss(self, model, inputs, *a, **kw):
            MyTrainer.seen += 1
            return super().compute_loss(model, inputs, *a, **kw)

    sstoken = SSTokenCallback()
    trainer = make_trainer(tokenizer, callbacks=[sstoken], trainer_cls=MyTrainer)
    trainer.train()
    assert MyTrainer.seen == 4 and sstoken.last_selection is not None


def test_unknown_loss_paths_are_refused(tokenizer):
    with pytest.raises(ValueError, match="compute_loss_func"):
        SFTTrainer(
            model=build_model("llama", len(tokenizer)),
            args=SFTConfig(output_dir="/tmp/sstoken-test-out", report_to=[], use_cpu=True),
            train_dataset=Dataset.from_list(prompt_completion_rows(4)),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
            callbacks=[SSTokenCallback()],
        )

    class PlainLoss(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss  # no fused LM head: plain SFT

    trainer = make_trainer(tokenizer, callbacks=[SSTokenCallback()], trainer_cls=PlainLoss)
    with pytest.raises(RuntimeError, match="refuses to train plain SFT"):
        trainer.train()


def test_history_base_without_peft_is_refused(tokenizer):
    trainer = SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(output_dir="/tmp/sstoken-test-out", max_steps=1, report_to=[], use_cpu=True),
        train_dataset=Dataset.from_list(prompt_completion_rows(4)),
        processing_class=tokenizer,
        callbacks=[SSTokenCallback()],
    )
    with pytest.raises(ValueError, match="has none"):
        trainer.train()


def test_padding_free_documents_are_selected_as_separate_samples(tokenizer):
    config = SSTokenConfig(select_ratio=0.6, gamma=0.5)
    sstoken = SSTokenCallback(config)
    probe = Probe(sstoken)
    trainer = make_trainer(tokenizer, callbacks=[sstoken, probe], padding_free=True, max_length=None, max_steps=1)
    trainer.train()
    for batch in probe.batches:
        assert "attention_mask" not in batch and batch["input_ids"].size(0) == 1
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].size(1)]
        docs = list(zip(starts[:-1], starts[1:], strict=True))
        assert len(docs) == 4
        # Reference: every document as its own right-padded row, through eager attention and full logits.
        width = max(e - s for s, e in docs)
        rows = {"input_ids": torch.zeros(len(docs), width, dtype=torch.long)}
        rows["attention_mask"] = torch.zeros(len(docs), width, dtype=torch.long)
        rows["labels"] = torch.full((len(docs), width), -100)
        for i, (s, e) in enumerate(docs):
            rows["input_ids"][i, : e - s] = batch["input_ids"][0, s:e]
            rows["attention_mask"][i, : e - s] = 1
            rows["labels"][i, : e - s] = batch["labels"][0, s:e]
        expected, _ = reference_keep(trainer.model, rows, config)
        got = batch["grad"] != 0
        for i, (s, e) in enumerate(docs):
            assert torch.equal(got[0, s : e - 1], expected[i, : e - s - 1])
            if e - 1 < got.size(1):
                assert not got[0, e - 1]  # the position that would predict the next document's first token


def template_rows(n: int) -> list[dict[str, str]]:
    """Two-turn samples in the <|User|>/<|Assistant|> template."""
    rows = prompt_completion_rows(n, seed=4)
    turn = "<|User|>{prompt}<|Assistant|>{completion}"
    return [{"text": turn.format(**a) + turn.format(**b)} for a, b in zip(rows[::2], rows[1::2], strict=True)]


def test_template_data_with_the_collator_selects_only_inside_assistant_turns(tokenizer):
    from sstoken_trl import SSTokenCollator

    rows = template_rows(32)
    rows[3] = {"text": "<|User|>a question with no answer at all"}
    collator = SSTokenCollator(tokenizer, on_bad_sample="skip")
    sstoken = SSTokenCallback()
    probe = Probe(sstoken)
    args = dict(output_dir="/tmp/sstoken-test-out", max_steps=2, per_device_train_batch_size=4, report_to=[])
    trainer = SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(
            **args, use_cpu=True, bf16=False, logging_steps=2, dataset_text_field="text", shuffle_dataset=False
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=LoraConfig(r=8, target_modules="all-linear"),
        callbacks=[sstoken, probe],
    )
    trainer.train()
    assistant = tokenizer.convert_tokens_to_ids("<|Assistant|>")
    user = tokenizer.convert_tokens_to_ids("<|User|>")
    for batch in probe.batches:
        kept = batch["grad"] != 0
        for row in range(kept.size(0)):
            inside, allowed = False, []
            for token in batch["input_ids"][row, 1:].tolist():  # target t scores token t + 1
                inside = (inside or token == assistant) and token != user
                allowed.append(inside and token not in (assistant, 0))
            assert not (kept[row] & ~torch.tensor(allowed)).any()
    logs = trainer.state.log_history[0]
    assert logs["sstoken/skipped_no_assistant"] == 1


def test_rel_warmup_uses_attention_alone_and_skips_the_history_forward(tokenizer):
    sstoken = SSTokenCallback(SSTokenConfig(rel_warmup_steps=1))
    history_calls = []

    class CountHistory(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            history = sstoken.history
            log_probs = history.log_probs
            history.log_probs = lambda *a: history_calls.append(state.global_step) or log_probs(*a)

        def on_step_end(self, args, state, control, **kwargs):
            selection = sstoken.last_selection
            if state.global_step == 1:  # warm-up step: no REL, the score is the attention score
                assert not selection.rel.any()
                torch.testing.assert_close(
                    selection.score[selection.response], selection.attn_score[selection.response]
                )
            else:
                assert selection.rel[selection.response].abs().max() > 0

    trainer = make_trainer(tokenizer, callbacks=[sstoken, CountHistory()])
    trainer.train()
    assert history_calls == [1, 1]  # only the second step's two micro-batches ran the history forward


def test_evaluation_during_training_measures_every_response_token(tokenizer):
    rows = prompt_completion_rows(8, seed=7)
    plain = make_trainer(tokenizer, rows=rows)
    expected = plain.evaluate(plain.train_dataset)["eval_loss"]
    sstoken = SSTokenCallback()
    trainer = make_trainer(
        tokenizer, rows=rows, eval_rows=rows, callbacks=[sstoken], eval_strategy="steps", eval_steps=1
    )
    trainer.train()  # lr 0: the weights stay those of `plain`
    evals = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert len(evals) == 2
    for value in evals:
        assert abs(value - expected) < 1e-6


def test_reentered_train_loop_wraps_and_hooks_once(tokenizer, monkeypatch):
    """auto_find_batch_size re-enters the training loop after an OOM without on_train_end: simulate it."""
    import sstoken_trl.integration.callback as callback_module

    checks = []
    real_check = callback_module.check_loss_path
    monkeypatch.setattr(callback_module, "check_loss_path", lambda t: checks.append(t) or real_check(t))
    sstoken = SSTokenCallback()
    trainer = make_trainer(tokenizer, callbacks=[sstoken])
    inner = trainer.model.get_base_model()
    fused_forward = inner.forward
    loop = trainer._inner_training_loop
    entries = []

    def flaky_loop(*args, **kwargs):
        entries.append(1)
        if len(entries) == 1:
            control = trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
            trainer.control = control
            raise torch.cuda.OutOfMemoryError("simulated")
        return loop(*args, **kwargs)

    trainer.callback_handler.train_dataloader = trainer.get_train_dataloader()
    trainer._inner_training_loop = flaky_loop
    with pytest.raises(torch.cuda.OutOfMemoryError):
        trainer.train()
    # The first start left its wrapping in place (no on_train_end); the next start must not stack on it.
    trainer._inner_training_loop = loop
    trainer.train()
    assert sstoken.selective_forward.forward == fused_forward  # wrapped exactly once
    assert inner.forward == fused_forward and not any(m._forward_pre_hooks for m in inner.modules())
    assert len(checks) == 1  # the loss path is checked once, when the trainer is found


def test_callback_given_the_trainer_after_construction(tokenizer):
    trainer = make_trainer(tokenizer)
    sstoken = SSTokenCallback(SSTokenConfig(), trainer=trainer)
    trainer.add_callback(sstoken)
    trainer.train()
    assert sstoken.trainer is trainer and sstoken.last_selection is not None
    logged = [e for e in trainer.state.log_history if "sstoken/selected_fraction" in e]
    assert logged and logged[-1]["sstoken/selected_fraction"] == pytest.approx(0.6, abs=0.15)
