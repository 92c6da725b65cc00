"""Preference losses on summed sequence log-probabilities: DPO, cDPO, IPO, SimPO, RPO.

Inputs are per-pair [B] tensors: the summed completion log-probabilities of the chosen and
rejected responses under the policy and (except SimPO) the reference, plus completion token
counts where a loss normalises by length. With h = (logpi_w - logref_w) - (logpi_l - logref_l):

    sigmoid  -(1-eps) log sig(beta h) - eps log sig(-beta h)   DPO (Rafailov et al. 2023, eq. 7);
             eps > 0 is conservative DPO (Mitchell 2023), TRL's former `sigmoid` formula
    ipo      (h_avg - 1/(2 beta))^2, h_avg from per-token-averaged log-ratios
             (Azar et al. 2023, eq. 17; length averaging as TRL 1.16 `loss_type="ipo"`)
    simpo    -log sig(beta/|y_w| logpi_w - beta/|y_l| logpi_l - gamma), reference-free
             (Meng et al. 2024, eq. 6; label smoothing as TRL's CPOTrainer)
    + rpo_alpha * (-logpi_w / |y_w|)   RPO: the DPO+NLL loss of Pang et al. 2024 (Iterative
             RPO, sec. 2) and Liu et al. 2024 ("Provably mitigating overoptimization"):
             the chosen response's NLL normalised by its length

Passing both references as None makes sigmoid/ipo reference-free (log-ratios = policy
log-probabilities). Tests: `tests/test_dpo_loss.py` (by hand and against TRL 1.16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal["sigmoid", "ipo", "simpo"]


@dataclass(frozen=True)
class DPOOutput:
    loss: Tensor
    """Scalar: losses_B summed and divided by num_pairs (default: the mean)."""
    losses_B: Tensor
    """Per-pair loss (including the RPO term when rpo_alpha > 0)."""
    chosen_rewards_B: Tensor
    """Implicit reward, detached: beta * log-ratio (summed), or beta * mean logp for SimPO."""
    rejected_rewards_B: Tensor
    margins_B: Tensor
    """chosen_rewards_B - rejected_rewards_B."""
    accuracy: Tensor
    """Share of pairs whose chosen reward is strictly above the rejected one."""
    chosen_logps_B: Tensor
    """Policy log-probabilities, detached: both falling is likelihood displacement."""
    rejected_logps_B: Tensor

    def metrics(self) -> dict[str, Tensor]:
        return {
            "dpo/loss": self.loss.detach(),
            "dpo/rewards_chosen": self.chosen_rewards_B.mean(),
            "dpo/rewards_rejected": self.rejected_rewards_B.mean(),
            "dpo/margin": self.margins_B.mean(),
            "dpo/accuracy": self.accuracy,
            "dpo/logps_chosen": self.chosen_logps_B.mean(),
            "dpo/logps_rejected": self.rejected_logps_B.mean(),
        }


def rpo_nll(policy_chosen_B: Tensor, chosen_tokens_B: Tensor) -> Tensor:
    """Per-pair NLL of the chosen response, normalised by its token count: -logpi_w / |y_w|
    (RPO, Pang et al. 2024, sec. 2)."""
    _check_counts("chosen_tokens_B", chosen_tokens_B, policy_chosen_B)
    return -policy_chosen_B / chosen_tokens_B.to(policy_chosen_B.dtype)


def dpo_loss(
    policy_chosen_B: Tensor,
    policy_rejected_B: Tensor,
    ref_chosen_B: Tensor | None,
    ref_rejected_B: Tensor | None,
    *,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens_B: Tensor | None = None,
    rejected_tokens_B: Tensor | None = None,
    simpo_gamma: float = 0.0,
    rpo_alpha: float = 0.0,
    num_pairs: int | None = None,
) -> DPOOutput:
    """The preference loss named by `loss_type` (see the module docstring for the formulas).

    Token counts are required for ipo, simpo and rpo_alpha > 0. `num_pairs` is the pair count of
    the whole optimizer batch, so micro-batch losses add up to the batch loss.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError("label_smoothing applies to sigmoid and simpo, not ipo")
    if (ref_chosen_B is None) != (ref_rejected_B is None):
        raise ValueError("pass both ref_chosen_B and ref_rejected_B, or neither (reference-free)")
    if loss_type == "simpo" and ref_chosen_B is not None:
        raise ValueError("simpo is reference-free: pass ref_chosen_B=None and ref_rejected_B=None")
    shape = policy_chosen_B.shape
    for name, t in (
        ("policy_rejected_B", policy_rejected_B),
        ("ref_chosen_B", ref_chosen_B),
        ("ref_rejected_B", ref_rejected_B),
    ):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")

    chosen = policy_chosen_B - (0 if ref_chosen_B is None else ref_chosen_B)
    rejected = policy_rejected_B - (0 if ref_rejected_B is None else ref_rejected_B)
    if loss_type == "sigmoid":
        losses = _smoothed_logistic(beta * (chosen - rejected), label_smoothing)
        chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    elif loss_type == "ipo":
        n_w, n_l = _lengths(chosen_tokens_B, rejected_tokens_B, policy_chosen_B, "ipo")
        losses = (chosen / n_w - rejected / n_l - 1 / (2 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    elif loss_type == "simpo":
        n_w, n_l = _lengths(chosen_tokens_B, rejected_tokens_B, policy_chosen_B, "simpo")
        chosen_rewards, rejected_rewards = beta * chosen / n_w, beta * rejected / n_l
        losses = _smoothed_logistic(
            chosen_rewards - rejected_rewards - simpo_gamma, label_smoothing
        )
    else:
        raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'simpo', got {loss_type!r}")
    if rpo_alpha != 0.0:
        if chosen_tokens_B is None:
            raise ValueError("rpo_alpha != 0 needs chosen_tokens_B (the NLL is per token)")
        losses = losses + rpo_alpha * rpo_nll(policy_chosen_B, chosen_tokens_B)

    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    denominator = max(policy_chosen_B.numel() if num_pairs is None else num_pairs, 1)
    return DPOOutput(
        loss=losses.sum() / denominator,
        losses_B=losses,
        chosen_rewards_B=chosen_rewards,
        rejected_rewards_B=rejected_rewards,
        margins_B=chosen_rewards - rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).float().mean(),
        chosen_logps_B=policy_chosen_B.detach(),
        rejected_logps_B=policy_rejected_B.detach(),
    )


def _smoothed_logistic(z_B: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sig(z) - eps log sig(-z): the logistic loss with flipped-label rate eps."""
    return -(1 - eps) * F.logsigmoid(z_B) - eps * F.logsigmoid(-z_B)


def _lengths(
    chosen_tokens_B: Tensor | None, rejected_tokens_B: Tensor | None, like: Tensor, loss_type: str
) -> tuple[Tensor, Tensor]:
    if chosen_tokens_B is None or rejected_tokens_B is None:
        raise ValueError(f"loss_type={loss_type!r} needs chosen_tokens_B and rejected_tokens_B")
    _check_counts("chosen_tokens_B", chosen_tokens_B, like)
    _check_counts("rejected_tokens_B", rejected_tokens_B, like)
    return chosen_tokens_B.to(like.dtype), rejected_tokens_B.to(like.dtype)


def _check_counts(name: str, counts: Tensor, like: Tensor) -> None:
    if counts.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(counts.shape)}, expected {tuple(like.shape)}")
    bad = torch.nonzero(counts < 1).flatten().tolist()
    if bad:
        raise ValueError(f"{name} must be >= 1 (completion token counts); rows {bad} are not")
