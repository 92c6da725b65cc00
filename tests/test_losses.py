"""Loss and advantage math against values derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.advantages import STD_EPS, group_advantages, zero_variance_groups
from posttrain.logprobs import logprobs_from_logits
from posttrain.losses.grpo import grpo_loss
from posttrain.losses.sft import sft_loss


def test_sft_loss_is_mean_nll_over_masked_tokens():
    logprobs = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, -4.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert sft_loss(logprobs, mask, num_tokens=3).item() == pytest.approx(7 / 3)


def test_sft_loss_micro_batches_sum_to_full_batch():
    logprobs = -torch.rand(4, 5)
    mask = (torch.rand(4, 5) > 0.3).long()
    full = sft_loss(logprobs, mask, int(mask.sum()))
    parts = sum(sft_loss(logprobs[i : i + 1], mask[i : i + 1], int(mask.sum())) for i in range(4))
    assert parts.item() == pytest.approx(full.item())


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    adv = group_advantages(rewards)
    # mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    expected = 0.5 / (math.sqrt(1 / 3) + STD_EPS)
    assert adv[0].tolist() == pytest.approx([expected, -expected, -expected, expected])
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert zero_variance_groups(rewards).tolist() == [False, True]


def test_group_advantages_without_std_scaling_are_mean_centred():
    rewards = torch.tensor([[2.0, 0.0, 1.0]])
    assert group_advantages(rewards, scale=False)[0].tolist() == pytest.approx([1.0, -1.0, 0.0])


MASK = torch.tensor([[0, 1, 1], [0, 1, 0]])


def test_grpo_loss_on_policy_sequence_and_token_aggregation():
    logprobs = torch.tensor([[0.0, -0.5, -1.0], [0.0, -2.0, -9.0]])
    adv = torch.tensor([1.0, -2.0])
    kwargs = dict(num_sequences=2, num_tokens=3)
    # ratio == 1: per-token loss is -A. Sequence: mean(-1, -1) = -1 and 2 -> (-1 + 2) / 2.
    seq, _ = grpo_loss(logprobs, logprobs.detach(), adv, MASK, aggregation="sequence", **kwargs)
    assert seq.item() == pytest.approx(0.5)
    # Token: (-1 - 1 + 2) / 3 = 0.
    tok, _ = grpo_loss(logprobs, logprobs.detach(), adv, MASK, aggregation="token", **kwargs)
    assert tok.item() == pytest.approx(0.0)


def test_grpo_loss_gradient_is_minus_advantage_over_length():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    loss, _ = grpo_loss(logprobs, logprobs.detach(), adv, MASK, num_sequences=2, num_tokens=3)
    loss.backward()
    # d/dlogp of -ratio*A at ratio 1 is -A; each sequence's tokens are averaged, then / 2.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0, -0.25, -0.25], [0, 1.0, 0]]))


@pytest.mark.parametrize(
    ("advantage", "expected"),
    [
        (1.0, -1.2),  # ratio 1.5 clipped to 1 + eps = 1.2 for a positive advantage
        (-1.0, 1.5),  # negative advantage: the unclipped (pessimistic) term wins
    ],
)
def test_grpo_loss_clipping(advantage, expected):
    mask = torch.tensor([[0, 1]])
    old = torch.tensor([[0.0, math.log(0.4)]])
    new = torch.tensor([[0.0, math.log(0.6)]])  # ratio 1.5
    loss, stats = grpo_loss(
        new, old, torch.tensor([advantage]), mask, num_sequences=1, num_tokens=1, clip_eps=0.2
    )
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_fraction"].item() == (1.0 if advantage > 0 else 0.0)


def test_grpo_loss_asymmetric_clip_upper_bound():
    mask = torch.tensor([[0, 1]])
    old, new = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(1.5)]])
    loss, _ = grpo_loss(
        new, old, torch.tensor([1.0]), mask, num_sequences=1, num_tokens=1, clip_eps_high=0.28
    )
    assert loss.item() == pytest.approx(-1.28)


def test_grpo_loss_k3_kl_term():
    mask = torch.tensor([[0, 1]])
    logprobs = torch.tensor([[0.0, math.log(0.25)]])
    ref = torch.tensor([[0.0, math.log(0.5)]])  # ref - logp = log 2
    loss, stats = grpo_loss(
        logprobs,
        logprobs,
        torch.tensor([0.0]),
        mask,
        num_sequences=1,
        num_tokens=1,
        beta=0.1,
        ref_logprobs_BT=ref,
    )
    kl = 2 - math.log(2) - 1
    assert stats["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl)


def test_grpo_loss_needs_reference_when_beta_nonzero():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logprobs_BT"):
        grpo_loss(x, x, torch.ones(1), torch.ones(1, 2), num_sequences=1, num_tokens=2, beta=0.1)


def test_grpo_micro_batches_sum_to_full_batch():
    torch.manual_seed(0)
    logprobs, old = -torch.rand(4, 6), -torch.rand(4, 6)
    mask = (torch.rand(4, 6) > 0.3).long()
    mask[:, 1] = 1
    adv = torch.randn(4)
    for aggregation in ("sequence", "token"):
        kw = dict(num_sequences=4, num_tokens=int(mask.sum()), aggregation=aggregation)
        full, _ = grpo_loss(logprobs, old, adv, mask, **kw)
        parts = sum(
            grpo_loss(logprobs[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], **kw)[0]
            for i in (0, 2)
        )
        assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_logprobs_from_logits_matches_log_softmax_and_is_aligned():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    ids = torch.randint(0, 7, (2, 4))
    out = logprobs_from_logits(logits, ids)
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert out.shape == (2, 4)
    assert out[:, 0].tolist() == [0.0, 0.0]
    torch.testing.assert_close(out[:, 1:], expected)
