"""GRPO's clipped surrogate with an optional KL penalty (DeepSeekMath, Shao et al. 2024, eq. 3).

Per completion token t of sample i:

    ratio   = exp(logp - logp_old)
    pg      = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
    kl      = exp(ref - logp) - (ref - logp) - 1            (k3 estimator, eq. 4; see losses/kl.py)
    loss_it = pg + beta * kl

Aggregation: `sequence` averages each completion's tokens, then the completions (the paper's
1/G sum_i 1/|o_i| sum_t); `token` divides the sum over all tokens by the batch's token count
(DAPO, Yu et al. 2025, sec. 3.3); `constant` divides the sum by num_sequences * a fixed
`max_completion_length` (Dr. GRPO, Liu et al. 2025, sec. 3.2: no length bias from 1/|o_i|).
All divide by whole-batch counts, so micro-batch losses add up to the batch loss.
TRL's `GRPOTrainer._compute_loss` computes the same quantities (`loss_type="grpo"`, `"dapo"`
or `"bnpo"` for one micro-batch, `"dr_grpo"`); `tests/test_grpo_variants.py` checks that.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from posttrain.losses.kl import KLEstimator, kl_estimate

Aggregation = Literal["sequence", "token", "constant"]


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
    aggregation: Aggregation = "sequence",
    kl_estimator: KLEstimator = "k3",
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Return the loss and per-token statistics.

    Statistics are aggregated like the loss for `sequence` and `token`; for `constant` they are
    token means (a clip fraction divided by a padded length would not be a fraction).
    `max_completion_length` is required by, and only used for, `aggregation="constant"`.
    """
    if aggregation not in _REDUCERS:
        raise ValueError(f"aggregation must be one of {sorted(_REDUCERS)}, got {aggregation!r}")
    if aggregation == "constant" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(
            "aggregation='constant' needs max_completion_length >= 1 (the generation limit), "
            f"got {max_completion_length!r}"
        )
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
        kl = kl_estimate(logprobs_BT, ref_logprobs_BT, kl_estimator)
        per_token = per_token + beta * kl
        stats["kl"] = kl
    loss = _REDUCERS[aggregation](per_token, mask, num_sequences, num_tokens, max_completion_length)
    reduce_stats = _REDUCERS["token" if aggregation == "constant" else aggregation]
    return loss, {
        k: reduce_stats(v.detach(), mask, num_sequences, num_tokens, max_completion_length)
        for k, v in stats.items()
    }


def _aggregate_sequence(
    x_BT: Tensor, mask_BT: Tensor, num_sequences: int, _: int, __: int | None
) -> Tensor:
    per_seq = (x_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)
    return per_seq.sum() / max(num_sequences, 1)


def _aggregate_token(
    x_BT: Tensor, mask_BT: Tensor, _: int, num_tokens: int, __: int | None
) -> Tensor:
    return (x_BT * mask_BT).sum() / max(num_tokens, 1)


def _aggregate_constant(
    x_BT: Tensor, mask_BT: Tensor, num_sequences: int, _: int, max_len: int | None
) -> Tensor:
    assert max_len is not None  # checked in grpo_loss
    return (x_BT * mask_BT).sum() / (max(num_sequences, 1) * max_len)


_REDUCERS = {
    "sequence": _aggregate_sequence,
    "token": _aggregate_token,
    "constant": _aggregate_constant,
}
