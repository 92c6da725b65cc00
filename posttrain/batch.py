"""Token batches that cross from an algorithm's `make_batch` to the learner.

Every `*_BT` tensor is aligned with `input_ids_BT` (batch B, time T): position t holds the
value for token t. Sequences are right-padded. `num_sequences` and `num_tokens` count the whole
optimizer batch, so a loss normalised by them sums over micro-batches to the full-batch loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from posttrain.shared_prefix import group_order


@dataclass(frozen=True)
class SFTBatch:
    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    loss_mask_BT: Tensor
    """1 on tokens that carry loss (completion tokens, or all when training on prompts)."""
    num_sequences: int
    num_tokens: int


@dataclass(frozen=True)
class GRPOBatch:
    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    loss_mask_BT: Tensor
    """1 on completion tokens."""
    advantages_B: Tensor
    old_logprobs_BT: Tensor | None
    """Logprobs of the policy that sampled the batch; None = the current policy, detached."""
    ref_logprobs_BT: Tensor | None
    """Reference-model logprobs, for the KL term; None when beta == 0."""
    num_sequences: int
    num_tokens: int


@dataclass(frozen=True)
class PairBatch:
    """Preference pairs (P of them); chosen and rejected sequences are padded separately."""

    chosen_ids_PT: Tensor
    chosen_attention_PT: Tensor
    chosen_mask_PT: Tensor
    """1 on the chosen response's tokens."""
    rejected_ids_PT: Tensor
    rejected_attention_PT: Tensor
    rejected_mask_PT: Tensor
    ref_chosen_P: Tensor | None
    """Summed reference logprobs of the chosen response; None when reference-free."""
    ref_rejected_P: Tensor | None
    num_pairs: int


Batch = TypeVar("Batch", SFTBatch, GRPOBatch, PairBatch)


def num_rows(batch: Any) -> int:
    """Rows of a batch: dim 0 of its first tensor."""
    first = next(f for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), Tensor))
    return getattr(batch, first.name).shape[0]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def forward_all(model: nn.Module, batch: Any, size: int, forward: Callable) -> list[Any]:
    """`forward(model, micro)` on every micro-batch of `size` rows, in eval mode, no gradient."""
    with eval_mode(model):
        return [forward(model, micro) for micro in micro_batches(batch, size)]


def concat_rows(parts: list[Any], cls: type) -> Any:
    """Concatenate the per-micro-batch outputs (dataclasses of tensors) row-wise, on the CPU."""
    return cls(
        *(torch.cat([getattr(p, f.name).cpu() for p in parts]) for f in dataclasses.fields(cls))
    )


def micro_batches(batch: Batch, size: int) -> Iterator[Batch]:
    """Slices of `size` rows; tensors are cut along dim 0, counts stay whole-batch."""
    rows = num_rows(batch)
    for start in range(0, rows, size):
        yield take_rows(batch, slice(start, start + size))


def longest_first(batch: Batch, keep_prompts: bool = True) -> Batch:
    """The rows reordered by length, longest first, so each micro-batch holds rows of similar
    length and little padding is computed (`logprobs.token_logprobs` trims all-padding
    columns). A row's length is its longest attention mask (a pair: the longer sequence).
    With `keep_prompts`, rows that share a prompt stay together (`shared_prefix.group_order`),
    so a micro-batch runs the prompt once. Losses are sums over rows normalised by whole-batch
    counts, so the order changes nothing but rounding."""
    masks = [
        getattr(batch, f.name)
        for f in dataclasses.fields(batch)
        if "attention" in f.name and isinstance(getattr(batch, f.name), Tensor)
    ]
    if not masks:
        return batch
    lengths = torch.stack([m.sum(-1) for m in masks]).amax(0)
    order = None
    if keep_prompts and isinstance(getattr(batch, "loss_mask_BT", None), Tensor):
        order = group_order(batch.input_ids_BT, batch.loss_mask_BT, lengths)
    if order is None:
        order = torch.sort(lengths, descending=True, stable=True).indices
    return take_rows(batch, order)


def take_rows(batch: Batch, index: slice | Tensor) -> Batch:
    changes = {
        f.name: getattr(batch, f.name)[index]
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), Tensor)
    }
    return dataclasses.replace(batch, **changes)


def pad_right(sequences: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into `(ids_BT, attention_mask_BT)`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
