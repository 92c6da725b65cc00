"""The weights an engine should serve, from a training module (plain or with a LoRA adapter).

A PEFT/LoRA policy (recognised by its `merge_adapter` / `unmerge_adapter` / `get_base_model`
methods, so this package needs no peft import) is exported as merged weights under the base
model's own names: the adapter is merged in, the base model's state read, and the adapter
unmerged again, so training continues on the same adapter. Adapter tensors (`lora_*`) and
peft's saved copies of original modules are left out; `base_layer.` and
`modules_to_save.default.` are removed from names.

Test: `pytest tests/test_lora.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def export_state_dict(source: Any) -> dict[str, torch.Tensor]:
    """Name -> tensor as the serving model names them (merged for LoRA policies)."""
    if not isinstance(source, nn.Module):
        return dict(source)
    if not all(hasattr(source, m) for m in ("merge_adapter", "unmerge_adapter", "get_base_model")):
        return source.state_dict()
    source.merge_adapter()
    try:
        state = {}
        for name, tensor in source.get_base_model().state_dict().items():
            if ".lora_" in name or ".original_module." in name:
                continue
            name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            state[name] = tensor.detach().clone()
    finally:
        source.unmerge_adapter()
    return state
