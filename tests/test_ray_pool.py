"""The Ray pool of rollout engines, on a real local Ray with two HF actors on CPU: it generates
in order, syncs weights to every actor, replaces a killed actor with the latest weights, and
runs a GRPO stage (`rollout.workers: 2`). One Ray session serves the whole module."""

from __future__ import annotations

import json
import time

import pytest
import torch
from pydantic import ValidationError

from posttrain.batch import pad_right
from posttrain.config import load_config
from posttrain.config.schema import RolloutConfig
from posttrain.logprobs import token_logprobs
from posttrain.pipeline import run_pipeline
from posttrain.sync import probe_logprob_diff
from rollouts import RolloutEngine, SamplingParams, create_engine

ray = pytest.importorskip("ray")

PROMPTS = ["12+34=", "7+8=", "99+99=", "1+1=", "40+2="]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(ray_session, tiny_path):
    from posttrain.models.load import load_policy
    from rollouts.ray_pool import PoolOptions

    _, tokenizer = load_policy(tiny_path, "float32", "cpu")
    engine = create_engine(
        "ray",
        engine="hf",
        model_path=tiny_path,
        tokenizer=tokenizer,
        options=PoolOptions(workers=2, restarts=1),
    )
    yield engine
    engine.close()


def _kill(actor) -> None:
    """`ray.kill(actor)`, returning once the actor is dead for this driver.

    `ray.kill` only asks the GCS to kill the actor: a call sent right after it can still reach
    the old process and succeed (a short call sometimes does on a loaded machine), and the pool
    would then see no death. Once a call fails with `ActorDiedError`, every later call does.
    """
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    ray.kill(actor)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=30)
        except ActorDiedError:
            return
        except ActorUnavailableError:
            pass
        time.sleep(0.05)
    pytest.fail("a killed actor still answered after 60 s")


def _trainer_logprobs(model, sequences, pad_id):
    ids, mask = pad_right(sequences, pad_id)
    with torch.no_grad():
        return token_logprobs(model.eval(), ids, mask)


def _assert_every_actor_matches(pool, model, sequences, pad_id):
    expected = _trainer_logprobs(model, sequences, pad_id)
    per_actor = pool.worker_logprobs(sequences)
    assert len(per_actor) == 2
    for values in per_actor:
        for row, (seq, lp) in enumerate(zip(sequences, values, strict=True)):
            got = torch.tensor(lp[1 : len(seq)])
            torch.testing.assert_close(got, expected[row, 1 : len(seq)], atol=1e-4, rtol=0)


def test_generate_spreads_prompts_and_keeps_order(pool, tiny):
    model, tokenizer = tiny
    assert isinstance(pool, RolloutEngine)
    rows = [{"i": i} for i in range(len(PROMPTS))]
    sampling = SamplingParams(max_new_tokens=5, seed=3)
    groups = pool.generate(PROMPTS, 3, sampling, rows)
    assert [g.prompt for g in groups] == PROMPTS
    assert [g.row for g in groups] == rows
    for g in groups:
        assert len(g.samples) == 3
        for s in g.samples:
            assert s.prompt == g.prompt and 1 <= len(s.completion_ids) <= 5
            assert len(s.logprobs) == len(s.completion_ids)
            assert all(lp <= 0 for lp in s.logprobs)
            assert s.policy_version == 0
    # Seeded sampling is reproducible; the two shards sample with different seeds.
    again = pool.generate(PROMPTS, 3, sampling, rows)
    assert [s.completion_ids for g in groups for s in g.samples] == [
        s.completion_ids for g in again for s in g.samples
    ]
    # The engines' logprobs are the (unchanged) input model's.
    seqs = [s.prompt_ids + s.completion_ids for g in groups for s in g.samples]
    assert probe_logprob_diff(pool, model, seqs, tokenizer.pad_token_id) < 1e-4
    assert pool.generate([], 2, sampling) == []


def test_weights_reach_every_actor(pool, tiny):
    model, tokenizer = tiny
    groups = pool.generate(PROMPTS[:2], 2, SamplingParams(max_new_tokens=5, seed=0))
    seqs = [s.prompt_ids + s.completion_ids for g in groups for s in g.samples]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert probe_logprob_diff(pool, model, seqs, tokenizer.pad_token_id) > 1e-2
    pool.load_weights(model, version=1)
    _assert_every_actor_matches(pool, model, seqs, tokenizer.pad_token_id)
    assert probe_logprob_diff(pool, model, seqs, tokenizer.pad_token_id) < 1e-4
    after = pool.generate(PROMPTS, 1, SamplingParams(max_new_tokens=4))
    assert {s.policy_version for g in after for s in g.samples} == {1}


def test_a_killed_actor_is_replaced_with_the_latest_weights(pool, tiny, capfd):
    model, tokenizer = tiny
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pool.load_weights(model, version=2)
    _kill(pool.actors[1])
    groups = pool.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, seed=5))
    assert [g.prompt for g in groups] == PROMPTS
    assert all(len(g.samples) == 2 and g.samples[0].policy_version == 2 for g in groups)
    assert pool.replaced == 1
    assert "actor 1 died during generate; replaced (1/1)" in capfd.readouterr().err
    seqs = [s.prompt_ids + s.completion_ids for g in groups for s in g.samples]
    _assert_every_actor_matches(pool, model, seqs, tokenizer.pad_token_id)
    # The limit (restarts=1) is reached: the next death is an error that says so.
    from rollouts.ray_pool import PoolError

    _kill(pool.actors[0])
    with pytest.raises(PoolError, match="rollout.worker_restarts=1"):
        pool.logprobs(seqs)


def test_vllm_server_cannot_be_pooled():
    with pytest.raises(ValidationError, match="`vllm-server` cannot be pooled"):
        RolloutConfig(workers=2, engine="vllm-server")
    with pytest.raises(ValidationError, match="set rollout.workers > 1"):
        RolloutConfig(ray_address="auto")


def test_grpo_stage_with_two_ray_workers(ray_session, tmp_path, tiny_path, capsys):
    config = f"""
run: {{name: ray, output_dir: {tmp_path / "run"}, seed: 0}}
model: {{path: {tiny_path}}}
tracking: {{backend: jsonl}}
stages:
  - name: grpo
    algo: grpo
    iterations: 2
    data: {{source: builtin://arithmetic, split: train, limit: 32}}
    rollout: {{engine: hf, n: 4, max_new_tokens: 4, workers: 2, sync_probe: 4}}
    rewards: [{{name: exact_answer}}]
    grpo: {{prompts_per_iteration: 4}}
    train: {{lr: 1.0e-3, micro_batch_size: 8}}
"""
    path = tmp_path / "p.yaml"
    path.write_text(config)
    run_pipeline(load_config(path), path)
    assert "rollout engine: hf x2 (ray)" in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(x["sync/logprob_max_abs_diff"] < 1e-4 for x in lines)
