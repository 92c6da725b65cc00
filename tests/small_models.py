"""A small random causal LM, for tests that compare two code paths on the same weights."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
)
"""Two layers, grouped KV heads (4 query heads over 2), a 97-token vocabulary."""


def random_lm(kind: str = "qwen2", **extra) -> torch.nn.Module:
    """A `kind` model of `SMALL`'s shape (plus `extra` config keys), seeded: equal weights on
    every call."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **SMALL, **extra))
