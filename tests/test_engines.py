"""Engine choice from the config: `auto` prefers vLLM when it is importable."""

from __future__ import annotations

import importlib.util

import pytest
import torch

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
    assert engine.static_cache and engine.compile is None  # compiled on CUDA only
    assert engine.fuse_weights is None  # fused on CUDA only
    assert not engine._static_decoder(torch.device("cpu")).fuse_weights
    plain = RolloutConfig(engine="hf", static_cache=False, compile=False)
    engine = build_engine(plain, model, tokenizer, tiny_path, "float32", 0)
    assert not engine.static_cache and engine.compile is False
    fused = RolloutConfig(engine="hf", fuse_weights=True)
    engine = build_engine(fused, model, tokenizer, tiny_path, "float32", 0)
    assert engine.fuse_weights is True


def test_follower_engine_stands_in_off_rank_0(tiny):
    """Off rank 0 an engine that owns its weights is replaced by a follower: right shapes,
    no weights, and the sync probe defers to rank 0 (run for real in test_distributed.py)."""
    from posttrain.engines import FollowerEngine
    from posttrain.sync import probe_logprob_diff
    from rollouts import SamplingParams

    model, tokenizer = tiny
    follower = FollowerEngine("vllm")
    rows = [{"answer": "1"}, {"answer": "2"}]
    groups = follower.generate(["1+0=", "1+1="], 3, SamplingParams(), rows)
    assert [g.row for g in groups] == rows
    assert [len(g.samples) for g in groups] == [3, 3]
    assert follower.name == "vllm (on rank 0)"
    assert probe_logprob_diff(follower, model, [[1, 2, 3]], tokenizer.pad_token_id) == 0.0
    with pytest.raises(RuntimeError, match="rank 0"):
        follower.logprobs([[1, 2]])
