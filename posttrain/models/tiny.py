"""Build the embedded tiny models: `tiny://<preset>` in a config.

A preset is a small Qwen2- or Llama-architecture network plus a byte-level BPE tokenizer
trained here with `tokenizers` (digits are split one per token, so arithmetic is learnable).
Both are saved in Hugging Face format, so transformers and vLLM load them like any model.
Building is deterministic from the seed and cached: the second call returns the saved folder.

Try: `python -c "from posttrain.models.tiny import build_tiny; print(build_tiny('arithmetic'))"`.
"""

from __future__ import annotations

import difflib
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyPreset:
    architecture: str  # "qwen2" or "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim 32: vLLM's CPU attention rejects 16
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    vocab_size: int = 384


PRESETS = {
    "arithmetic": TinyPreset("qwen2"),
    "arithmetic-llama": TinyPreset("llama"),
}


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def parse_tiny_path(path: str) -> str:
    """`tiny://arithmetic` -> `arithmetic`, with a suggestion for unknown presets."""
    preset = path.removeprefix("tiny://")
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        hint = f"; did you mean 'tiny://{close[0]}'?" if close else ""
        raise ValueError(f"unknown tiny model {path!r}{hint} (presets: {', '.join(PRESETS)})")
    return preset


def build_tiny(preset: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Return the folder of the tiny model `preset` initialised from `seed`, building it once."""
    spec = PRESETS[parse_tiny_path(preset)]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tiny"
    target = root / f"{preset}-seed{seed}-v{BUILDER_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # One builder at a time (the processes of `accelerate launch` all start here at once; two
    # processes building side by side on a fresh machine left a folder transformers could not
    # load): the others wait, then find the finished folder.
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _build(spec, seed, root, target)
    return target


def _build(spec: TinyPreset, seed: int, root: Path, target: Path) -> None:
    """Write the tokenizer and the model to a staging folder, then rename it to `target`."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        tokenizer = _train_tokenizer(spec.vocab_size)
        tokenizer.save_pretrained(staging)
        _init_model(spec, tokenizer, seed).save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _corpus() -> list[str]:
    """Text the tokenizer learns merges from: arithmetic lines and some English."""
    lines = [f"{a}+{b}={a + b}" for a in range(0, 100, 3) for b in range(0, 100, 7)]
    lines += [f"{a}-{b}={a - b}" for a in range(0, 100, 7) for b in range(0, 100, 3)]
    lines += [
        "What is the answer? The answer is 42.",
        "Question: add the numbers. Answer: the sum is",
        "<think> reasoning </think> <answer> final </answer>",
    ]
    return lines


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def _init_model(spec: TinyPreset, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[spec.architecture]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
