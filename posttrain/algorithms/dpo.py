"""DPO and its variants on preference pairs: batches, the paired forward, and the loss.

`make_batch` pads chosen and rejected responses (with their reference log-probabilities,
computed once per pair before training); `forward` runs both through the policy in one call
and sums the response tokens' logprobs; `loss` applies `losses.dpo.dpo_loss`. Micro-batches
hold whole pairs, so the learner's gradient accumulation sees the same loss as one big batch.
Used by the offline `dpo` stage and by online DPO.

Test: `pytest tests/test_dpo_stage.py` (math: `tests/test_dpo_loss.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posttrain.batch import PairBatch, concat_rows, forward_all, pad_right
from posttrain.config.schema import DPOParams
from posttrain.data.pairs import EncodedPair
from posttrain.logprobs import token_logprobs
from posttrain.losses.dpo import dpo_loss


@dataclass(frozen=True)
class PairLogps:
    """Summed response logprobs per pair, and the response token counts."""

    chosen_P: Tensor
    rejected_P: Tensor
    chosen_tokens_P: Tensor
    rejected_tokens_P: Tensor


def make_batch(
    pairs: Sequence[EncodedPair],
    pad_id: int,
    ref_chosen_P: Tensor | None = None,
    ref_rejected_P: Tensor | None = None,
) -> PairBatch:
    chosen = _pad([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], pad_id)
    rejected = _pad([p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs], pad_id)
    return PairBatch(*chosen, *rejected, ref_chosen_P, ref_rejected_P, len(pairs))


def forward(model: nn.Module, micro: PairBatch) -> PairLogps:
    """One forward over chosen and rejected rows together; masked sums per response."""
    width = max(micro.chosen_ids_PT.shape[1], micro.rejected_ids_PT.shape[1])
    ids = torch.cat([_widen(micro.chosen_ids_PT, width), _widen(micro.rejected_ids_PT, width)])
    attention = torch.cat(
        [_widen(micro.chosen_attention_PT, width), _widen(micro.rejected_attention_PT, width)]
    )
    mask = torch.cat([_widen(micro.chosen_mask_PT, width), _widen(micro.rejected_mask_PT, width)])
    logprobs = token_logprobs(model, ids, attention)
    mask = mask.to(logprobs.device)
    sums = (logprobs * mask).sum(-1)
    counts = mask.sum(-1)
    half = micro.chosen_ids_PT.shape[0]
    return PairLogps(sums[:half], sums[half:], counts[:half], counts[half:])


def loss(outputs: PairLogps, micro: PairBatch, cfg: DPOParams) -> tuple[Tensor, dict[str, Tensor]]:
    device = outputs.chosen_P.device
    ref_chosen = micro.ref_chosen_P.to(device) if micro.ref_chosen_P is not None else None
    ref_rejected = micro.ref_rejected_P.to(device) if micro.ref_rejected_P is not None else None
    out = dpo_loss(
        outputs.chosen_P,
        outputs.rejected_P,
        ref_chosen,
        ref_rejected,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        chosen_tokens_B=outputs.chosen_tokens_P,
        rejected_tokens_B=outputs.rejected_tokens_P,
        simpo_gamma=cfg.simpo_gamma,
        rpo_alpha=cfg.rpo_alpha,
        num_pairs=micro.num_pairs,
    )
    # Means over this micro-batch, weighted so the learner's sum over micro-batches is the mean
    # over the whole batch.
    share = outputs.chosen_P.shape[0] / micro.num_pairs
    metrics = {k: v * share for k, v in out.metrics().items() if k != "dpo/loss"}
    if ref_chosen is not None:
        # Likelihood displacement: both responses less likely than under the reference.
        down = (outputs.chosen_P.detach() < ref_chosen) & (
            outputs.rejected_P.detach() < ref_rejected
        )
        metrics["dpo/both_down_fraction"] = down.float().mean() * share
    return out.loss, metrics


def sequence_logps(model: nn.Module, batch: PairBatch, micro_batch_size: int) -> PairLogps:
    """Summed response logprobs of every pair (eval mode, no gradient), on the CPU."""
    return concat_rows(forward_all(model, batch, micro_batch_size, forward), PairLogps)


def _pad(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    ids, attention = pad_right([p + r for p, r in zip(prompts, responses, strict=True)], pad_id)
    mask = torch.zeros_like(ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        mask[row, len(prompt) : len(prompt) + len(response)] = 1
    return ids, attention, mask


def _widen(t: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))
