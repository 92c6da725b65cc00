"""GRPO's options reach the batch and the loss: RLOO and Dr. GRPO advantages, zero-variance
groups kept / dropped / refilled (dynamic sampling through the real loop), overlong filtering,
clip-higher, constant aggregation, KL estimators; the config checks; and a short GRPO stage run
with the options on.

Hand examples: a group of rewards [1, 0, 0, 0] has mean 0.25 and unbiased std 0.5, so GRPO
gives [1.5, -0.5, -0.5, -0.5], Dr. GRPO [0.75, -0.25, -0.25, -0.25] and RLOO
r_i - mean(others) = [1, -1/3, -1/3, -1/3].

Run: `pytest tests/test_grpo_stage_options.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from posttrain.algorithms import grpo
from posttrain.config import load_config
from posttrain.config.schema import GRPOParams, GRPOStage, OptimConfig, PPOStage
from posttrain.learner import Learner
from posttrain.loop import LoopParts, run_loop
from posttrain.pipeline import run_pipeline
from posttrain.sampler import PromptSampler
from posttrain.stages.grpo import GRPO
from posttrain.tracking import JsonlTracker, StageTracker
from rewards import RewardTerm, Rubric
from rollouts import Group, Sample, SamplingParams, create_engine

PAD = 0


def _group(lengths: list[int], finish: list[str] | None = None) -> Group:
    """One prompt of 2 tokens and completions of the given lengths (token ids are arbitrary)."""
    finish = finish or ["stop"] * len(lengths)
    samples = [
        Sample("p", "c" * n, [5, 6], list(range(10, 10 + n)), [0.0] * n, f, 0)
        for n, f in zip(lengths, finish, strict=True)
    ]
    return Group("p", samples)


def _batch(rewards_GN: list[list[float]], cfg: GRPOParams, lengths=None, finish=None):
    lengths = lengths or [[2] * len(r) for r in rewards_GN]
    finish = finish or [None] * len(rewards_GN)
    groups = [_group(n, f) for n, f in zip(lengths, finish, strict=True)]
    flat = [r for row in rewards_GN for r in row]
    return grpo.make_batch(groups, flat, cfg, PAD, None, None, micro_batch_size=8)


@pytest.mark.parametrize(
    ("advantage", "scale", "rewards", "expected"),
    [
        ("group", True, [1, 0, 0, 0], [1.5, -0.5, -0.5, -0.5]),
        ("group", False, [1, 0, 0, 0], [0.75, -0.25, -0.25, -0.25]),
        ("rloo", False, [1, 0, 0, 0], [1, -1 / 3, -1 / 3, -1 / 3]),
        ("rloo", False, [2, 1, 0, 1], [4 / 3, 0, -4 / 3, 0]),
    ],
)
def test_advantages_reach_the_batch(advantage, scale, rewards, expected):
    cfg = GRPOParams(advantage=advantage, scale_rewards=scale)
    prepared = _batch([rewards], cfg)
    assert prepared.batch.advantages_B.tolist() == pytest.approx(expected, rel=1e-3)
    assert prepared.advantages == pytest.approx(expected, rel=1e-3)


# Three groups of two: the first has no signal.
REWARDS = [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize(
    ("mode", "per_iteration", "groups_used", "advantages"),
    [
        ("keep", 16, 3, [0, 0, 0.5, -0.5, -0.5, 0.5]),
        ("drop", 16, 2, [0, 0, 0.5, -0.5, -0.5, 0.5]),
        ("refill", 1, 1, [0, 0, 0.5, -0.5, 0, 0]),  # the surplus signal group is left out
    ],
)
def test_zero_variance_groups(mode, per_iteration, groups_used, advantages):
    cfg = GRPOParams(
        zero_variance_groups=mode, prompts_per_iteration=per_iteration, scale_rewards=False
    )
    prepared = _batch(REWARDS, cfg)
    assert prepared.metrics["grpo/zero_variance_fraction"] == pytest.approx(1 / 3)
    assert prepared.metrics["grpo/groups_used"] == groups_used
    assert prepared.batch.num_sequences == 2 * groups_used
    assert prepared.advantages == pytest.approx(advantages)


@pytest.mark.parametrize(
    ("mode", "rewards", "rounds", "expected"),
    [
        ("refill", [1, 1, 1, 0], 1, True),  # 1 signal group < 2, extra rounds left
        ("refill", [1, 1, 1, 0], 3, False),  # 2 extra rounds used up
        ("refill", [1, 0, 1, 0], 1, False),  # 2 signal groups: enough
        ("drop", [1, 1, 1, 1], 1, False),  # only refill asks for more
    ],
)
def test_wants_more(mode, rewards, rounds, expected):
    cfg = GRPOParams(zero_variance_groups=mode, prompts_per_iteration=2, max_refill_rounds=2)
    groups = [_group([2, 2]), _group([2, 2])]
    assert grpo.wants_more(groups, rewards, rounds, cfg) is expected


def test_overlong_filter_masks_truncated_samples_but_keeps_them_in_the_baseline():
    rewards = [[1.0, 0.0, 1.0, 0.0]]
    finish = [["stop", "length", "stop", "length"]]
    lengths = [[1, 3, 2, 3]]
    cfg = GRPOParams(scale_rewards=False, loss_aggregation="token")
    kept = _batch(rewards, cfg, lengths, finish).batch
    assert kept.num_sequences == 4 and kept.num_tokens == 9

    filtered = _batch(
        rewards, GRPOParams(scale_rewards=False, overlong_filter=True), lengths, finish
    )
    batch = filtered.batch
    assert filtered.metrics["grpo/overlong_filtered"] == 2
    assert batch.num_sequences == 2 and batch.num_tokens == 3  # samples 0 and 2 only
    assert batch.loss_mask_BT.sum(-1).tolist() == [1, 2]
    assert batch.advantages_B.tolist() == [0.5, 0.5]  # group mean 0.5 counts the truncated
    assert filtered.advantages == [0.5, 0.0, 0.5, 0.0]

    everything_cut = [["length"] * 4]
    none_left = _batch(rewards, GRPOParams(overlong_filter=True), lengths, everything_cut)
    assert none_left.batch is None


def _loss(cfg: GRPOParams, batch, shift_old=0.0, shift_ref=None, max_len=None) -> float:
    """The adapter's loss with logprobs of -1 everywhere; old = logprobs - shift_old."""
    logprobs = torch.full(batch.input_ids_BT.shape, -1.0, requires_grad=True)
    batch = dataclasses.replace(
        batch,
        old_logprobs_BT=logprobs.detach() - shift_old,
        ref_logprobs_BT=None if shift_ref is None else logprobs.detach() - shift_ref,
    )
    algorithm = GRPO(cfg, PAD, None, None, 8, max_completion_length=max_len)
    value, _ = algorithm.loss(logprobs, batch)
    return value.item()


# Advantages [0.5, -0.5], completion lengths 3 and 1, ratio 1: the per-token loss is -A.
@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("sequence", -(0.5 - 0.5) / 2),
        ("token", -(3 * 0.5 - 1 * 0.5) / 4),
        ("constant", -(3 * 0.5 - 1 * 0.5) / (2 * 8)),  # 2 completions * max_new_tokens 8
    ],
)
def test_aggregation_reaches_the_loss(aggregation, expected):
    cfg = GRPOParams(scale_rewards=False, loss_aggregation=aggregation)
    batch = _batch([[1.0, 0.0]], cfg, [[3, 1]]).batch
    assert _loss(cfg, batch, max_len=8) == pytest.approx(expected)


def test_constant_aggregation_needs_the_generation_limit():
    cfg = GRPOParams(scale_rewards=False, loss_aggregation="constant")
    batch = _batch([[1.0, 0.0]], cfg, [[3, 1]]).batch
    with pytest.raises(ValueError, match="max_completion_length"):
        _loss(cfg, batch)


# Ratio 1.5 on every token. A = +0.5 (3 tokens): clipped at 1 + eps_high, loss -(1+eh)*0.5;
# A = -0.5 (1 token): min(-0.75, -(1+eh)*0.5) = -0.75, loss 0.75. Token mean over 4 tokens.
@pytest.mark.parametrize(
    ("eps_high", "expected"),
    [(None, (3 * -0.6 + 0.75) / 4), (0.28, (3 * -0.64 + 0.75) / 4)],
)
def test_clip_higher_reaches_the_loss(eps_high, expected):
    cfg = GRPOParams(scale_rewards=False, loss_aggregation="token", clip_eps_high=eps_high)
    batch = _batch([[1.0, 0.0]], cfg, [[3, 1]]).batch
    assert _loss(cfg, batch, shift_old=math.log(1.5)) == pytest.approx(expected)


# Zero advantages (equal rewards, kept): the loss is beta * KL with log(ref/pi) = -0.3.
@pytest.mark.parametrize(
    ("estimator", "kl"),
    [("k1", 0.3), ("k2", 0.5 * 0.3**2), ("k3", math.exp(-0.3) + 0.3 - 1)],
)
def test_kl_estimator_reaches_the_loss(estimator, kl):
    cfg = GRPOParams(
        zero_variance_groups="keep", beta=0.5, kl_estimator=estimator, loss_aggregation="token"
    )
    batch = _batch([[1.0, 1.0]], GRPOParams(zero_variance_groups="keep")).batch
    assert _loss(cfg, batch, shift_ref=0.3) == pytest.approx(0.5 * kl, rel=1e-5)


@pytest.mark.parametrize(
    ("grpo_options", "rollout", "message"),
    [
        ({"advantage": "rloo"}, {}, "set scale_rewards: false"),
        ({"advantage": "rloo", "scale_rewards": False}, {"n": 1}, "rollout.n >= 2"),
        ({"clip_eps_high": 0.0}, {}, "greater than 0"),
        ({"max_refill_rounds": 0}, {}, "greater than or equal to 1"),
        ({"zero_variance_groups": "refil"}, {}, "'keep', 'drop' or 'refill'"),
        ({"kl_estimator": "k4"}, {}, "'k1', 'k2' or 'k3'"),
    ],
)
def test_config_checks(grpo_options, rollout, message):
    with pytest.raises(ValidationError, match=message):
        GRPOStage(
            name="g",
            algo="grpo",
            data={"source": "builtin://arithmetic"},
            rewards=[{"name": "exact_answer"}],
            grpo=grpo_options,
            rollout=rollout,
        )


class Recorded:
    """The real GRPO adapter, keeping what `prepare` returned."""

    def __init__(self, inner: GRPO) -> None:
        self.inner, self.prepared = inner, []
        self.passes = inner.passes

    def wants_more(self, groups, rewards, rounds):
        return self.inner.wants_more(groups, rewards, rounds)

    def prepare(self, groups, rewards):
        self.prepared.append(self.inner.prepare(groups, rewards))
        return self.prepared[-1]

    def loss(self, logprobs_BT, batch):
        return self.inner.loss(logprobs_BT, batch)


def flat_or_varied(prompts, completions, flat, **_):
    """0 for every sample of a `flat` prompt (no signal); else a spread of character codes."""
    return [
        0.0 if f else float(sum(map(ord, c)) % 7) for c, f in zip(completions, flat, strict=True)
    ]


def test_refill_generates_until_the_batch_holds_only_groups_with_signal(tiny, tmp_path):
    model, tokenizer = tiny
    rows = [{"prompt": f"{a}+{a}=", "flat": a % 4 != 0} for a in range(40)]  # 3 in 4 flat
    cfg = GRPOParams(
        prompts_per_iteration=4, zero_variance_groups="refill", max_refill_rounds=8, epochs=1
    )
    algorithm = Recorded(GRPO(cfg, tokenizer.pad_token_id, model, None, 64))
    parts = LoopParts(
        name="refill",
        iterations=2,
        next_prompts=PromptSampler(rows, 4, seed=0).next,
        engine=create_engine("hf", model=model, tokenizer=tokenizer),
        n=4,
        sampling=lambda it: SamplingParams(max_new_tokens=4, seed=it),
        rubric=Rubric([RewardTerm("flat_or_varied", flat_or_varied)]),
        algorithm=algorithm,
        learner=Learner(model, OptimConfig(lr=1e-4), 2),
        tokenizer=tokenizer,
        tracker=StageTracker([JsonlTracker(tmp_path / "metrics.jsonl", "refill")]),
        evaluator=None,
        eval_every=0,
        samples_every=0,
    )
    run_loop(parts)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for line, prepared in zip(logged, algorithm.prepared, strict=True):
        rounds = line["rollout/generation_rounds"]
        assert rounds > 1  # one round holds 1 signal group on average
        # Every round drew 4 prompts; the logged fraction covers all of them.
        shown_groups = len(prepared.advantages) // 4
        assert shown_groups == 4 * rounds
        assert 0 < line["grpo/zero_variance_fraction"] < 1
        # The batch holds exactly 4 groups, each with signal (non-zero advantages).
        assert line["grpo/groups_used"] == 4
        advantages = prepared.batch.advantages_B.view(4, 4)
        assert bool((advantages.abs().sum(-1) > 0).all())
        assert line["time/generate"] > 0


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_ignore_eos_reaches_the_sampling_params(ignore_eos):
    from posttrain.stages.grpo import sampling_params

    common = {"data": {"source": "builtin://arithmetic"}, "rewards": [{"name": "exact_answer"}]}
    rollout = {"max_new_tokens": 5, "ignore_eos": ignore_eos}
    for algo, kind in (("grpo", GRPOStage), ("ppo", PPOStage)):
        stage = kind.model_validate({"name": "s", "algo": algo, "rollout": rollout, **common})
        params = sampling_params(stage, 0, 3)
        assert params.ignore_eos is ignore_eos and params.max_new_tokens == 5


def test_grpo_stage_with_the_options_on(tmp_path, tiny_path):
    (tmp_path / "r.py").write_text(
        "def chars(prompts, completions, **_):\n"
        "    return [float(sum(map(ord, c)) % 5) for c in completions]\n"
    )
    config = f"""
run: {{name: options, output_dir: {tmp_path / "run"}, seed: 0}}
model: {{path: {tiny_path}}}
tracking: {{backend: jsonl}}
stages:
  - name: grpo
    algo: grpo
    iterations: 2
    data: {{source: builtin://arithmetic, split: train, limit: 64}}
    rollout: {{engine: hf, n: 4, max_new_tokens: 4}}
    rewards: [{{name: ./r.py:chars}}]
    grpo:
      prompts_per_iteration: 4
      advantage: rloo
      scale_rewards: false
      beta: 0.05
      kl_estimator: k1
      clip_eps_high: 0.28
      loss_aggregation: constant
      zero_variance_groups: refill
      epochs: 2
    train: {{lr: 1.0e-3, micro_batch_size: 8}}
"""
    path = tmp_path / "p.yaml"
    path.write_text(config)
    run_pipeline(load_config(path), path)
    before = AutoModelForCausalLM.from_pretrained(tiny_path)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "grpo" / "model")
    unchanged = [
        name
        for (name, p), q in zip(before.named_parameters(), after.parameters(), strict=True)
        if torch.equal(p, q)
    ]
    assert unchanged == []
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in (
        "rollout/generation_rounds",
        "grpo/zero_variance_fraction",
        "grpo/groups_used",
        "train/grpo/kl",
        "train/grpo/clip_fraction",
    ):
        assert all(key in x for x in lines), key
