"""Per-token PPO advantages: KL-shaped rewards and generalised advantage estimation.

`kl_penalized_rewards` builds the RLHF per-token reward (Ziegler et al. 2019, eq. 2;
Ouyang et al. 2022, eq. 2): every valid token pays `-beta * kl_t`, and the sequence's scalar
score is added on its last valid token. `gae` runs GAE(gamma, lambda) (Schulman et al. 2016,
eq. 16) backwards over the valid tokens of each row, bootstrapping with 0 after the last valid
token (the episode ends there, as in TRL's former PPOTrainer and OpenRLHF; a truncated
completion is not bootstrapped). Rows are [B, T] with one contiguous run of valid tokens (the
completion), so prompt positions on the left and padding on the right are both allowed.
Tests: `tests/test_advantages.py` (a 3-step example worked by hand).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GAEOutput:
    advantages_BT: Tensor
    """A_t = sum_l (gamma * lambda)^l delta_{t+l}; 0 on invalid positions."""
    returns_BT: Tensor
    """A_t + V_t: the value-function target; 0 on invalid positions."""


def last_valid_index(mask_BT: Tensor) -> Tensor:
    """Index of the last nonzero position of each row; raises if a row has no valid token or
    its valid tokens are not one contiguous run."""
    if mask_BT.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask_BT.shape)}")
    valid = mask_BT != 0
    counts = valid.sum(dim=1)
    positions = torch.arange(mask_BT.shape[1], device=mask_BT.device).expand_as(mask_BT)
    last = torch.where(valid, positions, -1).max(dim=1).values
    first = torch.where(valid, positions, mask_BT.shape[1]).min(dim=1).values
    for row in range(mask_BT.shape[0]):
        if counts[row] == 0:
            raise ValueError(f"mask row {row} has no valid token")
        if last[row] - first[row] + 1 != counts[row]:
            raise ValueError(
                f"mask row {row} is not one contiguous run of valid tokens: {mask_BT[row].tolist()}"
            )
    return last


def kl_penalized_rewards(scores_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, beta: float) -> Tensor:
    """Per-token rewards `r_t = -beta * kl_t`, plus `score` on the last valid token.

    Ziegler et al. 2019 eq. 2 / Ouyang et al. 2022 eq. 2: R(x, y) = r(x, y) - beta log(pi/pi_ref),
    spread per token. `kl_BT` is any per-token estimate (usually k1, see losses/kl.py).
    Invalid positions get 0.
    """
    if kl_BT.shape != mask_BT.shape or scores_B.shape != kl_BT.shape[:1]:
        raise ValueError(
            f"expected scores [B], kl [B, T] and mask [B, T], got {tuple(scores_B.shape)}, "
            f"{tuple(kl_BT.shape)}, {tuple(mask_BT.shape)}"
        )
    m = mask_BT.to(kl_BT.dtype)
    rewards = -beta * kl_BT * m
    rows = torch.arange(kl_BT.shape[0], device=kl_BT.device)
    last = last_valid_index(mask_BT)
    return rewards.index_put((rows, last), scores_B.to(kl_BT.dtype), accumulate=True)


def gae(
    rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, *, gamma: float, lam: float
) -> GAEOutput:
    """GAE(gamma, lambda), Schulman et al. 2016, eqs. 11-16.

    `delta_t = r_t + gamma V_{t+1} - V_t` and `A_t = delta_t + gamma lambda A_{t+1}`, with
    rewards and values zeroed outside the mask so V after the last valid token is 0.
    """
    if not (rewards_BT.shape == values_BT.shape == mask_BT.shape):
        raise ValueError(
            f"rewards {tuple(rewards_BT.shape)}, values {tuple(values_BT.shape)} and mask "
            f"{tuple(mask_BT.shape)} must all be [B, T]"
        )
    last_valid_index(mask_BT)  # validates the layout
    m = mask_BT.to(values_BT.dtype)
    rewards, values = rewards_BT * m, values_BT * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # Before the completion (prompt positions) nothing is valid: keep A and V at 0 there.
        running = running * m[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return GAEOutput(advantages, (advantages + values) * m)
