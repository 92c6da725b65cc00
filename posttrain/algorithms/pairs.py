"""Preference pairs for online / iterative DPO: best vs worst completion of each prompt.

Each iteration samples K completions per prompt from the current policy and scores them with
the reward modules; the highest-scoring completion becomes `chosen`, the lowest `rejected`
("RLHF Workflow", Dong et al. 2024, sec. 3; Xiong et al. 2024). Groups where every completion
scores the same carry no preference and are dropped, as are pairs whose reward margin is below
`min_margin` (a small margin is mostly reward noise). Among equal best (or equal worst)
scores the first index wins, so the result is deterministic.
Tests: `tests/test_pairs_selection.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Pair:
    prompt_index: int
    """Row of the group in the scored batch."""
    chosen_index: int
    """Completion index (0..K-1) within the group of the highest reward."""
    rejected_index: int
    """Completion index within the group of the lowest reward."""
    margin: float
    """reward[chosen] - reward[rejected] (> 0)."""


@dataclass(frozen=True)
class PairSelection:
    pairs: tuple[Pair, ...]
    dropped_ties: int
    """Groups where every completion got the same reward."""
    dropped_small_margin: int
    """Groups whose best-worst margin was below min_margin."""

    def metrics(self) -> dict[str, float]:
        groups = len(self.pairs) + self.dropped_ties + self.dropped_small_margin
        margins = [p.margin for p in self.pairs]
        return {
            "pairs/kept": float(len(self.pairs)),
            "pairs/dropped_ties_fraction": self.dropped_ties / max(groups, 1),
            "pairs/dropped_small_margin_fraction": self.dropped_small_margin / max(groups, 1),
            "pairs/margin_mean": sum(margins) / len(margins) if margins else 0.0,
        }


def best_vs_worst_pairs(rewards_GK: Tensor, *, min_margin: float = 0.0) -> PairSelection:
    """One (best, worst) pair per group of K scored completions; see the module docstring.

    `rewards_GK` is [G, K] with K >= 2 and no NaN. A pair is kept when its margin is > 0 and
    >= `min_margin`.
    """
    if rewards_GK.dim() != 2 or rewards_GK.shape[1] < 2:
        raise ValueError(
            "rewards must be [G, K] with K >= 2 completions per prompt, "
            f"got {tuple(rewards_GK.shape)}"
        )
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    nan = torch.isnan(rewards_GK)
    if nan.any():
        g, k = torch.nonzero(nan)[0].tolist()
        raise ValueError(f"reward of prompt {g}, completion {k} is NaN: score or drop it first")
    rewards = rewards_GK.detach().double().cpu()
    pairs: list[Pair] = []
    ties = small = 0
    for g, row in enumerate(rewards):
        best = int(torch.nonzero(row == row.max())[0])  # first index among equal best
        worst = int(torch.nonzero(row == row.min())[0])
        margin = float(row[best] - row[worst])
        if margin == 0.0:
            ties += 1
        elif margin < min_margin:
            small += 1
        else:
            pairs.append(Pair(g, best, worst, margin))
    return PairSelection(tuple(pairs), ties, small)
