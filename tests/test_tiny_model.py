"""The embedded tiny model: deterministic, cached, loadable by transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.load import load_policy, resolve_model_path
from posttrain.models.tiny import build_tiny, parse_tiny_path


def _weights(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_through_transformers(tiny_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert model.config.model_type == "qwen2"
    assert (
        model.config.hidden_size // model.config.num_attention_heads == 32
    )  # vLLM CPU needs >= 32
    ids = tokenizer("12+34=46", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "12+34=46"
    digits = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert digits[:2] == ["1", "2"]  # one token per digit
    out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), len(tokenizer))
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id


def test_build_is_deterministic_and_cached(tmp_path, tiny_path):
    again = build_tiny("arithmetic", seed=0, cache_dir=tmp_path)
    first, second = _weights(tiny_path), _weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny("arithmetic", seed=0, cache_dir=tmp_path) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime


def test_other_seed_gives_other_weights(tmp_path, tiny_path):
    other = build_tiny("arithmetic", seed=1, cache_dir=tmp_path)
    a, b = _weights(tiny_path), _weights(other)
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_llama_preset(tmp_path):
    path = build_tiny("arithmetic-llama", seed=0, cache_dir=tmp_path)
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"


def test_unknown_preset_suggests_nearest():
    with pytest.raises(ValueError, match="did you mean 'tiny://arithmetic'"):
        parse_tiny_path("tiny://arithmetc")


def test_missing_local_model_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found or has neither config.json nor adapter"):
        resolve_model_path(str(tmp_path / "nope"))


def test_load_policy_resolves_tiny_scheme(tiny_cache):
    model, tokenizer = load_policy("tiny://arithmetic", "float32", "cpu", seed=0)
    assert model.training
    assert tokenizer.pad_token_id is not None


def test_a_second_builder_waits_for_the_first(tmp_path):
    """Builders of one preset take turns (the processes of `accelerate launch` all start
    building a fresh cache at once): while the lock is held, a build waits; after, it runs."""
    import fcntl
    import threading

    with open(tmp_path / ".arithmetic-seed0-v1.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = threading.Thread(target=build_tiny, args=("arithmetic",),
                                   kwargs={"cache_dir": tmp_path})  # fmt: skip
        builder.start()
        builder.join(3)
        assert builder.is_alive()  # waiting for the lock
        assert not (tmp_path / "arithmetic-seed0-v1").exists()
    builder.join(120)
    assert not builder.is_alive()
    AutoModelForCausalLM.from_pretrained(tmp_path / "arithmetic-seed0-v1")
