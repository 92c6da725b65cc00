"""Engine choice from the config: `auto` prefers vLLM when it is importable."""

from __future__ import annotations

import importlib.util

import pytest

from posttrain.config.schema import RolloutConfig
from posttrain.engines import build_engine, engine_name


def test_auto_picks_vllm_when_importable_else_hf():
    expected = "vllm" if importlib.util.find_spec("vllm") else "hf"
    assert engine_name(RolloutConfig()) == expected


@pytest.mark.parametrize("name", ["hf", "vllm", "vllm-server"])
def test_explicit_engine_is_kept(name):
    assert engine_name(RolloutConfig(engine=name)) == name


def test_hf_engine_shares_the_policy(tiny, tiny_path):
    model, tokenizer = tiny
    engine = build_engine(
        RolloutConfig(engine="hf", batch_size=7), model, tokenizer, tiny_path, "float32", 0
    )
    assert engine.name == "hf" and engine.model is model and engine.batch_size == 7
