"""KL estimators and GRPO loss variants: by hand, and against TRL 1.16's `GRPOTrainer`.

TRL computes the GRPO loss inside `GRPOTrainer._compute_loss`, after a model forward. The
cross-checks call that real method unbound, with a namespace holding the attributes it reads
and a `_get_per_token_logps_and_entropies` that returns the given per-token log-probabilities
(the model forward is the only part replaced; the loss, KL and aggregation code is TRL's).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses.grpo import grpo_loss
from posttrain.losses.kl import kl_estimate, kl_k1, kl_k2, kl_k3

LOG2 = math.log(2)
T = torch.tensor


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("k1", -LOG2),  # log 0.25 - log 0.5
        ("k2", 0.5 * LOG2**2),  # r = log 2: r^2 / 2 = 0.2402265
        ("k3", 2 - LOG2 - 1),  # e^r - r - 1 = 0.3068528
    ],
)
def test_kl_estimators_by_hand(estimator, expected):
    logp, ref = T([math.log(0.25)]), T([math.log(0.5)])
    assert kl_estimate(logp, ref, estimator).item() == pytest.approx(expected)


def test_k1_and_k3_are_unbiased_under_the_sampling_policy():
    # p = [1/2, 1/4, 1/4], q = [1/4, 1/4, 1/2]:
    # KL(p||q) = 1/2 log 2 + 0 + 1/4 log(1/2) = 1/4 log 2. E_p[k1] and E_p[k3] equal it exactly.
    p, q = T([0.5, 0.25, 0.25]).double(), T([0.25, 0.25, 0.5]).double()
    for fn in (kl_k1, kl_k3):
        assert (p * fn(p.log(), q.log())).sum().item() == pytest.approx(0.25 * LOG2)
    # k2 is biased: E_p[r^2/2] = 1/2 (1/2 log^2 2 + 1/4 log^2 2) = 3/8 log^2 2
    assert (p * kl_k2(p.log(), q.log())).sum().item() == pytest.approx(0.375 * LOG2**2)


def test_kl_estimate_rejects_unknown_names_and_shapes():
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(torch.zeros(2), torch.zeros(3))


MASK = T([[0, 1, 1], [0, 1, 0]])


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        # ratio 1: per-token loss -A; row 0 tokens (-1, -1), row 1 token (-2)
        ("sequence", (-1 + -2) / 2),
        ("token", -4 / 3),
        ("constant", -4 / (2 * 4)),  # sum / (num_sequences * max_completion_length 4)
    ],
)
def test_aggregations_by_hand(aggregation, expected):
    logprobs = T([[0.0, -0.5, -1.0], [0.0, -2.0, -9.0]])
    loss, stats = grpo_loss(
        logprobs,
        logprobs,
        T([1.0, 2.0]),
        MASK,
        num_sequences=2,
        num_tokens=3,
        aggregation=aggregation,
        max_completion_length=4,
    )
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_fraction"].item() == 0.0


def test_constant_aggregation_gradient_is_length_independent():
    # Dr. GRPO: every token's gradient is -A / (num_sequences * max_len), whatever |o_i| is.
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo_loss(
        logprobs,
        logprobs.detach(),
        T([1.0, 2.0]),
        MASK,
        num_sequences=2,
        num_tokens=3,
        aggregation="constant",
        max_completion_length=4,
    )
    loss.backward()
    torch.testing.assert_close(logprobs.grad, T([[0, -1 / 8, -1 / 8], [0, -2 / 8, 0]]))


def test_constant_aggregation_needs_max_length_and_unknown_aggregation_fails():
    x = torch.zeros(1, 2)
    kw = dict(num_sequences=1, num_tokens=2)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(x, x, torch.ones(1), torch.ones(1, 2), aggregation="constant", **kw)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(x, x, torch.ones(1), torch.ones(1, 2), aggregation="mean", **kw)


@pytest.mark.parametrize(("estimator", "kl"), [("k1", -LOG2), ("k2", 0.5 * LOG2**2)])
def test_grpo_loss_takes_other_kl_estimators(estimator, kl):
    mask = T([[0, 1]])
    logprobs, ref = T([[0.0, math.log(0.25)]]), T([[0.0, math.log(0.5)]])
    loss, stats = grpo_loss(
        logprobs,
        logprobs,
        T([0.0]),
        mask,
        num_sequences=1,
        num_tokens=1,
        beta=0.1,
        ref_logprobs_BT=ref,
        kl_estimator=estimator,
    )
    assert stats["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl)


# ---- cross-checks against TRL 1.16 on the same random inputs --------------------------------


def _identity(x, **_):
    return x


def _random_batch(b: int = 8, t: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, t, dtype=torch.long)
    for row, length in enumerate(torch.randint(1, t + 1, (b,), generator=g).tolist()):
        mask[row, :length] = 1
    logprobs = -2 * torch.rand(b, t, generator=g)
    old = logprobs + 0.4 * torch.randn(b, t, generator=g)  # off-policy: ratios get clipped
    ref = logprobs + 0.3 * torch.randn(b, t, generator=g)
    return logprobs, old, ref, torch.randn(b, generator=g), mask


def _trl_grpo(loss_type, logprobs, old, ref, advantages, mask, *, beta, eps_low, eps_high, max_len):
    from trl.trainer.grpo_trainer import GRPOTrainer

    accelerator = SimpleNamespace(
        num_processes=1,
        gather=_identity,
        gather_for_metrics=_identity,
        reduce=_identity,
        sync_gradients=True,
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(mask), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=accelerator,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    b = mask.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize(
    ("trl_loss_type", "aggregation"),
    [("grpo", "sequence"), ("bnpo", "token"), ("dapo", "token"), ("dr_grpo", "constant")],
)
@pytest.mark.parametrize(("beta", "eps_high"), [(0.0, 0.2), (0.04, 0.28)])
def test_matches_trl_grpo_trainer(trl_loss_type, aggregation, beta, eps_high):
    logprobs, old, ref, advantages, mask = _random_batch(seed=len(trl_loss_type))
    max_len = mask.shape[1] + 2  # a generation limit above the longest completion
    mine_in, trl_in = logprobs.clone().requires_grad_(), logprobs.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_grpo(
        trl_loss_type,
        trl_in,
        old,
        ref,
        advantages,
        mask,
        beta=beta,
        eps_low=0.2,
        eps_high=eps_high,
        max_len=max_len,
    )
    loss, stats = grpo_loss(
        mine_in,
        old,
        advantages,
        mask,
        num_sequences=mask.shape[0],
        num_tokens=int(mask.sum()),
        clip_eps=0.2,
        clip_eps_high=eps_high,
        beta=beta,
        ref_logprobs_BT=ref,
        aggregation=aggregation,
        max_completion_length=max_len,
    )
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    (loss - trl_loss).backward()
    assert mine_in.grad.abs().sum() > 0
    torch.testing.assert_close(mine_in.grad, -trl_in.grad, atol=1e-6, rtol=0)
    if aggregation != "sequence":  # TRL logs token means; ours are token means here too
        region = trl_metrics["clip_ratio/region_mean"][0]
        assert region > 0  # the inputs exercise clipping
        assert stats["clip_fraction"].item() == pytest.approx(region, abs=1e-6)
        if beta:
            assert stats["kl"].item() == pytest.approx(trl_metrics["kl"][0], abs=1e-6)
