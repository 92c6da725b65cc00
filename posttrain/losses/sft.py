"""Supervised fine-tuning loss: masked negative log-likelihood."""

from __future__ import annotations

from torch import Tensor


def sft_loss(logprobs_BT: Tensor, loss_mask_BT: Tensor, num_tokens: int) -> Tensor:
    """`-sum(mask * logp) / num_tokens`: the mean NLL over every loss token of the batch.

    `num_tokens` is the count over the whole optimizer batch, so summing this over micro-batches
    gives the full-batch mean.
    """
    mask = loss_mask_BT.to(logprobs_BT.dtype)
    return -(logprobs_BT * mask).sum() / max(num_tokens, 1)
