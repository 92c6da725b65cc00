"""Reward-model training: the Bradley-Terry pairwise loss on a sequence-classification model.

A pair becomes two token sequences, chosen and rejected, each exactly the text the
`reward_model` scorer (`rewards/reward_model.py`) scores for that (prompt, completion):
- plain text: `prompt + response`, with NO end-of-sequence token. The scorer appends none,
  and the model pools the last non-pad token; with pad = EOS (the tiny model, many others)
  a trailing EOS would be skipped by that pooling anyway. (SFT and DPO append EOS to plain
  responses; the reward model deliberately does not.)
- conversational: the chat template applied to prompt + the assistant reply.
Each text is tokenised whole, as the scorer does, so train and score see the same ids.

`forward` runs chosen and rejected rows in one padded call and returns one scalar per row
(the model pools at each row's last non-pad token); `loss` is

    -log sigmoid(r_chosen - r_rejected - margin) + c * mean((r_chosen + r_rejected)^2)

(Ouyang et al. 2022 eq. 1; margin: Touvron et al. 2023 eq. 2; centring: Eisenstein et al.
2023, TRL's `center_rewards_coefficient`), a mean over the whole optimizer batch's pairs, so
micro-batches add up to the full-batch loss.

Test: `pytest tests/test_rm_stage.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.batch import concat_rows, forward_all, pad_right
from posttrain.config.schema import RMParams
from posttrain.data.load import DataError
from posttrain.data.pairs import encode_pair
from rewards.text import completion_text, prompt_text


@dataclass(frozen=True)
class RMPair:
    chosen_ids: list[int]
    """Token ids of the whole scored text: prompt and chosen response."""
    rejected_ids: list[int]
    margin: float = 0.0


@dataclass(frozen=True)
class RMBatch:
    """P pairs; chosen and rejected rows are padded to one width with the pad token."""

    chosen_ids_PT: Tensor
    chosen_attention_PT: Tensor
    rejected_ids_PT: Tensor
    rejected_attention_PT: Tensor
    margin_P: Tensor
    num_pairs: int
    """Pairs of the whole optimizer batch (the loss is a mean over them)."""


@dataclass(frozen=True)
class PairRewards:
    chosen_P: Tensor
    rejected_P: Tensor


@dataclass(frozen=True)
class BTLoss:
    loss: Tensor
    """Scalar Bradley-Terry loss (plus the centring term), to minimise."""
    accuracy: Tensor
    """Share of pairs with r_chosen > r_rejected."""
    margin: Tensor
    """Mean r_chosen - r_rejected."""


def bradley_terry_loss(
    chosen_P: Tensor,
    rejected_P: Tensor,
    margin_P: Tensor | None = None,
    *,
    center_coefficient: float = 0.0,
    num_pairs: int | None = None,
) -> BTLoss:
    """`-log sigmoid(r_c - r_r - m)` (Ouyang et al. 2022 eq. 1 with Llama 2's margin) plus
    `center_coefficient * (r_c + r_r)^2`, summed over pairs and divided by `num_pairs`
    (default: this call's pairs)."""
    if chosen_P.shape != rejected_P.shape or chosen_P.dim() != 1:
        raise ValueError(
            f"expected chosen and rejected rewards of one shape [P], got "
            f"{tuple(chosen_P.shape)} and {tuple(rejected_P.shape)}"
        )
    count = float(num_pairs if num_pairs is not None else chosen_P.shape[0])
    diff = chosen_P - rejected_P
    shifted = diff if margin_P is None else diff - margin_P.to(diff)
    per_pair = -nn.functional.logsigmoid(shifted)
    if center_coefficient:
        per_pair = per_pair + center_coefficient * (chosen_P + rejected_P) ** 2
    with torch.no_grad():
        accuracy = (diff > 0).float().sum() / count
        margin = diff.sum() / count
    return BTLoss(per_pair.sum() / count, accuracy, margin)


def scored_text(tokenizer: Any, prompt: Any, response: Any) -> str:
    """The text the `reward_model` scorer builds for (prompt, completion): chat template for a
    conversational prompt (when the tokenizer has one), else prompt + response as text."""
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        reply = (
            response
            if isinstance(response, list)
            else [{"role": "assistant", "content": completion_text(response)}]
        )
        return tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    return prompt_text(prompt) + completion_text(response)


def encode_rm_pair(
    row: dict[str, Any],
    tokenizer: Any,
    source: str,
    index: int,
    margin_column: str | None = None,
) -> RMPair:
    """A pair row (the formats of `data/pairs.py`, checked by `encode_pair`) as scored ids."""
    encode_pair(row, tokenizer, source, index)  # validates the row, naming source/row/column
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:  # implicit prompt: the shared messages before the last
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    margin = 0.0
    if margin_column is not None:
        value = row.get(margin_column)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(
                f"{source}: row {index} column {margin_column!r} (rm.margin_column) must be a "
                f"number, got {value!r}"
            )
        margin = float(value)

    def ids(response: Any) -> list[int]:
        text = scored_text(tokenizer, prompt, response)
        return tokenizer(text, add_special_tokens=False).input_ids

    return RMPair(ids(chosen), ids(rejected), margin)


def make_batch(pairs: Sequence[RMPair], pad_id: int) -> RMBatch:
    ids, attention = pad_right(
        [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id
    )
    half = len(pairs)
    margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return RMBatch(ids[:half], attention[:half], ids[half:], attention[half:], margins, half)


def forward(model: nn.Module, micro: RMBatch) -> PairRewards:
    """One forward over chosen and rejected rows together; one scalar reward per row."""
    device = next(model.parameters()).device
    ids = torch.cat([micro.chosen_ids_PT, micro.rejected_ids_PT]).to(device)
    attention = torch.cat([micro.chosen_attention_PT, micro.rejected_attention_PT]).to(device)
    rewards = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, 0].float()
    half = micro.chosen_ids_PT.shape[0]
    return PairRewards(rewards[:half], rewards[half:])


def loss(outputs: PairRewards, micro: RMBatch, cfg: RMParams) -> tuple[Tensor, dict[str, Tensor]]:
    margin = micro.margin_P.to(outputs.chosen_P.device) if cfg.margin_column else None
    out = bradley_terry_loss(
        outputs.chosen_P,
        outputs.rejected_P,
        margin,
        center_coefficient=cfg.center_rewards_coefficient,
        num_pairs=micro.num_pairs,
    )
    share = outputs.chosen_P.shape[0] / micro.num_pairs
    metrics = {
        "rm/accuracy": out.accuracy,
        "rm/margin": out.margin,
        "rm/chosen_reward": outputs.chosen_P.detach().mean() * share,
        "rm/rejected_reward": outputs.rejected_P.detach().mean() * share,
    }
    return out.loss, metrics


def pair_rewards(model: nn.Module, batch: RMBatch, micro_batch_size: int) -> PairRewards:
    """Rewards of every pair (eval mode, no gradient), on the CPU."""
    return concat_rows(forward_all(model, batch, micro_batch_size, forward), PairRewards)
