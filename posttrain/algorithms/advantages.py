"""Advantage estimators: pure functions of the rewards of a batch of groups."""

from __future__ import annotations

from torch import Tensor

STD_EPS = 1e-4  # as TRL's GRPOTrainer, so groups with tiny spread do not explode


def group_advantages(rewards_GN: Tensor, scale: bool = True) -> Tensor:
    """GRPO outcome advantages (DeepSeekMath sec. 4.1.2): `(r - mean(group)) / std(group)`.

    `rewards_GN` holds G groups of N samples. The std is the unbiased one (as `torch.std`,
    and TRL); `scale=False` keeps only the mean-centring (Dr. GRPO).
    """
    centred = rewards_GN - rewards_GN.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards_GN.std(dim=1, keepdim=True) + STD_EPS)


def zero_variance_groups(rewards_GN: Tensor) -> Tensor:
    """Boolean per group: every sample of the group got the same reward (no learning signal)."""
    return (rewards_GN == rewards_GN[:, :1]).all(dim=1)
