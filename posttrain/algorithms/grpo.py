"""GRPO: group-normalised outcome advantages and the clipped surrogate (DeepSeekMath).

`make_batch` turns scored groups into a `GRPOBatch` (dropping zero-variance groups when the
config says so); `loss` is the per-micro-batch loss the learner calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posttrain.algorithms.advantages import group_advantages, zero_variance_groups
from posttrain.batch import GRPOBatch, micro_batches, pad_right
from posttrain.config.schema import GRPOParams
from posttrain.logprobs import token_logprobs
from posttrain.losses.grpo import grpo_loss
from rollouts import Group


@dataclass(frozen=True)
class Prepared:
    batch: GRPOBatch | None
    """None when every group was dropped (nothing to learn from)."""
    advantages: list[float]
    """Per sample, in group order (dropped groups hold 0.0): for sample tables."""
    metrics: dict[str, float]


def make_batch(
    groups: list[Group],
    rewards: list[float],
    cfg: GRPOParams,
    pad_id: int,
    policy: nn.Module,
    reference: nn.Module | None,
    micro_batch_size: int,
) -> Prepared:
    """Compute advantages, drop zero-variance groups if configured, tokenise into a batch."""
    n = len(groups[0].samples)
    rewards_GN = torch.tensor(rewards, dtype=torch.float32).view(len(groups), n)
    advantages_GN = group_advantages(rewards_GN, scale=cfg.scale_rewards)
    flat = zero_variance_groups(rewards_GN)
    keep = ~flat if cfg.zero_variance_groups == "drop" else torch.ones_like(flat)
    metrics = {
        "grpo/zero_variance_fraction": flat.float().mean().item(),
        "grpo/groups_used": float(keep.sum()),
    }
    shown = (advantages_GN * keep[:, None]).reshape(-1).tolist()
    if not bool(keep.any()):
        return Prepared(None, shown, metrics)
    samples = [s for g, k in zip(groups, keep.tolist(), strict=True) if k for s in g.samples]
    advantages_B = advantages_GN[keep].reshape(-1)
    ids, attention = pad_right([s.prompt_ids + s.completion_ids for s in samples], pad_id)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        mask[row, len(s.prompt_ids) : len(s.prompt_ids) + len(s.completion_ids)] = 1
    batch = GRPOBatch(ids, attention, mask, advantages_B, None, None, len(samples), int(mask.sum()))
    old = _logprobs(policy, batch, micro_batch_size) if cfg.epochs > 1 else None
    ref = _logprobs(reference, batch, micro_batch_size) if cfg.beta != 0 else None
    batch = dataclasses.replace(batch, old_logprobs_BT=old, ref_logprobs_BT=ref)
    metrics["grpo/advantage_abs_mean"] = advantages_B.abs().mean().item()
    return Prepared(batch, shown, metrics)


def loss(
    logprobs_BT: Tensor, batch: GRPOBatch, cfg: GRPOParams
) -> tuple[Tensor, dict[str, Tensor]]:
    device = logprobs_BT.device
    old = (
        batch.old_logprobs_BT.to(device)
        if batch.old_logprobs_BT is not None
        else logprobs_BT.detach()
    )
    ref = batch.ref_logprobs_BT.to(device) if batch.ref_logprobs_BT is not None else None
    value, stats = grpo_loss(
        logprobs_BT,
        old,
        batch.advantages_B.to(device),
        batch.loss_mask_BT.to(device),
        num_sequences=batch.num_sequences,
        num_tokens=batch.num_tokens,
        clip_eps=cfg.clip_eps,
        beta=cfg.beta,
        ref_logprobs_BT=ref,
        aggregation=cfg.loss_aggregation,
    )
    return value, {f"grpo/{k}": v for k, v in stats.items()}


@torch.no_grad()
def _logprobs(model: nn.Module, batch: GRPOBatch, micro_batch_size: int) -> Tensor:
    was_training = model.training
    model.eval()
    parts = [
        token_logprobs(model, m.input_ids_BT, m.attention_mask_BT).cpu()
        for m in micro_batches(batch, micro_batch_size)
    ]
    model.train(was_training)
    return torch.cat(parts)
