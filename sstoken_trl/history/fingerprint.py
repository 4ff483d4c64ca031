"""Short content hashes that tell whether a stored loss cache belongs to this model, tokenizer and sample.

- sample_key: a sample's token ids (the cache is keyed by content, not by position in the dataset).
- weights_fingerprint: the weights the base log-probs come from. Every tensor contributes its name, shape,
  dtype and the exact bytes of a strided sample of its values, so two checkpoints of one architecture differ
  while hashing stays cheap for billions of weights. Under PEFT only the frozen base weights count, named as
  in the plain model, so the adapter configuration (rank, targets) does not change the fingerprint.
- tokenizer_fingerprint: the vocabulary and special tokens.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn

SAMPLED_VALUES = 4096
PEFT_WRAPPERS = (".base_layer", ".original_module")


def sample_key(ids: np.ndarray) -> int:
    """64-bit blake2b of the token ids (as int64)."""
    digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    if not isinstance(model, PeftModel):
        return dict(model.named_parameters())
    weights = {}
    for name, p in model.get_base_model().named_parameters():
        if p.requires_grad:
            continue
        for wrapper in PEFT_WRAPPERS:
            name = name.replace(wrapper, "")
        weights[name] = p
    return weights


def _sampled_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLED_VALUES)
    sample = torch.cat([flat[::stride], flat[-1:]]).contiguous().cpu()
    return sample.view(torch.uint8).numpy().tobytes()


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """Hash of the base weights of `model` (all weights without PEFT)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(_base_weights(model).items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_sampled_bytes(t))
    return h.hexdigest()


def tokenizer_fingerprint(processing_class: Any) -> str:
    """Hash of the vocabulary and special tokens (of a processor's tokenizer, if given a processor)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        raise ValueError("history='cache' needs the trainer's tokenizer (processing_class) to fingerprint the cache.")
    content = {"vocab": sorted(tokenizer.get_vocab().items()), "special": sorted(map(str, tokenizer.all_special_ids))}
    return hashlib.blake2b(json.dumps(content).encode(), digest_size=16).hexdigest()
