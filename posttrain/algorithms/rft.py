"""Rejection-sampling fine-tuning, online (RAFT, Dong et al. 2023, alg. 1; RFT, Yuan et al. 2023).

Each iteration: the policy samples K completions per prompt, the rubric scores them, and
`selection.select_completions` drops each prompt's repeated texts, keeps the completions whose
reward total reaches `threshold` and at most `top_k` of them per prompt, best first. The
learner then takes SFT steps (masked NLL on completion tokens, `algorithms/sft.py`) on the kept
set, with the exact sampled token ids (ending with the engine's stop token when the sample
stopped). The acceptance rate (kept over sampled) is logged each iteration.

Test: `pytest tests/test_online_dpo_rft.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algorithms import sft
from posttrain.algorithms.grpo import reward_grid
from posttrain.algorithms.selection import Selection, select_completions
from posttrain.batch import SFTBatch
from posttrain.config.schema import RFTParams
from rollouts import Group


@dataclass(frozen=True)
class Prepared:
    batch: SFTBatch | None
    """None when no sample was kept."""
    advantages: list[float]
    """Per sample, in group order, for sample tables: 1 kept, 0 rejected."""
    metrics: dict[str, float]


def select(groups: list[Group], rewards: list[float], params: RFTParams) -> Selection:
    """Which samples to keep: dedup by text, threshold, then top-k per prompt; with
    `drop_truncated`, samples cut off at the length limit are never kept."""
    grid = reward_grid(groups, rewards)
    threshold = params.threshold
    if params.drop_truncated:
        truncated = torch.tensor(
            [[s.finish_reason == "length" for s in g.samples] for g in groups], dtype=torch.bool
        )
        grid = grid.masked_fill(truncated, float("-inf"))
        threshold = threshold if threshold is not None else -torch.finfo(torch.float32).max
    return select_completions(
        grid,
        [[s.completion for s in g.samples] for g in groups],
        top_k=params.top_k,
        threshold=threshold,
    )


def make_batch(
    groups: list[Group], rewards: list[float], params: RFTParams, pad_id: int
) -> Prepared:
    selection = select(groups, rewards, params)
    kept = [groups[g].samples[k] for g, k in selection.indices]
    metrics = {**selection.metrics(), "rft/kept": float(len(kept))}
    shown = selection.keep_GK.float().reshape(-1).tolist()
    if not kept:
        return Prepared(None, shown, metrics)
    k_count = len(groups[0].samples)
    kept_rewards = [rewards[g * k_count + k] for g, k in selection.indices]
    metrics["rft/kept_reward_mean"] = sum(kept_rewards) / len(kept_rewards)
    batch = sft.make_batch([(s.prompt_ids, s.completion_ids) for s in kept], pad_id)
    return Prepared(batch, shown, metrics)


@dataclass
class RFT:
    """RAFT bound to its config, in the shape the loop expects."""

    params: RFTParams
    pad_id: int

    @property
    def passes(self) -> int:
        return self.params.epochs

    def prepare(self, groups: list[Group], rewards: list[float]) -> Prepared:
        return make_batch(groups, rewards, self.params, self.pad_id)

    def loss(self, logprobs_BT: Tensor, batch: SFTBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return sft.loss(logprobs_BT, batch)
