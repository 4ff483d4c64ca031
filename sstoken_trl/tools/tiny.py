"""Tiny random-initialised models and an offline tokenizer, for the demo, tests and benchmarks.

Nothing here downloads: the tokenizer is trained with `tokenizers` on text we pass in, and models are built
from a config. Save them with `save_pretrained` and load them back through the ordinary loading code.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from sstoken_trl.data.spans import ASSISTANT_TAG, USER_TAG

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", USER_TAG, ASSISTANT_TAG]

# A chat template whose assistant turns are wrapped in generation markers, so that TRL's assistant-only loss
# (`return_assistant_tokens_mask`) works with it. Each turn renders as the <|User|>/<|Assistant|> template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|User|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|Assistant|>' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>' }}{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with <pad>, <s>, </s> and the two template tags."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[USER_TAG, ASSISTANT_TAG],
        chat_template=CHAT_TEMPLATE,
    )


# Shapes small enough for CPU tests; GQA on (4 query heads over 2 key/value heads).
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def build_model(
    model_type: str,
    vocab_size: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **shape: int,
) -> PreTrainedModel:
    """A random-initialised causal LM of the given family (llama, mistral, qwen2, qwen3), seeded."""
    kwargs = {**TINY_SHAPE, **shape}
    if model_type in ("qwen3",):
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, tie_word_embeddings=False, **kwargs)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model
