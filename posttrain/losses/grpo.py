"""GRPO's clipped surrogate with an optional KL penalty (DeepSeekMath, Shao et al. 2024, eq. 3).

Per completion token t of sample i:

    ratio   = exp(logp - logp_old)
    pg      = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
    kl      = exp(ref - logp) - (ref - logp) - 1            (k3 estimator, eq. 4)
    loss_it = pg + beta * kl

Aggregation: `sequence` averages each completion's tokens, then the completions (the paper's
1/G sum_i 1/|o_i| sum_t); `token` divides the sum over all tokens by the batch's token count
(DAPO). Both divide by whole-batch counts, so micro-batch losses add up to the batch loss.
TRL's `GRPOTrainer._compute_loss` computes the same quantities (`loss_type="grpo"`/`"dapo"`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def grpo_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_B: Tensor,
    mask_BT: Tensor,
    *,
    num_sequences: int,
    num_tokens: int,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs_BT: Tensor | None = None,
    aggregation: Literal["sequence", "token"] = "sequence",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Return the loss and per-token statistics (already aggregated like the loss)."""
    mask = mask_BT.to(logprobs_BT.dtype)
    ratio = torch.exp(logprobs_BT - old_logprobs_BT)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages_B.to(logprobs_BT.dtype).unsqueeze(-1)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * advantages
    per_token = -torch.min(unclipped, clipped)
    stats = {"clip_fraction": (unclipped > clipped).to(mask.dtype)}
    if beta != 0.0:
        if ref_logprobs_BT is None:
            raise ValueError("beta != 0 needs ref_logprobs_BT")
        delta = ref_logprobs_BT - logprobs_BT
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl"] = kl
    reduce = _aggregate_sequence if aggregation == "sequence" else _aggregate_token
    loss = reduce(per_token, mask, num_sequences, num_tokens)
    return loss, {k: reduce(v.detach(), mask, num_sequences, num_tokens) for k, v in stats.items()}


def _aggregate_sequence(x_BT: Tensor, mask_BT: Tensor, num_sequences: int, _: int) -> Tensor:
    per_seq = (x_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)
    return per_seq.sum() / max(num_sequences, 1)


def _aggregate_token(x_BT: Tensor, mask_BT: Tensor, _: int, num_tokens: int) -> Tensor:
    return (x_BT * mask_BT).sum() / max(num_tokens, 1)
