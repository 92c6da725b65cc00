"""PPO policy and value losses, and explained variance, against values derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.ppo import explained_variance, ppo_policy_loss, ppo_value_loss

T = torch.tensor


def test_policy_loss_on_policy_is_minus_mean_advantage():
    logprobs = T([[-0.3, -1.0, -2.0]])
    # ratio 1: -(1 + -2) / 2 valid tokens = 0.5; the padded advantage 5 is ignored
    out = ppo_policy_loss(logprobs, logprobs, T([[1.0, -2.0, 5.0]]), T([[1, 1, 0]]))
    assert out.loss.item() == pytest.approx(0.5)
    assert out.clip_fraction.item() == 0.0
    assert out.approx_kl.item() == 0.0


@pytest.mark.parametrize(
    ("new_p", "advantage", "loss", "clipped"),
    [
        (0.6, 1.0, -1.2, 1.0),  # ratio 1.5 > 1.2 with A > 0: clipped to 1.2
        (0.6, -1.0, 1.5, 0.0),  # A < 0: min(-1.5, -1.2) = -1.5, unclipped
        (0.2, -1.0, 0.8, 1.0),  # ratio 0.5 < 0.8 with A < 0: min(-0.5, -0.8) = -0.8
        (0.2, 1.0, -0.5, 0.0),  # A > 0: min(0.5, 0.8) = 0.5, unclipped
    ],
)
def test_policy_loss_clipping_table(new_p, advantage, loss, clipped):
    old, new = T([[math.log(0.4)]]), T([[math.log(new_p)]])
    out = ppo_policy_loss(new, old, T([[advantage]]), T([[1]]), clip_eps=0.2)
    assert out.loss.item() == pytest.approx(loss)
    assert out.clip_fraction.item() == clipped


def test_policy_loss_asymmetric_clip_and_approx_kl():
    old, new = T([[0.0]]), T([[math.log(1.5)]])
    out = ppo_policy_loss(new, old, T([[1.0]]), T([[1]]), clip_eps=0.2, clip_eps_high=0.28)
    assert out.loss.item() == pytest.approx(-1.28)
    # k3 of KL(old || new): (ratio - 1) - log ratio = 0.5 - log 1.5 = 0.0945349
    assert out.approx_kl.item() == pytest.approx(0.5 - math.log(1.5))


def test_policy_gradient_and_clipped_tokens_get_none():
    logprobs = T([[0.0, 0.0, math.log(1.5)]], requires_grad=True)
    old = T([[0.0, 0.0, 0.0]])
    out = ppo_policy_loss(logprobs, old, T([[1.0, -2.0, 1.0]]), T([[1, 1, 1]]))
    out.loss.backward()
    # ratio 1 tokens: d(-ratio A)/dlogp = -A, divided by 3 tokens; the clipped token: 0
    torch.testing.assert_close(logprobs.grad, T([[-1 / 3, 2 / 3, 0.0]]))


def test_policy_loss_micro_batches_sum_to_full_batch():
    g = torch.Generator().manual_seed(0)
    logprobs, old = -torch.rand(4, 5, generator=g), -torch.rand(4, 5, generator=g)
    adv = torch.randn(4, 5, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).long()
    n = int(mask.sum())
    full = ppo_policy_loss(logprobs, old, adv, mask).loss
    parts = sum(
        ppo_policy_loss(logprobs[s], old[s], adv[s], mask[s], num_tokens=n).loss
        for s in (slice(0, 2), slice(2, 4))
    )
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


@pytest.mark.parametrize(
    ("value", "loss", "clipped"),
    [
        # old V 1, return 2, clip 0.2
        (1.5, 0.5 * 0.64, 1.0),  # unclipped 0.25, V_clip 1.2 -> 0.64: the larger wins
        (0.5, 0.5 * 2.25, 0.0),  # unclipped 2.25, V_clip 0.8 -> 1.44
        (1.1, 0.5 * 0.81, 0.0),  # inside the range: both 0.81
    ],
)
def test_value_loss_table(value, loss, clipped):
    out = ppo_value_loss(T([[value, 7.0]]), T([[1.0, 0.0]]), T([[2.0, 0.0]]), T([[1, 0]]))
    assert out.loss.item() == pytest.approx(loss)
    assert out.clip_fraction.item() == clipped


def test_value_loss_without_clipping_and_gradients():
    values = T([[1.5, 0.5]], requires_grad=True)
    old, returns, mask = T([[1.0, 1.0]]), T([[2.0, 2.0]]), T([[1, 1]])
    plain = ppo_value_loss(values, old, returns, mask, clip_range=None)
    assert plain.loss.item() == pytest.approx(0.5 * (0.25 + 2.25) / 2)
    ppo_value_loss(values, old, returns, mask).loss.backward()
    # token 0: clipped branch wins and is constant in V -> 0; token 1: (V - R) / 2 tokens
    torch.testing.assert_close(values.grad, T([[0.0, -0.75]]))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 1.0),  # perfect critic
        ([2.0, 3.0, 4.0, 5.0], 1.0),  # constant offset: residual has no variance
        ([2.5, 2.5, 2.5, 2.5], 0.0),  # the mean return
        # residual (-3, -1, 1, 3): var 5; returns var 1.25 -> 1 - 4
        ([4.0, 3.0, 2.0, 1.0], -3.0),
    ],
)
def test_explained_variance(values, expected):
    returns, mask = T([[1.0, 2.0, 3.0, 4.0, 50.0]]), T([[1, 1, 1, 1, 0]])
    ev = explained_variance(T([values + [-50.0]]), returns, mask)
    assert ev.item() == pytest.approx(expected)


def test_explained_variance_of_constant_returns_is_nan():
    assert math.isnan(explained_variance(T([[1.0, 2.0]]), T([[3.0, 3.0]]), T([[1, 1]])).item())


def test_shape_mismatch_names_the_tensors():
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3))
