"""Rejection sampling for RAFT / rejection-sampling fine-tuning: which completions to keep.

Per prompt, among K scored completions: drop exact-duplicate texts (first occurrence kept),
then keep those with reward >= `threshold` (a verifier pass), then the `top_k` highest
(RAFT, Dong et al. 2023, alg. 1; RFT, Yuan et al. 2023, which also deduplicates reasoning
paths). Either filter may be omitted; ties in top-k go to the lower index. The kept samples
are the SFT set of the next round. Tests: `tests/test_pairs_selection.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Selection:
    keep_GK: Tensor
    """Boolean [G, K]: completion k of prompt g is kept."""
    duplicates: int
    """Completions dropped as exact repeats of an earlier completion of the same prompt."""

    @property
    def indices(self) -> list[tuple[int, int]]:
        """(prompt index, completion index) of each kept sample, in row-major order."""
        return [(int(g), int(k)) for g, k in torch.nonzero(self.keep_GK).tolist()]

    @property
    def acceptance_rate(self) -> float:
        """Kept samples over all samples."""
        return self.keep_GK.float().mean().item() if self.keep_GK.numel() else 0.0

    def metrics(self) -> dict[str, float]:
        prompts, samples = max(self.keep_GK.shape[0], 1), max(self.keep_GK.numel(), 1)
        return {
            "rft/acceptance_rate": self.acceptance_rate,
            "rft/duplicate_fraction": self.duplicates / samples,
            "rft/prompts_without_sample": float((~self.keep_GK.any(dim=1)).sum()),
            "rft/kept_per_prompt": self.keep_GK.sum().item() / prompts,
        }


def select_completions(
    rewards_GK: Tensor,
    texts_GK: list[list[str]],
    *,
    top_k: int | None = None,
    threshold: float | None = None,
) -> Selection:
    """Deduplicate by text, then filter by `threshold`, then keep the `top_k` best per prompt."""
    if rewards_GK.dim() != 2:
        raise ValueError(f"rewards must be [G, K], got shape {tuple(rewards_GK.shape)}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    g_count, k_count = rewards_GK.shape
    if len(texts_GK) != g_count:
        raise ValueError(f"texts has {len(texts_GK)} prompts, rewards has {g_count}")
    for g, row in enumerate(texts_GK):
        if len(row) != k_count:
            raise ValueError(f"texts of prompt {g} has {len(row)} completions, expected {k_count}")
    nan = torch.isnan(rewards_GK)
    if nan.any():
        g, k = torch.nonzero(nan)[0].tolist()
        raise ValueError(f"reward of prompt {g}, completion {k} is NaN: score or drop it first")

    rewards = rewards_GK.detach().double().cpu()
    keep = torch.zeros(g_count, k_count, dtype=torch.bool)
    duplicates = 0
    for g in range(g_count):
        seen: set[str] = set()
        candidates = []
        for k, text in enumerate(texts_GK[g]):
            if text in seen:
                duplicates += 1
                continue
            seen.add(text)
            if threshold is None or rewards[g, k] >= threshold:
                candidates.append(k)
        # Stable sort by reward, best first: equal rewards keep index order.
        candidates.sort(key=lambda k, g=g: -float(rewards[g, k]))
        for k in candidates[:top_k]:
            keep[g, k] = True
    return Selection(keep, duplicates)
