"""PPO with a critic for language models (Ziegler et al. 2019; Ouyang et al. 2022).

One iteration's samples become a `PPOBatch` in `make_batch`:

1. old logprobs and old values: the policy and critic before the update (no gradient);
2. reference logprobs (the input model, or with LoRA the policy with its adapter disabled);
3. per-token rewards `-kl_coef * kl_t`, plus the sample's score on its last completion token
   (`gae.kl_penalized_rewards`; Ziegler et al. 2019 eq. 2);
4. GAE(gamma, lambda) advantages and returns (`gae.gae`; Schulman et al. 2016 eq. 16);
5. advantages whitened over the batch's completion tokens (`advantages.whiten`).

Then the loop takes `ppo_epochs` passes, each over `minibatches` shuffled minibatches (one
optimizer step each), of `policy_loss + vf_coef * value_loss` (`losses.ppo`; Schulman et al.
2017 eq. 7 and the clipped value loss of baselines' ppo2). `forward` gives logprobs and values
in one call: with a value head, one forward of the policy with its hidden states.
`PPO` binds all of this to the config and models in the shape `posttrain.loop` expects.

Test: `pytest tests/test_ppo_stage.py` (math: `tests/test_ppo_math.py`, `test_advantages.py`).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posttrain.algorithms.advantages import masked_mean, whiten
from posttrain.algorithms.gae import gae, kl_penalized_rewards
from posttrain.batch import eval_mode, pad_right, take_rows
from posttrain.config.schema import PPOParams
from posttrain.logprobs import logprobs_from_logits, token_logprobs
from posttrain.losses.kl import kl_estimate
from posttrain.losses.ppo import explained_variance, ppo_policy_loss, ppo_value_loss
from posttrain.models.critic import Critic, ValueHead
from posttrain.models.lora import is_peft, reference_mode
from rollouts import Group


@dataclass(frozen=True)
class PPOBatch:
    """Samples of one iteration; every `*_BT` tensor is aligned with `input_ids_BT`."""

    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    loss_mask_BT: Tensor
    """1 on completion tokens (the actions)."""
    old_logprobs_BT: Tensor
    """Logprobs of the policy that sampled the batch (before this iteration's updates)."""
    old_values_BT: Tensor
    """The critic's values before this iteration's updates (value clipping, returns)."""
    advantages_BT: Tensor
    """GAE advantages (whitened when configured); 0 off the completion."""
    returns_BT: Tensor
    """Value targets: unwhitened advantages + old values."""
    num_sequences: int
    num_tokens: int
    """Completion tokens of the optimizer batch (the minibatch) the losses are averaged over."""


@dataclass(frozen=True)
class PolicyValues:
    """What `forward` returns for a micro-batch."""

    logprobs_BT: Tensor
    values_BT: Tensor


@dataclass(frozen=True)
class Prepared:
    batch: PPOBatch | None
    """None when no sample has a completion token (nothing to learn from)."""
    advantages: list[float]
    """Per sample, in group order: the mean advantage over its completion tokens."""
    metrics: dict[str, float]


def forward(policy: nn.Module, critic: Critic, micro: PPOBatch) -> PolicyValues:
    """Logprobs and values of `micro`; a value head reads the policy's own last hidden state."""
    return policy_values(policy, critic, micro.input_ids_BT, micro.attention_mask_BT)


def policy_values(
    policy: nn.Module, critic: Critic, input_ids_BT: Tensor, attention_mask_BT: Tensor
) -> PolicyValues:
    device = next(policy.parameters()).device
    ids, mask = input_ids_BT.to(device), attention_mask_BT.to(device)
    if isinstance(critic, ValueHead):
        out = policy(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        return PolicyValues(logprobs_from_logits(out.logits, ids), critic(out.hidden_states[-1]))
    return PolicyValues(token_logprobs(policy, ids, mask), critic(ids, mask))


def make_batch(
    groups: list[Group],
    rewards: list[float],
    cfg: PPOParams,
    pad_id: int,
    policy: nn.Module,
    critic: Critic,
    reference: nn.Module | None,
    micro_batch_size: int,
) -> Prepared:
    """Score, penalise, estimate advantages (steps 1-5 of the module docstring)."""
    samples = [s for g in groups for s in g.samples]
    if len(rewards) != len(samples):
        raise ValueError(f"got {len(rewards)} rewards for {len(samples)} samples")
    keep = [i for i, s in enumerate(samples) if s.completion_ids]
    metrics = {"ppo/empty_completions": float(len(samples) - len(keep))}
    if not keep:
        return Prepared(None, [0.0] * len(samples), metrics)
    kept = [samples[i] for i in keep]
    ids, attention = pad_right([s.prompt_ids + s.completion_ids for s in kept], pad_id)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(kept):
        mask[row, len(s.prompt_ids) : len(s.prompt_ids) + len(s.completion_ids)] = 1
    old = _no_grad_forward(policy, critic, ids, attention, micro_batch_size)
    if cfg.kl_coef != 0:
        ref = _reference_logprobs(policy, reference, ids, attention, micro_batch_size)
        kl = kl_estimate(old.logprobs_BT, ref, cfg.kl_estimator) * mask
    else:
        kl = torch.zeros_like(old.logprobs_BT)
    scores = torch.tensor([rewards[i] for i in keep], dtype=torch.float32)
    token_rewards = kl_penalized_rewards(scores, kl, mask, cfg.kl_coef)
    estimate = gae(token_rewards, old.values_BT, mask, gamma=cfg.gamma, lam=cfg.lam)
    advantages = estimate.advantages_BT
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    batch = PPOBatch(
        ids,
        attention,
        mask,
        old.logprobs_BT,
        old.values_BT,
        advantages,
        estimate.returns_BT,
        len(kept),
        int(mask.sum()),
    )
    per_sample = [0.0] * len(samples)
    row_means = (advantages * mask).sum(1) / mask.sum(1)
    for row, i in enumerate(keep):
        per_sample[i] = row_means[row].item()
    metrics.update(
        {
            "ppo/score_mean": scores.mean().item(),
            "ppo/value_mean": masked_mean(old.values_BT, mask).item(),
            "ppo/return_mean": masked_mean(estimate.returns_BT, mask).item(),
            "ppo/advantage_mean": masked_mean(estimate.advantages_BT, mask).item(),
            "ppo/explained_variance": explained_variance(
                old.values_BT, estimate.returns_BT, mask
            ).item(),
        }
    )
    if cfg.kl_coef != 0:  # KL to the reference: summed per completion, mean over the batch
        metrics["ppo/kl_ref"] = kl.sum(1).mean().item()
        metrics["ppo/kl_penalty"] = (-cfg.kl_coef * kl.sum(1)).mean().item()
    return Prepared(batch, per_sample, metrics)


def minibatches(
    batch: PPOBatch, count: int, generator: torch.Generator | None = None
) -> list[PPOBatch]:
    """The batch's rows shuffled and cut into `count` minibatches of near-equal size, each
    with its own sequence and token counts (each is one optimizer batch). The default
    generator is torch's global one, which checkpoints save and restore."""
    order = torch.randperm(batch.num_sequences, generator=generator)
    parts = []
    for index in torch.tensor_split(order, min(count, batch.num_sequences)):
        part = take_rows(batch, index)
        parts.append(
            dataclasses.replace(
                part, num_sequences=len(index), num_tokens=int(part.loss_mask_BT.sum())
            )
        )
    return parts


def loss(
    outputs: PolicyValues, batch: PPOBatch, cfg: PPOParams
) -> tuple[Tensor, dict[str, Tensor]]:
    """`policy_loss + vf_coef * value_loss`, each a token mean over the optimizer batch."""
    device = outputs.logprobs_BT.device
    mask = batch.loss_mask_BT.to(device)
    policy = ppo_policy_loss(
        outputs.logprobs_BT,
        batch.old_logprobs_BT.to(device),
        batch.advantages_BT.to(device),
        mask,
        clip_eps=cfg.clip_eps,
        num_tokens=batch.num_tokens,
    )
    value = ppo_value_loss(
        outputs.values_BT,
        batch.old_values_BT.to(device),
        batch.returns_BT.to(device),
        mask,
        clip_range=cfg.value_clip,
        num_tokens=batch.num_tokens,
    )
    metrics = {**policy.metrics(), **value.metrics()}
    # Summed over micro-batches by the learner: the token mean over the optimizer batch.
    metrics["ppo/value_pred_mean"] = (outputs.values_BT.detach() * mask).sum() / batch.num_tokens
    return policy.loss + cfg.vf_coef * value.loss, metrics


@dataclass
class PPO:
    """PPO bound to its config and models, in the shape the loop expects."""

    cfg: PPOParams
    pad_id: int
    policy: nn.Module
    critic: Critic
    reference: nn.Module | None
    """A frozen copy of the input model; None with LoRA (the adapter is disabled instead)."""
    micro_batch_size: int

    @property
    def passes(self) -> int:
        return self.cfg.ppo_epochs

    def prepare(self, groups: list[Group], rewards: list[float]) -> Prepared:
        return make_batch(
            groups,
            rewards,
            self.cfg,
            self.pad_id,
            self.policy,
            self.critic,
            self.reference,
            self.micro_batch_size,
        )

    def minibatches(self, batch: PPOBatch) -> list[PPOBatch]:
        return minibatches(batch, self.cfg.minibatches)

    def forward(self, model: nn.Module, micro: PPOBatch) -> PolicyValues:
        self.critic.train(model.training)
        return forward(model, self.critic, micro)

    def loss(self, outputs: PolicyValues, batch: PPOBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return loss(outputs, batch, self.cfg)


@torch.no_grad()
def _no_grad_forward(
    policy: nn.Module, critic: Critic, ids: Tensor, attention: Tensor, micro_batch_size: int
) -> PolicyValues:
    modes = policy.training, critic.training
    policy.eval()
    critic.eval()
    parts = []
    for start in range(0, ids.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        out = policy_values(policy, critic, ids[rows], attention[rows])
        parts.append((out.logprobs_BT.float().cpu(), out.values_BT.float().cpu()))
    policy.train(modes[0])
    critic.train(modes[1])
    return PolicyValues(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


@torch.no_grad()
def _reference_logprobs(
    policy: nn.Module,
    reference: nn.Module | None,
    ids: Tensor,
    attention: Tensor,
    micro_batch_size: int,
) -> Tensor:
    if reference is None and not is_peft(policy):
        raise ValueError("ppo.kl_coef != 0 needs a reference model (or a LoRA policy)")
    model = reference if reference is not None else policy
    with eval_mode(model), reference_mode(policy) if reference is None else nullcontext():
        parts = [
            token_logprobs(
                model, ids[s : s + micro_batch_size], attention[s : s + micro_batch_size]
            )
            .float()
            .cpu()
            for s in range(0, ids.shape[0], micro_batch_size)
        ]
    return torch.cat(parts)
