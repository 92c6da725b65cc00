"""SFT: masked next-token NLL on completion tokens (or all tokens with `train_on_prompt`)."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.batch import SFTBatch, pad_right
from posttrain.losses.sft import sft_loss


def make_batch(
    examples: list[tuple[list[int], list[int]]], pad_id: int, train_on_prompt: bool = False
) -> SFTBatch:
    """Batch `(prompt_ids, completion_ids)` pairs; loss on completion tokens."""
    ids, attention = pad_right([p + c for p, c in examples], pad_id)
    loss_mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(examples):
        start = 1 if train_on_prompt else len(prompt)
        loss_mask[row, start : len(prompt) + len(completion)] = 1
    return SFTBatch(ids, attention, loss_mask, len(examples), int(loss_mask.sum()))


def loss(logprobs_BT: Tensor, batch: SFTBatch) -> tuple[Tensor, dict[str, Tensor]]:
    value = sft_loss(logprobs_BT, batch.loss_mask_BT.to(logprobs_BT.device), batch.num_tokens)
    return value, {}
