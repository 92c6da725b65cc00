"""GRPO and its variants: per-group outcome advantages and the clipped surrogate.

`make_batch` turns scored groups into a `GRPOBatch`:
- advantages: `group` (reward minus the group mean, over the group std unless Dr. GRPO's
  `scale_rewards: false`; DeepSeekMath sec. 4.1.2) or `rloo` (leave-one-out baseline,
  Ahmadian et al. 2024), see `advantages.py`;
- zero-variance groups (every sample scored the same) are kept, dropped, or refilled: with
  `refill`, `wants_more` asks the loop for another round of prompts until
  `prompts_per_iteration` groups carry signal (DAPO sec. 3.2, dynamic sampling), and the
  surplus is left out, as DAPO does;
- `overlong_filter` leaves samples cut by the length limit out of the loss (DAPO sec. 3.4);
  they stay in their group's baseline;
- old logprobs (for `epochs > 1`) and reference logprobs (for `beta != 0`) are stored.
`loss` is the per-micro-batch loss the learner calls (`losses/grpo.py`: clip-higher, token or
constant aggregation, k1/k2/k3 KL).

Test: `pytest tests/test_grpo_stage_options.py` (math: tests/test_grpo_variants.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posttrain.algorithms.advantages import group_advantages, rloo_advantages, zero_variance_groups
from posttrain.batch import GRPOBatch, forward_all, pad_right
from posttrain.config.schema import GRPOParams
from posttrain.learner import logprobs_forward
from posttrain.losses.grpo import grpo_loss
from posttrain.models.lora import reference_mode
from rollouts import Group


@dataclass(frozen=True)
class Prepared:
    batch: GRPOBatch | None
    """None when no sample is left to learn from."""
    advantages: list[float]
    """Per sample, in group order (left-out samples hold 0.0): for sample tables."""
    metrics: dict[str, float]


def reward_grid(groups: list[Group], rewards: list[float]) -> Tensor:
    """Rewards as [G, N]: group g's samples in order. Every group must hold N samples."""
    sizes = {len(g.samples) for g in groups}
    if len(sizes) != 1 or len(rewards) != sum(len(g.samples) for g in groups):
        raise ValueError(
            f"expected groups of equal size and one reward per sample; got group sizes "
            f"{sorted(sizes)} and {len(rewards)} rewards for {len(groups)} groups"
        )
    return torch.tensor(rewards, dtype=torch.float32).view(len(groups), sizes.pop())


def advantages(rewards_GN: Tensor, cfg: GRPOParams) -> Tensor:
    """One outcome advantage per sample, by `cfg.advantage` (see the module docstring)."""
    if cfg.advantage == "rloo":
        return rloo_advantages(rewards_GN)
    return group_advantages(rewards_GN, scale=cfg.scale_rewards)


def kept_groups(rewards_GN: Tensor, cfg: GRPOParams) -> Tensor:
    """Boolean [G]: the groups that go into the update under `cfg.zero_variance_groups`."""
    if cfg.zero_variance_groups == "keep":
        return torch.ones(rewards_GN.shape[0], dtype=torch.bool)
    keep = ~zero_variance_groups(rewards_GN)
    if cfg.zero_variance_groups == "refill":
        keep &= keep.cumsum(0) <= cfg.prompts_per_iteration
    return keep


def wants_more(groups: list[Group], rewards: list[float], rounds: int, cfg: GRPOParams) -> bool:
    """Dynamic sampling: generate another round of prompts while fewer than
    `prompts_per_iteration` groups carry signal and extra rounds remain (`rounds` counts the
    ones done, the first included)."""
    if cfg.zero_variance_groups != "refill" or rounds > cfg.max_refill_rounds:
        return False
    signal = ~zero_variance_groups(reward_grid(groups, rewards))
    return int(signal.sum()) < cfg.prompts_per_iteration


def make_batch(
    groups: list[Group],
    rewards: list[float],
    cfg: GRPOParams,
    pad_id: int,
    policy: nn.Module,
    reference: nn.Module | None,
    micro_batch_size: int,
) -> Prepared:
    """Advantages, group and sample filters, then token ids, masks and stored logprobs.

    `reference` is a frozen model, or (LoRA) the policy itself, run with its adapter disabled.
    """
    rewards_GN = reward_grid(groups, rewards)
    advantages_GN = advantages(rewards_GN, cfg)
    keep_G = kept_groups(rewards_GN, cfg)
    truncated_GN = torch.tensor([[s.finish_reason == "length" for s in g.samples] for g in groups])
    use_GN = keep_G[:, None].expand_as(truncated_GN).clone()
    metrics = {
        "grpo/zero_variance_fraction": zero_variance_groups(rewards_GN).float().mean().item(),
        "grpo/groups_used": float(keep_G.sum()),
    }
    if cfg.overlong_filter:
        metrics["grpo/overlong_filtered"] = float((use_GN & truncated_GN).sum())
        use_GN &= ~truncated_GN
    shown = (advantages_GN * use_GN).reshape(-1).tolist()
    if not bool(use_GN.any()):
        return Prepared(None, shown, metrics)
    samples = [
        s
        for g, row in zip(groups, use_GN.tolist(), strict=True)
        for s, used in zip(g.samples, row, strict=True)
        if used
    ]
    advantages_B = advantages_GN[use_GN]  # row-major, the order of `samples`
    ids, attention = pad_right([s.prompt_ids + s.completion_ids for s in samples], pad_id)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        mask[row, len(s.prompt_ids) : len(s.prompt_ids) + len(s.completion_ids)] = 1
    batch = GRPOBatch(ids, attention, mask, advantages_B, None, None, len(samples), int(mask.sum()))
    old = _logprobs(policy, batch, micro_batch_size) if cfg.epochs > 1 else None
    ref = None
    if cfg.beta != 0:
        if reference is None:
            raise ValueError("grpo.beta != 0 needs a reference model")
        with reference_mode(reference):
            ref = _logprobs(reference, batch, micro_batch_size)
    batch = dataclasses.replace(batch, old_logprobs_BT=old, ref_logprobs_BT=ref)
    metrics["grpo/advantage_abs_mean"] = advantages_B.abs().mean().item()
    return Prepared(batch, shown, metrics)


def loss(
    logprobs_BT: Tensor,
    batch: GRPOBatch,
    cfg: GRPOParams,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`max_completion_length` (the generation limit) is the divisor of `constant` aggregation."""
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
        clip_eps_high=cfg.clip_eps_high,
        beta=cfg.beta,
        ref_logprobs_BT=ref,
        aggregation=cfg.loss_aggregation,
        kl_estimator=cfg.kl_estimator,
        max_completion_length=max_completion_length,
    )
    return value, {f"grpo/{k}": v for k, v in stats.items()}


def _logprobs(model: nn.Module, batch: GRPOBatch, micro_batch_size: int) -> Tensor:
    return torch.cat(
        [p.cpu() for p in forward_all(model, batch, micro_batch_size, logprobs_forward)]
    )
