"""QLoRA: 4-bit nf4 base via bitsandbytes, LoRA adapters, history = adapters disabled over the same quantised base.

bitsandbytes runs on CPU, slowly: the model is tiny and two optimizer steps are enough to check the wiring.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.history import BaseHistory
from sstoken_trl.tools.tiny import build_model
from tests.conftest import prompt_completion_rows
from tests.reference import token_log_probs

bnb = pytest.importorskip("bitsandbytes")

NF4 = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)


def load_4bit(path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NF4, device_map="cpu", dtype=torch.float32)


def test_qlora_trains_and_base_history_is_the_quantised_base(tokenizer, tmp_path):
    build_model("llama", len(tokenizer)).save_pretrained(tmp_path / "base")
    model = load_4bit(tmp_path / "base")
    assert model.is_loaded_in_4bit
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7  # q k v o gate up down, 2 layers
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    sstoken = SSTokenCallback(SSTokenConfig(select_ratio=0.6))
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=5e-2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        callbacks=[sstoken],
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logs["loss"])) and 0.6 <= logs["sstoken/selected_fraction"] < 0.8
    assert isinstance(sstoken.history, BaseHistory)

    last = sstoken.last_selection
    inputs = {"input_ids": last.input_ids, "attention_mask": (last.input_ids != tokenizer.pad_token_id).long()}
    response = last.response
    # Both sides in eval mode: on CPU, bitsandbytes repacks a 4-bit weight for its bf16 inference kernel the
    # first time the layer runs in eval mode without grad, and that kernel rounds differently (~1e-3).
    trainer.model.eval()
    his = sstoken.history.log_probs(sstoken.selective_forward.forward, {**inputs, "labels": last.labels})
    quantised_base = load_4bit(tmp_path / "base").eval()  # the same nf4 weights, loaded apart, full logits
    with torch.no_grad():
        expected = token_log_probs(quantised_base(**inputs).logits, last.input_ids)
        current = token_log_probs(trainer.model(**inputs).logits, last.input_ids)
        full_precision = token_log_probs(build_model("llama", len(tokenizer))(**inputs).logits, last.input_ids)
    torch.testing.assert_close(his[response], expected[response], atol=1e-5, rtol=0)
    assert (current - expected)[response].abs().max() > 1e-3  # the trained adapters are not the history
    assert (full_precision - expected)[response].abs().max() > 1e-4  # the history is the 4-bit base, not fp32
