"""LoRA through peft: wrap a policy, save it at the end of a stage, load an adapter folder.

With LoRA the reference model is the policy with its adapter disabled
(`peft.PeftModel.disable_adapter()`), so no second copy of the weights is kept. A stage saves
either the merged model (`lora.merge: true`, the default: a plain model that the next stage,
vLLM and `transformers` load as is) plus the adapter beside it in `adapter/`, or the adapter
alone, which the next stage loads on its base and keeps training.

Test: `pytest tests/test_lora.py`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from posttrain.config.schema import LoraSpec

ADAPTER_CONFIG = "adapter_config.json"


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """A trainable LoRA adapter on `model`; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on."""
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"adapter folder {path} does not name its base model")
    return base


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put the adapter saved in `path` on `model`, trainable."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=True)


def reference_mode(model: nn.Module) -> contextlib.AbstractContextManager:
    """Run the reference: the policy with its adapter disabled (a no-op without LoRA)."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()


def save_policy(model: nn.Module, tokenizer: Any, folder: Path, spec: LoraSpec | None) -> None:
    """Save a stage's output policy (see the module docstring for the LoRA cases)."""
    folder = Path(folder)
    if is_peft(model) and (spec is None or spec.merge):
        model.save_pretrained(folder.parent / "adapter")
        tokenizer.save_pretrained(folder.parent / "adapter")
        model = model.merge_and_unload()
    # A PEFT model that is not merged saves its adapter alone, naming its base model.
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
