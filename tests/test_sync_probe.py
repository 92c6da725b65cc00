"""The weight-sync probe: it measures engine-vs-trainer logprob gaps and stops a run past the bound."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from posttrain.config.schema import GRPOParams, OptimConfig
from posttrain.data.arithmetic import arithmetic_rows
from posttrain.learner import Learner
from posttrain.loop import LoopParts, run_loop
from posttrain.sampler import PromptSampler
from posttrain.stages.grpo import GRPO
from posttrain.sync import FLOAT32_BOUND, HALF_BOUND, SyncError, probe_bound, probe_logprob_diff
from posttrain.tracking import JsonlTracker, StageTracker
from rewards import RewardTerm, Rubric, exact_answer
from rollouts import SamplingParams, create_engine


def _sequences(engine):
    groups = engine.generate(["12+34=", "7+8="], 2, SamplingParams(max_new_tokens=6, seed=0))
    return [s.prompt_ids + s.completion_ids for g in groups for s in g.samples]


def test_probe_is_zero_for_a_shared_model_and_large_for_a_bf16_engine(tiny):
    model, tokenizer = tiny
    shared = create_engine("hf", model=model, tokenizer=tokenizer)
    seqs = _sequences(shared)
    assert probe_logprob_diff(shared, model, seqs, tokenizer.pad_token_id) == 0.0
    low = create_engine("hf", model=copy.deepcopy(model).to(torch.bfloat16), tokenizer=tokenizer)
    assert probe_logprob_diff(low, model, seqs, tokenizer.pad_token_id) > 1e-3


def _loop(model, tokenizer, engine, tmp_path, bound):
    rows = arithmetic_rows("train")[:32]
    return LoopParts(
        name="probe",
        iterations=2,
        next_prompts=PromptSampler(rows, 4, seed=0).next,
        engine=engine,
        n=4,
        sampling=lambda it: SamplingParams(max_new_tokens=4, seed=it),
        rubric=Rubric([RewardTerm("exact_answer", exact_answer)]),
        algorithm=GRPO(
            GRPOParams(zero_variance_groups="keep"), tokenizer.pad_token_id, model, None, 64
        ),
        learner=Learner(model, OptimConfig(lr=1e-3), 2),
        tokenizer=tokenizer,
        tracker=StageTracker([JsonlTracker(tmp_path / "metrics.jsonl", "probe")]),
        evaluator=None,
        eval_every=0,
        samples_every=0,
        probe=partial(probe_logprob_diff, engine, model, pad_id=tokenizer.pad_token_id),
        probe_size=4,
        max_logprob_diff=bound,
    )


def test_loop_logs_the_probe_and_stops_past_the_bound(tiny, tmp_path):
    model, tokenizer = tiny
    shared = create_engine("hf", model=model, tokenizer=tokenizer)
    run_loop(_loop(model, tokenizer, shared, tmp_path, bound=1e-6))
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert '"sync/logprob_max_abs_diff": 0.0' in lines and '"sync/seconds"' in lines

    low = create_engine("hf", model=copy.deepcopy(model).to(torch.bfloat16), tokenizer=tokenizer)
    with pytest.raises(
        SyncError,
        match=r"iteration 1, the hf engine's logprobs differ .*\(bound rollout.max_logprob_diff",
    ):
        run_loop(_loop(model, tokenizer, low, tmp_path, bound=1e-3))


def test_default_bound_follows_the_policy_dtype():
    policy = torch.nn.Linear(2, 2)
    assert probe_bound(None, policy) == FLOAT32_BOUND == 0.01
    assert probe_bound(None, policy.to(torch.bfloat16)) == HALF_BOUND == 0.1
    assert probe_bound(0.5, policy) == 0.5
