"""Online (iterative) DPO: pairs from the current policy's scored samples, then DPO steps.

Each iteration ("RLHF Workflow", Dong et al. 2024, alg. 1; Xiong et al. 2024): the policy
samples K completions per prompt, the rubric scores them, `pairs.best_vs_worst_pairs` makes the
highest-reward completion `chosen` and the lowest `rejected` (ties and margins under
`min_margin` dropped), the reference model's summed logprobs of both responses are computed,
and the learner takes DPO steps with `algorithms/dpo.py` (its loss variants and metrics).

Pairs hold the exact sampled token ids: they end with the engine's stop token when the sample
stopped and are cut where it hit the length limit, so the loss scores what the policy
generated. The reference is the stage's input model: a frozen copy, or with LoRA the policy
with its adapter disabled; `ref_refresh_every: k` copies the policy into the copy every k
iterations, each refresh starting a new round of iterative DPO.

Test: `pytest tests/test_online_dpo_rft.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from posttrain.algorithms import dpo
from posttrain.algorithms.grpo import reward_grid
from posttrain.algorithms.pairs import PairSelection, best_vs_worst_pairs
from posttrain.batch import PairBatch
from posttrain.config.schema import DPOParams, OnlineDPOParams
from posttrain.data.pairs import EncodedPair
from posttrain.models.lora import reference_mode
from rewards.judge_pairwise import pair_metrics
from rollouts import Group


@dataclass(frozen=True)
class Prepared:
    batch: PairBatch | None
    """None when no group gave a pair."""
    advantages: list[float]
    """Per sample, in group order, for sample tables: +1 chosen, -1 rejected, 0 unused."""
    metrics: dict[str, float]


def make_pairs(
    groups: list[Group], rewards: list[float], min_margin: float
) -> tuple[list[EncodedPair], PairSelection]:
    """Best vs worst completion of each group, as token-id pairs, with the selection."""
    selection = best_vs_worst_pairs(reward_grid(groups, rewards), min_margin=min_margin)
    pairs = []
    for p in selection.pairs:
        samples = groups[p.prompt_index].samples
        chosen, rejected = samples[p.chosen_index], samples[p.rejected_index]
        pairs.append(EncodedPair(chosen.prompt_ids, chosen.completion_ids, rejected.completion_ids))
    return pairs, selection


def make_batch(
    groups: list[Group],
    rewards: list[float],
    min_margin: float,
    pad_id: int,
    reference: nn.Module | None,
    micro_batch_size: int,
) -> Prepared:
    """Pairs, their reference logprobs (None = reference-free) and the pair metrics."""
    pairs, selection = make_pairs(groups, rewards, min_margin)
    k = len(groups[0].samples)
    shown = [0.0] * (len(groups) * k)
    for p in selection.pairs:
        shown[p.prompt_index * k + p.chosen_index] = 1.0
        shown[p.prompt_index * k + p.rejected_index] = -1.0
    metrics = {
        **selection.metrics(),
        "pairs/dropped_ties": float(selection.dropped_ties),
        "pairs/dropped_small_margin": float(selection.dropped_small_margin),
    }
    if not pairs:
        return Prepared(None, shown, metrics)
    metrics["pairs/chosen_length"] = _mean([len(p.chosen_ids) for p in pairs])
    metrics["pairs/rejected_length"] = _mean([len(p.rejected_ids) for p in pairs])
    batch = dpo.make_batch(pairs, pad_id)
    if reference is not None:
        with reference_mode(reference):
            ref = dpo.sequence_logps(reference, batch, micro_batch_size)
        batch = dataclasses.replace(batch, ref_chosen_P=ref.chosen_P, ref_rejected_P=ref.rejected_P)
    return Prepared(batch, shown, metrics)


def judge_pairs(groups: list[Group], judge: Any) -> tuple[list[EncodedPair], list, dict]:
    """Pairs labelled by a pairwise judge: the first two distinct completions of each group,
    compared in both orders; kept when the debiased verdict has a winner (OAIF-style online
    feedback, Guo et al. 2024). Returns (pairs, (group, chosen, rejected) indices, metrics)."""
    candidates = []
    for g, group in enumerate(groups):
        texts = [s.completion for s in group.samples]
        second = next((i for i in range(1, len(texts)) if texts[i] != texts[0]), None)
        if second is not None:
            candidates.append((g, 0, second))
    metrics = {"judge/candidate_pairs": float(len(candidates))}
    if not candidates:
        return [], [], metrics
    samples = [(groups[g].samples[a], groups[g].samples[b]) for g, a, b in candidates]
    verdicts = judge.compare(
        [a.prompt for a, _ in samples], [a.completion for a, _ in samples],
        [b.completion for _, b in samples],
    )  # fmt: skip
    pairs, chosen = [], []
    for (g, a, b), (sa, sb), verdict in zip(candidates, samples, verdicts, strict=True):
        if verdict.winner == "tie":
            continue
        win, lose = (sa, sb) if verdict.winner == "a" else (sb, sa)
        pairs.append(EncodedPair(win.prompt_ids, win.completion_ids, lose.completion_ids))
        chosen.append((g, a, b) if verdict.winner == "a" else (g, b, a))
    metrics.update(pair_metrics(verdicts))
    metrics["judge/pairs_kept"] = float(len(pairs))
    return pairs, chosen, metrics


def refresh_due(version: int, every: int) -> bool:
    """Whether the reference becomes the policy before training on samples of policy version
    `version` (the iterations done so far): every `every` versions; never when `every` is 0."""
    return every > 0 and version > 0 and version % every == 0


@dataclass
class OnlineDPO:
    """Online DPO bound to its config and models, in the shape the loop expects."""

    params: OnlineDPOParams
    loss_cfg: DPOParams
    pad_id: int
    policy: nn.Module
    reference: nn.Module | None
    """A frozen model, the policy itself with LoRA (adapter disabled), or None (no reference)."""
    micro_batch_size: int
    judge: Any = None
    """A `rewards.judge_pairwise.PairwiseJudge` that labels pairs; None = the rubric's rewards."""

    def __post_init__(self) -> None:
        if self.params.ref_refresh_every and (
            self.reference is None or self.reference is self.policy
        ):
            raise ValueError(
                "online_dpo.ref_refresh_every copies the policy into a separate reference "
                "model; with model.lora (or dpo.reference: none) there is none: set "
                "ref_refresh_every: 0"
            )

    @property
    def passes(self) -> int:
        return self.params.epochs

    @property
    def state_modules(self) -> dict[str, nn.Module]:
        """What to checkpoint besides the policy: a reference that refreshes."""
        if self.params.ref_refresh_every and self.reference is not None:
            return {"reference": self.reference}
        return {}

    def prepare(self, groups: list[Group], rewards: list[float]) -> Prepared:
        # The loop syncs the engine to version i after iteration i, so the samples' version
        # counts the iterations done, also in a resumed stage.
        version = groups[0].samples[0].policy_version
        refresh = refresh_due(version, self.params.ref_refresh_every)
        if refresh:
            self.reference.load_state_dict(self.policy.state_dict())
        if self.judge is not None:
            prepared = self._judged(groups)
        else:
            prepared = make_batch(
                groups,
                rewards,
                self.params.min_margin,
                self.pad_id,
                self.reference,
                self.micro_batch_size,
            )
        prepared.metrics["online_dpo/reference_refreshed"] = float(refresh)
        return prepared

    def _judged(self, groups: list[Group]) -> Prepared:
        pairs, chosen, metrics = judge_pairs(groups, self.judge)
        k = len(groups[0].samples)
        shown = [0.0] * (len(groups) * k)
        for g, win, lose in chosen:
            shown[g * k + win], shown[g * k + lose] = 1.0, -1.0
        if not pairs:
            return Prepared(None, shown, metrics)
        return Prepared(self._with_reference(dpo.make_batch(pairs, self.pad_id)), shown, metrics)

    def _with_reference(self, batch: PairBatch) -> PairBatch:
        if self.reference is None:
            return batch
        with reference_mode(self.reference):
            ref = dpo.sequence_logps(self.reference, batch, self.micro_batch_size)
        return dataclasses.replace(batch, ref_chosen_P=ref.chosen_P, ref_rejected_P=ref.rejected_P)

    def forward(self, model: nn.Module, micro: PairBatch) -> dpo.PairLogps:
        return dpo.forward(model, micro)

    def loss(self, outputs: dpo.PairLogps, micro: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return dpo.loss(outputs, micro, self.loss_cfg)


def _mean(values: list[int]) -> float:
    return sum(values) / len(values)
