"""Load a policy and its tokenizer from `model.path`, building `tiny://` presets on demand."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain import distributed
from posttrain.config.schema import LoraSpec
from posttrain.models.lora import adapter_base, apply_lora, is_adapter_folder, load_adapter
from posttrain.models.tiny import build_tiny, parse_tiny_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str, seed: int = 0) -> str:
    """A loadable path: tiny presets become their cached folder; local folders must exist."""
    if path.startswith("tiny://"):
        return str(build_tiny(parse_tiny_path(path), seed=seed))
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or local.exists():
        if not (local / "config.json").is_file() and not is_adapter_folder(local):
            raise FileNotFoundError(
                f"model folder {path!r} not found or has neither config.json nor "
                "adapter_config.json"
            )
        return str(local)
    return path  # a Hugging Face id


def pick_device(device: str) -> torch.device:
    """`auto`: CUDA when there is a GPU. Under several processes `cuda` is this process's GPU
    (`cuda:<local rank>`), so `accelerate launch` needs no per-process setting."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and distributed.is_distributed():
        return distributed.device()
    return torch.device(device)


def load_policy(
    path: str,
    dtype: str = "float32",
    device: str = "auto",
    seed: int = 0,
    lora: LoraSpec | None = None,
):
    """Return `(model, tokenizer)`; the model is in train mode on `device`.

    With `lora`, a new trainable adapter is put on the model; a PEFT adapter folder is loaded
    on its base model and stays trainable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model_path(path, seed)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if is_adapter_folder(resolved):
        base = AutoModelForCausalLM.from_pretrained(adapter_base(resolved), dtype=DTYPES[dtype])
        model = load_adapter(base, resolved)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=DTYPES[dtype])
        if lora is not None:
            model = apply_lora(model, lora)
    model.to(pick_device(device)).train()
    return model, tokenizer
