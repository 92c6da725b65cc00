"""Run-health statistics by hand, and the monitor's warnings on made-up metric sequences.

Run: `pytest tests/test_health.py`.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from posttrain.health import (
    HealthMonitor,
    completion_length_stats,
    distinct_n,
    percentile,
    reward_length_correlation,
    rollout_metrics,
)
from rollouts import Group, Sample


@pytest.mark.parametrize(
    ("lengths", "mean", "p95"),
    [
        ([4], 4.0, 4.0),
        ([1, 2, 3, 4, 5], 3.0, 4.8),  # position 0.95 * 4 = 3.8: 4 + 0.8 * (5 - 4)
        ([10, 0], 5.0, 9.5),  # position 0.95: 0 + 0.95 * 10
        ([1] * 19 + [21], 2.0, 2.0),  # position 18.05: 1 + 0.05 * 20
        ([3, 3, 3], 3.0, 3.0),
    ],
)
def test_completion_length_stats(lengths, mean, p95):
    assert completion_length_stats(lengths) == pytest.approx((mean, p95))


def test_percentile_matches_numpy_linear():
    rng = random.Random(0)
    for _ in range(20):
        values = [rng.randint(0, 500) for _ in range(rng.randint(1, 40))]
        for q in (0, 50, 95, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))


@pytest.mark.parametrize(
    ("bad", "call"),
    [
        ("at least one length", lambda: completion_length_stats([])),
        (r"q must be in \[0, 100\]", lambda: percentile([1], 101)),
    ],
)
def test_length_stats_reject_bad_input(bad, call):
    with pytest.raises(ValueError, match=bad):
        call()


@pytest.mark.parametrize(
    ("rewards", "lengths", "expected"),
    [
        ([1, 2, 3], [2, 4, 6], 1.0),
        ([1, 2, 3], [6, 4, 2], -1.0),
        ([1, 1, 1], [1, 2, 3], 0.0),  # constant reward: no relation, not NaN
        ([0, 1, 0], [5, 5, 5], 0.0),  # constant length
        ([1.0], [7], 0.0),  # one sample
        ([], [], 0.0),
        ([1, 0, 1, 0], [1, 1, 2, 2], 0.0),  # sum of products of deviations is 0
        ([0, 0, 1, 1], [1, 2, 2, 3], 1 / math.sqrt(2)),  # s_xy = 1, s_xx = 1, s_yy = 2
    ],
)
def test_reward_length_correlation(rewards, lengths, expected):
    assert reward_length_correlation(rewards, lengths) == pytest.approx(expected, abs=1e-12)


def test_reward_length_correlation_matches_numpy():
    rng = random.Random(1)
    rewards = [rng.random() for _ in range(50)]
    lengths = [rng.randint(1, 30) for _ in range(50)]
    expected = np.corrcoef(rewards, lengths)[0, 1]
    assert reward_length_correlation(rewards, lengths) == pytest.approx(expected)


def test_reward_length_correlation_needs_one_length_per_reward():
    with pytest.raises(ValueError, match="got 2 rewards for 3 lengths"):
        reward_length_correlation([1, 2], [1, 2, 3])


@pytest.mark.parametrize(
    ("groups", "n", "expected"),
    [
        ([["a b c", "a b c"]], 1, 3 / 6),
        ([["a b c", "a b c"]], 2, 2 / 4),  # ab, bc twice
        ([["a b", "c d"]], 2, 1.0),
        ([["a a a"], ["x y", "x z"]], 1, (1 / 3 + 3 / 4) / 2),  # mean over prompts
        ([[[1, 2, 3], [1, 2, 4]]], 2, 3 / 4),  # token ids: (1,2) (2,3) (1,2) (2,4)
        ([["a"], ["a b", "a b"]], 2, 1 / 2),  # the group without a bigram is left out
        ([["a b c d"]], 3, 1.0),
    ],
)
def test_distinct_n(groups, n, expected):
    assert distinct_n(groups, n) == pytest.approx(expected)


def test_distinct_n_without_any_ngram_is_nan_and_n_must_be_positive():
    assert math.isnan(distinct_n([["a", "b"]], 2))
    assert math.isnan(distinct_n([], 1))
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n([["a"]], 0)


def _sample(ids: list[int], logprobs: list[float], reason: str = "stop") -> Sample:
    return Sample("p", "c", [0], ids, logprobs, reason, 0)


def test_rollout_metrics_of_groups():
    groups = [
        Group("p1", [_sample([1, 2], [-1.0, -1.0]), _sample([1, 2], [-1.0, -3.0])]),
        Group("p2", [_sample([5, 6, 7, 8], [-0.5] * 4, "length"), _sample([9], [-2.0])]),
    ]
    metrics = rollout_metrics(groups, [0.0, 0.0, 1.0, 0.0])
    assert metrics == pytest.approx(
        {
            "rollout/completion_length_mean": 9 / 4,
            "rollout/completion_length_p95": 3.7,  # lengths 1 2 2 4, position 2.85
            "rollout/truncated_fraction": 0.25,
            # rewards 0 0 1 0 vs lengths 2 2 4 1: s_xy = 1.75, s_xx = 0.75, s_yy = 4.75
            "rollout/reward_length_corr": 1.75 / math.sqrt(0.75 * 4.75),
            # p1: (1,2) twice -> 1/2; p2: (5,6) (6,7) (7,8) -> 1
            "rollout/distinct_2": 0.75,
            # 9 tokens, -logprob sum 1 + 1 + 1 + 3 + 4 * 0.5 + 2 = 10
            "rollout/neg_logprob_mean": 10 / 9,
        }
    )


def test_rollout_metrics_leave_out_undefined_values():
    groups = [Group("p", [_sample([1], []), _sample([2], [])])]  # no bigrams, no logprobs
    assert set(rollout_metrics(groups, [1.0, 0.0])) == {
        "rollout/completion_length_mean",
        "rollout/completion_length_p95",
        "rollout/truncated_fraction",
        "rollout/reward_length_corr",
    }
    with pytest.raises(ValueError, match="got 1 rewards for 2 samples"):
        rollout_metrics(groups, [1.0])


def _warning_steps(monitor: HealthMonitor, metrics: list[dict[str, float]]) -> list[int]:
    return [step for step, m in enumerate(metrics, start=1) if monitor.check(m, step)]


@pytest.mark.parametrize(
    ("norms", "steps"),
    [
        ([0.0] * 4, []),
        ([0.0] * 5, [5]),
        ([0.0] * 9, [5]),  # once per streak, not every step
        ([0.0] * 7 + [1.0] + [0.0] * 5, [5, 13]),  # a new streak warns again
        ([0.0] * 4 + [0.3] + [0.0] * 4, []),
        ([1e-12] * 5, [5]),  # at or below the tolerance
        ([None, 0.0, 0.0, 0.0, 0.0, None, 0.0], []),  # no update (no batch) breaks a streak
    ],
)
def test_zero_grad_norm_warning(norms, steps):
    metrics = [{} if n is None else {"train/grad_norm": n} for n in norms]
    assert _warning_steps(HealthMonitor(), metrics) == steps


@pytest.mark.parametrize(
    ("fractions", "steps"),
    [
        ([0.95] * 5, [5]),
        ([0.9] * 8, []),  # the bound itself is not above it
        ([0.95] * 4 + [0.5] + [0.95] * 5, [10]),
        ([1.0] * 12, [5]),
    ],
)
def test_zero_variance_fraction_warning(fractions, steps):
    metrics = [{"grpo/zero_variance_fraction": f} for f in fractions]
    assert _warning_steps(HealthMonitor(), metrics) == steps


def test_zero_variance_warning_reads_any_algorithms_prefix():
    metrics = [{"rloo/zero_variance_fraction": 1.0}] * 3
    assert _warning_steps(HealthMonitor(zero_variance_steps=3), metrics) == [3]


def _run(pairs: list[tuple[float, float | None]]) -> list[dict[str, float]]:
    """(train reward, eval accuracy or None) per step."""
    return [
        {"train/reward/total": r, **({} if a is None else {"eval/accuracy": a})} for r, a in pairs
    ]


@pytest.mark.parametrize(
    ("pairs", "steps"),
    [
        # evals at 2, 4, 6: reward means 0.15, 0.35, 0.55 rise; accuracy 0.5, 0.4, 0.3 falls
        ([(0.1, None), (0.2, 0.5), (0.3, None), (0.4, 0.4), (0.5, None), (0.6, 0.3)], [6]),
        # only one falling evaluation
        ([(0.1, 0.5), (0.2, 0.4), (0.3, 0.45)], []),
        # both rise: learning, not hacking
        ([(0.1, 0.3), (0.2, 0.4), (0.3, 0.5), (0.4, 0.6)], []),
        # accuracy falls but reward falls too
        ([(0.4, 0.6), (0.3, 0.5), (0.2, 0.4)], []),
        # diverging, recovering, then diverging twice again
        ([(0.1, 0.5), (0.2, 0.4), (0.3, 0.6), (0.4, 0.5), (0.5, 0.4)], [5]),
        # keeps diverging: one warning
        ([(0.1 * i, 1.0 - 0.1 * i) for i in range(1, 8)], [3]),
    ],
)
def test_reward_up_eval_down_warning(pairs, steps):
    assert _warning_steps(HealthMonitor(), _run(pairs)) == steps


def test_report_writes_named_warnings_and_counts_them():
    monitor = HealthMonitor(name="grpo", zero_grad_steps=2, zero_variance_steps=2)
    written: list[str] = []
    counts = [
        monitor.report(
            {"train/grad_norm": 0.0, "grpo/zero_variance_fraction": 1.0}, s, written.append
        )
        for s in (1, 2, 3)
    ]
    assert counts == [0.0, 2.0, 2.0]
    assert len(written) == 2
    assert written[0].startswith("[grpo] warning: step 2: train/grad_norm has been zero for 2")
    assert written[1].startswith("[grpo] warning: step 2: grpo/zero_variance_fraction")


@pytest.mark.parametrize("field", ["zero_grad_steps", "zero_variance_steps", "diverging_evals"])
def test_monitor_rejects_non_positive_windows(field):
    with pytest.raises(ValueError, match=f"HealthMonitor.{field} must be >= 1, got 0"):
        HealthMonitor(**{field: 0})
