"""Advantage estimators: pure functions of the rewards of a batch of groups.

Outcome advantages (one value per sample) for GRPO, Dr. GRPO and RLOO, the zero-variance
group test, and masked whitening of per-token advantages (PPO). GAE lives in `gae.py`.
Tests: `tests/test_losses.py`, `tests/test_advantages.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

STD_EPS = 1e-4  # as TRL's GRPOTrainer, so groups with tiny spread do not explode
WHITEN_EPS = 1e-8  # as the PPO implementations' masked_whiten (TRL, OpenRLHF)


def group_advantages(rewards_GN: Tensor, scale: bool = True) -> Tensor:
    """GRPO outcome advantages (DeepSeekMath sec. 4.1.2): `(r - mean(group)) / std(group)`.

    `rewards_GN` holds G groups of N samples. The std is the unbiased one (as `torch.std`,
    and TRL); `scale=False` keeps only the mean-centring (Dr. GRPO, Liu et al. 2025, sec. 3.2:
    the std division weights easy and hard questions unequally).
    """
    centred = rewards_GN - rewards_GN.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards_GN.std(dim=1, keepdim=True) + STD_EPS)


def zero_variance_groups(rewards_GN: Tensor) -> Tensor:
    """Boolean per group: every sample of the group got the same reward (no learning signal)."""
    return (rewards_GN == rewards_GN[:, :1]).all(dim=1)


def zero_variance_fraction(rewards_GN: Tensor) -> float:
    """Fraction of groups whose samples all scored the same (DAPO's dynamic-sampling signal)."""
    if rewards_GN.shape[0] == 0:
        raise ValueError(
            "zero_variance_fraction needs at least one group, got rewards of shape (0, N)"
        )
    return zero_variance_groups(rewards_GN).float().mean().item()


def rloo_advantages(rewards_GN: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, sec. 3; Kool et al. 2019).

    `A_i = r_i - 1/(N-1) sum_{j != i} r_j`, which equals `N/(N-1) * (r_i - mean(group))`.
    Needs N >= 2 samples per group.
    """
    if rewards_GN.dim() != 2 or rewards_GN.shape[1] < 2:
        raise ValueError(
            "rloo_advantages needs rewards of shape (G, N) with N >= 2 samples per group, "
            f"got {tuple(rewards_GN.shape)}"
        )
    n = rewards_GN.shape[1]
    baseline = (rewards_GN.sum(dim=1, keepdim=True) - rewards_GN) / (n - 1)
    return rewards_GN - baseline


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the positions where `mask` is nonzero (all dims)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def whiten(x_BT: Tensor, mask_BT: Tensor, shift_mean: bool = True) -> Tensor:
    """Masked whitening of per-token values, as PPO implementations do for GAE advantages.

    `(x - mean) / sqrt(var + 1e-8)` with mean and the unbiased (Bessel-corrected) variance taken
    over valid tokens only, as TRL's former `masked_whiten` and OpenRLHF. `shift_mean=False`
    adds the mean back (rescale only). Padding positions come back as 0.
    """
    if x_BT.shape != mask_BT.shape:
        raise ValueError(f"x {tuple(x_BT.shape)} and mask {tuple(mask_BT.shape)} differ in shape")
    count = int(mask_BT.sum())
    if count < 2:
        raise ValueError(f"whiten needs at least 2 valid tokens for a variance, got {count}")
    m = mask_BT.to(x_BT.dtype)
    mean = masked_mean(x_BT, m)
    var = masked_mean((x_BT - mean) ** 2, m) * count / (count - 1)
    out = (x_BT - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * m
