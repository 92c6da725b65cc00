"""Rows that share a prompt run it once: per-token logprobs of sampled groups.

GRPO and RFT batches hold several samples of each prompt, so every prompt is
repeated in `n` rows. Their losses read logprobs only at the loss mask's positions, and the
tokens before a row's first loss position (its prefix: the prompt) need no logprobs of their
own: the completion needs only their keys and values, and the hidden state of the last prefix
token (it predicts the first completion token). So `shared_logprobs` runs each distinct prefix
once (left-padded, filling a KV cache), gives every row its prefix's cache rows by indexing
(autograd sums the rows' gradients back into the shared prefix), then runs all completions
against that cache. At `n = 8` with a prompt a third of the sequence, the forward and backward
cover about 30% fewer tokens; the values equal the plain forward's (the same kernels on the
same tokens; float32 on CPU agrees to rounding).

`plan(...)` decides per micro-batch: rows are grouped by their exact prefix tokens, and the
shared path runs only when it saves at least `MIN_SAVED_FRACTION` of the tokens. Positions
before a row's first loss position hold 0 in the result (not that token's logprob), so only
callers whose losses are masked pass a loss mask (`posttrain.learner.logprobs_forward`).

Compiled decoder layers (`train.compile`, the default on CUDA) take the plain path: the KV
cache's per-layer state makes `torch.compile` recompile each layer.

`group_order` keeps the rows of one prefix next to each other when a batch is sorted by
length for micro-batching (`posttrain.batch.longest_first`), so they land in one micro-batch.

Test: `pytest tests/test_shared_prefix.py` (values and gradients equal to the plain path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MIN_SAVED_FRACTION = 0.1
"""The shared path runs when the repeated prefix tokens it skips are at least this share of a
micro-batch's tokens (below it, the second forward call and the attention mask cost more)."""


@dataclass(frozen=True)
class Plan:
    lengths: list[int]
    """Per row: the prefix length, the tokens before its first loss position."""
    group_B: Tensor
    """Per row: the index of its prefix among the distinct ones."""
    firsts: list[int]
    """Per distinct prefix: the first row that holds it."""


def prefix_groups(ids_BT: Tensor, loss_mask_BT: Tensor) -> tuple[list[int], list[int]] | None:
    """Per row, its prefix length and the index of its distinct prefix (in order of first
    appearance); None when some row has no loss position, or a loss on its first token."""
    has_BT = loss_mask_BT.bool()
    if not bool(has_BT.any(1).all()):
        return None
    lengths = has_BT.int().argmax(1).tolist()
    if min(lengths) == 0:
        return None
    index: dict[tuple[int, ...], int] = {}
    groups = []
    for row, length in zip(ids_BT.tolist(), lengths, strict=True):
        groups.append(index.setdefault(tuple(row[:length]), len(index)))
    return lengths, groups


def plan(ids_BT: Tensor, attention_BT: Tensor, loss_mask_BT: Tensor) -> Plan | None:
    """How `shared_logprobs` runs this right-padded micro-batch, or None when it would save
    less than `MIN_SAVED_FRACTION` of the tokens."""
    found = prefix_groups(ids_BT, loss_mask_BT)
    if found is None:
        return None
    if _saved(*found) < MIN_SAVED_FRACTION * int(attention_BT.sum()):
        return None
    lengths, groups = found
    return Plan(lengths, torch.tensor(groups), list(_firsts(groups).values()))


def group_order(ids_BT: Tensor, loss_mask_BT: Tensor, lengths_B: Tensor) -> Tensor | None:
    """Rows by length, longest first, with the rows of a prefix kept together: prefixes
    ordered by their longest row, rows within one by length. None when sharing would save
    less than `MIN_SAVED_FRACTION` of the batch's tokens (then a plain sort by length keeps
    the padding lowest)."""
    found = prefix_groups(ids_BT, loss_mask_BT)
    if found is None or _saved(*found) < MIN_SAVED_FRACTION * int(lengths_B.sum()):
        return None
    group_B = torch.tensor(found[1])
    longest_G = torch.zeros(int(group_B.max()) + 1, dtype=lengths_B.dtype)
    longest_G = longest_G.scatter_reduce(0, group_B, lengths_B, "amax")
    # Sort keys from the least to the most significant, each sort stable.
    order = torch.sort(lengths_B, descending=True, stable=True).indices
    order = order[torch.sort(group_B[order], stable=True).indices]
    return order[torch.sort(longest_G[group_B[order]], descending=True, stable=True).indices]


def shared_logprobs(
    lm: nn.Module,
    ids_BT: Tensor,
    attention_BT: Tensor,
    plan: Plan,
    head_logprobs: Callable[[nn.Module, Tensor, Tensor], Tensor],
    width_multiple: int = 1,
    pad_id: int = 0,
) -> Tensor:
    """Per-token logprobs `[B, T]` of the right-padded `ids_BT` (on the model's device; the
    masks may live on the host) by the prefix-sharing forward of `plan`. `lm` is a
    transformers `*ForCausalLM`; `head_logprobs(head, h_ND, targets_N)` turns hidden states
    into target logprobs. The prefix and completion widths are rounded up to
    `width_multiple` (few shapes for compiled kernels). Positions before each row's prefix end
    hold 0."""
    device = ids_BT.device
    B, T = ids_BT.shape
    lengths_B = torch.tensor(plan.lengths)
    ends_B = attention_BT.sum(1).cpu()
    # The distinct prefixes, left-padded so that each ends in the last column.
    P = _round_up(max(plan.lengths[row] for row in plan.firsts), width_multiple)
    prefix_ids = torch.full((len(plan.firsts), P), pad_id, dtype=torch.long, device=device)
    prefix_mask = torch.zeros((len(plan.firsts), P), dtype=torch.long, device=device)
    for u, row in enumerate(plan.firsts):
        length = plan.lengths[row]
        prefix_ids[u, P - length :] = ids_BT[row, :length]
        prefix_mask[u, P - length :] = 1
    positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    padded = bool((prefix_mask == 0).any())
    out = lm.model(
        input_ids=prefix_ids,
        attention_mask=prefix_mask if padded else None,
        position_ids=positions,
        use_cache=True,
    )
    group_B = plan.group_B.to(device)
    cache = out.past_key_values
    cache.batch_select_indices(group_B)
    last_BD = out.last_hidden_state[:, -1][group_B]
    # The completions: row r's tokens from its prefix end on, right-padded to C.
    C = _round_up(int((ends_B - lengths_B).max()), width_multiple)
    offsets_C = torch.arange(C)
    source_BC = (lengths_B[:, None] + offsets_C).clamp(max=T - 1)
    valid_BC = offsets_C[None, :] < (ends_B - lengths_B)[:, None]
    comp_ids = torch.where(valid_BC.to(device), ids_BT.gather(1, source_BC.to(device)), pad_id)
    mask = torch.cat([prefix_mask[group_B], torch.ones((B, C), dtype=torch.long, device=device)], 1)
    h_BCD = lm.model(
        input_ids=comp_ids,
        attention_mask=mask,
        position_ids=(lengths_B[:, None] + offsets_C).to(device),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    # Completion token j is predicted by the hidden state before it: the prefix's last for j=0.
    h_BCD = torch.cat([last_BD[:, None], h_BCD[:, :-1]], 1)
    D = h_BCD.shape[-1]
    lp_BC = head_logprobs(lm.lm_head, h_BCD.reshape(-1, D), comp_ids.reshape(-1)).view(B, C)
    lp_BC = lp_BC * valid_BC.to(device)
    result = torch.zeros((B, T), dtype=lp_BC.dtype, device=device)
    # Invalid (padding) entries add 0 to a clamped column, so they change nothing.
    return result.scatter_add(1, source_BC.to(device), lp_BC)


def _round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def _firsts(groups: list[int]) -> dict[int, int]:
    """Per distinct prefix: the first row that holds it."""
    firsts: dict[int, int] = {}
    for row, group in enumerate(groups):
        firsts.setdefault(group, row)
    return firsts


def _saved(lengths: list[int], groups: list[int]) -> int:
    """Prefix tokens that sharing skips: every repeat of a prefix after its first row."""
    return sum(lengths) - sum(lengths[row] for row in _firsts(groups).values())
