"""PPO's clipped policy surrogate and clipped value loss, per token with a mask.

Policy (Schulman et al. 2017, eq. 7), per valid token:

    ratio = exp(logp - logp_old)
    loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

Value (OpenAI baselines `ppo2`, TRL's former `PPOTrainer`, OpenRLHF `ValueLoss`):

    V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
    loss   = 0.5 * max((V - R)^2, (V_clip - R)^2)

Both are token means over the mask, divided by `num_tokens` (the whole optimizer batch's count,
so micro-batch losses add up; default: this call's count). Tests: `tests/test_ppo_math.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PolicyLoss:
    loss: Tensor
    """Scalar clipped surrogate loss (to minimise)."""
    clip_fraction: Tensor
    """Share of valid tokens where the clipped term was selected (no gradient flows)."""
    approx_kl: Tensor
    """Mean k3 estimate of KL(pi_old || pi): (ratio - 1) - log ratio (Schulman 2020)."""

    def metrics(self) -> dict[str, Tensor]:
        return {
            "ppo/policy_loss": self.loss.detach(),
            "ppo/clip_fraction": self.clip_fraction,
            "ppo/approx_kl": self.approx_kl,
        }


@dataclass(frozen=True)
class ValueLoss:
    loss: Tensor
    """Scalar 0.5 * max(unclipped, clipped) squared error."""
    clip_fraction: Tensor
    """Share of valid tokens where the clipped error was the larger one."""

    def metrics(self) -> dict[str, Tensor]:
        return {"ppo/value_loss": self.loss.detach(), "ppo/value_clip_fraction": self.clip_fraction}


def ppo_policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    num_tokens: int | None = None,
) -> PolicyLoss:
    """Clipped surrogate, Schulman et al. 2017 eq. 7 (negated); per-token advantages."""
    _same_shape(
        logprobs=logprobs_BT, old_logprobs=old_logprobs_BT, advantages=advantages_BT, mask=mask_BT
    )
    mask = mask_BT.to(logprobs_BT.dtype)
    count = _count(mask, num_tokens)
    log_ratio = logprobs_BT - old_logprobs_BT
    ratio = log_ratio.exp()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = ratio * advantages_BT
    clipped = ratio.clamp(1 - clip_eps, 1 + high) * advantages_BT
    per_token = -torch.min(unclipped, clipped)
    with torch.no_grad():
        clip_fraction = ((unclipped > clipped).to(mask.dtype) * mask).sum() / count
        approx_kl = (((ratio - 1) - log_ratio) * mask).sum() / count
    return PolicyLoss((per_token * mask).sum() / count, clip_fraction, approx_kl)


def ppo_value_loss(
    values_BT: Tensor,
    old_values_BT: Tensor,
    returns_BT: Tensor,
    mask_BT: Tensor,
    *,
    clip_range: float | None = 0.2,
    num_tokens: int | None = None,
) -> ValueLoss:
    """Clipped value loss (baselines ppo2); `clip_range=None` gives plain 0.5 * (V - R)^2."""
    _same_shape(values=values_BT, old_values=old_values_BT, returns=returns_BT, mask=mask_BT)
    mask = mask_BT.to(values_BT.dtype)
    count = _count(mask, num_tokens)
    unclipped = (values_BT - returns_BT) ** 2
    if clip_range is None:
        per_token, clipped_used = unclipped, torch.zeros_like(unclipped)
    else:
        v_clip = old_values_BT + (values_BT - old_values_BT).clamp(-clip_range, clip_range)
        clipped = (v_clip - returns_BT) ** 2
        per_token, clipped_used = torch.max(unclipped, clipped), (clipped > unclipped)
    with torch.no_grad():
        clip_fraction = (clipped_used.to(mask.dtype) * mask).sum() / count
    return ValueLoss(0.5 * (per_token * mask).sum() / count, clip_fraction)


def explained_variance(values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens (population variances, as baselines'
    `explained_variance`); NaN when the returns have no variance. 1 = perfect critic,
    0 = no better than a constant, < 0 = worse."""
    _same_shape(values=values_BT, returns=returns_BT, mask=mask_BT)
    valid = mask_BT != 0
    returns, values = returns_BT[valid].detach(), values_BT[valid].detach()
    if returns.numel() == 0 or returns.var(unbiased=False) == 0:
        return torch.tensor(float("nan"), dtype=returns_BT.dtype)
    return 1 - (returns - values).var(unbiased=False) / returns.var(unbiased=False)


def _count(mask: Tensor, num_tokens: int | None) -> float:
    return float(max(int(mask.sum()) if num_tokens is None else num_tokens, 1))


def _same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of one [B, T] shape, got {shapes}")
