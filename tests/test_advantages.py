"""Advantage estimators by hand: group-normalised, RLOO, whitening, KL-shaped rewards, GAE."""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms.advantages import (
    STD_EPS,
    group_advantages,
    rloo_advantages,
    whiten,
    zero_variance_fraction,
)
from posttrain.algorithms.gae import gae, kl_penalized_rewards, last_valid_index

T = torch.tensor


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        # mean 1, unbiased std sqrt((1 + 1 + 0) / 2) = 1
        (True, [1 / (1 + STD_EPS), -1 / (1 + STD_EPS), 0.0]),
        (False, [1.0, -1.0, 0.0]),  # Dr. GRPO: centred only
    ],
)
def test_group_advantages_scale_on_off(scale, expected):
    assert group_advantages(T([[2.0, 0.0, 1.0]]), scale=scale)[0].tolist() == pytest.approx(
        expected
    )


def test_zero_variance_fraction():
    rewards = T([[1.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.0, 1.0]])
    assert zero_variance_fraction(rewards) == 0.5
    with pytest.raises(ValueError, match="at least one group"):
        zero_variance_fraction(torch.zeros(0, 4))


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        # i=0: 1 - (0 + 0 + 1)/3 = 2/3; i=1: 0 - (1 + 0 + 1)/3 = -2/3
        ([1.0, 0.0, 0.0, 1.0], [2 / 3, -2 / 3, -2 / 3, 2 / 3]),
        # 3 - (1 + 2)/2 = 1.5; 1 - (3 + 2)/2 = -1.5; 2 - (3 + 1)/2 = 0
        ([3.0, 1.0, 2.0], [1.5, -1.5, 0.0]),
        ([5.0, 5.0], [0.0, 0.0]),
    ],
)
def test_rloo_leave_one_out_by_hand(rewards, expected):
    assert rloo_advantages(T([rewards]))[0].tolist() == pytest.approx(expected)


def test_rloo_is_rescaled_mean_centring():
    rewards = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rloo_advantages(rewards), group_advantages(rewards, False) * 5 / 4)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        rloo_advantages(T([[1.0]]))


@pytest.mark.parametrize(
    ("shift_mean", "expected"),
    [
        # valid 2, 4, 6: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2; padding -> 0
        (True, [-1.0, 0.0, 1.0, 0.0]),
        (False, [3.0, 4.0, 5.0, 0.0]),  # mean added back
    ],
)
def test_whiten_masked(shift_mean, expected):
    out = whiten(T([[2.0, 4.0, 6.0, 100.0]]), T([[1, 1, 1, 0]]), shift_mean=shift_mean)
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_whiten_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        whiten(T([[1.0, 2.0]]), T([[0, 1]]))


def test_kl_penalized_rewards_put_the_score_on_the_last_valid_token():
    kl = T([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, -0.5, 9.0]])
    mask = T([[1, 1, 1, 0], [0, 1, 1, 0]])
    out = kl_penalized_rewards(T([2.0, -1.0]), kl, mask, beta=0.1)
    # row 0: -0.1 * (0.1, 0.2, 0.3), score 2 on t=2; row 1: prompt at t=0, -1 + 0.05 on t=2
    expected = T([[-0.01, -0.02, 1.97, 0.0], [0.0, -0.05, -0.95, 0.0]])
    torch.testing.assert_close(out, expected)


# GAE, gamma = 0.9, lambda = 0.8 (gamma * lambda = 0.72), rewards (0, 0, 1), values
# (0.5, 0.6, 0.7), V after the last token = 0:
#   t=2: delta = 1 + 0.9 * 0 - 0.7 = 0.3                     A2 = 0.3
#   t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03                  A1 = 0.03 + 0.72 * 0.3 = 0.246
#   t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04                  A0 = 0.04 + 0.72 * 0.246 = 0.21712
# returns = A + V = (0.71712, 0.846, 1.0)
A_HAND = [0.21712, 0.246, 0.3]
R_HAND = [0.71712, 0.846, 1.0]


def test_gae_three_steps_by_hand_right_padded_and_after_a_prompt():
    # row 0: completion at t=0..2, padding at t=3 (its reward 5 and value 9 must be ignored);
    # row 1: the same completion after one prompt position.
    rewards = T([[0.0, 0.0, 1.0, 5.0], [7.0, 0.0, 0.0, 1.0]])
    values = T([[0.5, 0.6, 0.7, 9.0], [3.0, 0.5, 0.6, 0.7]])
    mask = T([[1, 1, 1, 0], [0, 1, 1, 1]])
    out = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(out.advantages_BT, T([A_HAND + [0.0], [0.0] + A_HAND]))
    torch.testing.assert_close(out.returns_BT, T([R_HAND + [0.0], [0.0] + R_HAND]))


@pytest.mark.parametrize(
    ("gamma", "lam", "expected"),
    [
        (1.0, 1.0, [1 - 0.5, 1 - 0.6, 1 - 0.7]),  # Monte Carlo return minus value
        (0.9, 0.0, [0.04, 0.03, 0.3]),  # one-step TD errors (deltas above)
    ],
)
def test_gae_limits(gamma, lam, expected):
    out = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1, 1, 1]]), gamma=gamma, lam=lam)
    assert out.advantages_BT[0].tolist() == pytest.approx(expected)


def test_gae_with_kl_shaped_rewards_end_to_end():
    # beta 0 and score 1 reproduce the hand example's rewards (0, 0, 1)
    mask = T([[1, 1, 1]])
    rewards = kl_penalized_rewards(T([1.0]), torch.full((1, 3), 0.7), mask, beta=0.0)
    out = gae(rewards, T([[0.5, 0.6, 0.7]]), mask, gamma=0.9, lam=0.8)
    assert out.advantages_BT[0].tolist() == pytest.approx(A_HAND)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        ([[1, 1, 0], [1, 0, 1]], "row 1 is not one contiguous run"),
        ([[1, 1, 0], [0, 0, 0]], "row 1 has no valid token"),
    ],
)
def test_gae_mask_layout_errors(mask, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        gae(x, x, T(mask), gamma=1.0, lam=1.0)


def test_last_valid_index():
    assert last_valid_index(T([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 1, 0]])).tolist() == [1, 3, 2]
