"""Each algorithm's own settings block (`grpo:`, `dpo:`, `ppo:`, `critic:`, ...).

Imported through `posttrain.config.schema`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config.base import Strict


class GRPOParams(Strict):
    prompts_per_iteration: int = 16
    """Prompts drawn per iteration; the batch is `prompts_per_iteration * rollout.n` samples."""
    advantage: Literal["group", "rloo"] = "group"
    """`group`: reward minus the group mean, divided by the group std when `scale_rewards`
    (DeepSeekMath sec. 4.1.2); `rloo`: reward minus the mean of the group's other samples
    (RLOO, Ahmadian et al. 2024), not std-scaled, so it needs `scale_rewards: false`."""
    beta: float = 0.0
    """KL coefficient towards the reference model (estimator: `kl_estimator`); 0 = no reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimate (Schulman 2020): `k3` (DeepSeekMath eq. 4), `k1` (the log-ratio),
    `k2` (half the squared log-ratio)."""
    clip_eps: float = 0.2
    """PPO clip range epsilon (DeepSeekMath eq. 3); the lower one when `clip_eps_high` is set."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip range (DAPO sec. 3.1 clip-higher, e.g. 0.28); None = `clip_eps`."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); False keeps the mean-centred reward
    (Dr. GRPO, Liu et al. 2025, sec. 3.2)."""
    zero_variance_groups: Literal["keep", "drop", "refill"] = "drop"
    """Groups whose samples all score the same carry no signal. `keep` them; `drop` them from
    the update; `refill` (DAPO sec. 3.2 dynamic sampling): drop them and draw more prompts, up to
    `max_refill_rounds` extra generation rounds, until `prompts_per_iteration` groups with
    signal are found (groups past that number are left out)."""
    max_refill_rounds: int = Field(4, ge=1)
    """`refill`: extra generation rounds allowed per iteration; when they run out, the update
    uses the groups with signal found so far."""
    overlong_filter: bool = False
    """Leave truncated samples (stopped by `rollout.max_new_tokens`) out of the loss (DAPO
    sec. 3.4, overlong filtering); they still count in their group's advantage baseline."""
    loss_aggregation: Literal["sequence", "token", "constant"] = "sequence"
    """`sequence`: mean over each completion's tokens, then over completions (GRPO paper);
    `token`: mean over all completion tokens of the batch (DAPO sec. 3.3); `constant`: sum over
    tokens divided by completions * `rollout.max_new_tokens` (Dr. GRPO sec. 3.2)."""
    epochs: int = Field(1, ge=1)
    """Optimisation passes over each batch; > 1 uses stored old logprobs and clipping."""

    @model_validator(mode="after")
    def _rloo_is_not_std_scaled(self) -> GRPOParams:
        if self.advantage == "rloo" and self.scale_rewards:
            raise ValueError(
                "advantage rloo uses the leave-one-out baseline without std scaling: "
                "set scale_rewards: false"
            )
        return self


class DPOParams(Strict):
    beta: float = Field(0.1, gt=0)
    """Inverse temperature of the implicit reward (DPO eq. 7)."""
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """`sigmoid`: DPO; `ipo`: IPO (Azar et al.); `simpo`: reference-free, length-normalised."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Assumed rate of flipped labels (conservative DPO); sigmoid and simpo only."""
    rpo_alpha: float = Field(0.0, ge=0.0)
    """Weight of the chosen response's per-token NLL added to the loss (RPO); 0 = off."""
    simpo_gamma: float = 0.0
    """Target reward margin of SimPO."""
    reference: Literal["input", "none"] = "input"
    """`input`: the stage's input model (with LoRA: the base with the adapter disabled), its
    logprobs computed once before training; `none`: reference-free (required by simpo)."""

    @model_validator(mode="after")
    def _simpo_is_reference_free(self) -> DPOParams:
        if self.loss_type == "simpo" and self.reference != "none":
            raise ValueError("loss_type simpo is reference-free: set reference: none")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to sigmoid and simpo, not ipo")
        return self


class OnlineDPOParams(Strict):
    prompts_per_iteration: int = Field(16, ge=1)
    """Prompts drawn per iteration; each gives at most one (best, worst) pair."""
    min_margin: float = Field(0.0, ge=0.0)
    """Drop pairs whose reward margin (best minus worst) is below this; ties always drop."""
    ref_refresh_every: int = Field(0, ge=0)
    """Copy the current policy into the reference every this many iterations (the rounds of
    iterative DPO); 0 = the reference stays the stage's input model."""
    epochs: int = Field(1, ge=1)
    """Optimizer steps over each iteration's pairs."""
    judge: dict[str, Any] | None = None
    """Label pairs with an LLM judge instead of the rubric: the options of
    `rewards.judge.pairwise_judge` (`base_url`, `model`, `api_key_env`, `criteria`,
    `cache_dir`, ...). Two distinct samples of each prompt are compared in both orders; the
    pair is kept only when both orders agree (position-debiased), else dropped. The rubric
    still scores every sample for the logged rewards."""


class RFTParams(Strict):
    prompts_per_iteration: int = Field(16, ge=1)
    """Prompts drawn per iteration."""
    top_k: int | None = Field(1, ge=1)
    """Keep at most this many distinct completions per prompt, best first; None = no limit."""
    threshold: float | None = None
    """Keep only completions whose reward total is >= this (a verifier pass); None = any."""
    drop_truncated: bool = True
    """Never keep a completion cut off at `rollout.max_new_tokens` (it would teach the policy
    to stop mid-answer, without its end-of-sequence token)."""
    epochs: int = Field(1, ge=1)
    """Optimizer steps over each iteration's kept set."""

    @model_validator(mode="after")
    def _selects_something(self) -> RFTParams:
        if self.top_k is None and self.threshold is None:
            raise ValueError(
                "top_k: null and threshold: null keep every sample; set top_k, threshold or both"
            )
        return self


class CriticConfig(Strict):
    """The PPO value model V(s_t)."""

    kind: Literal["head", "separate"] = "head"
    """`head`: a linear value head on the policy's last hidden state (one forward gives logits
    and values; the value loss also trains the shared body, as TRL's former PPOTrainer);
    `separate`: its own transformer body plus a linear head, a one-label
    `AutoModelForSequenceClassification` (as TRL's PPOTrainer and OpenRLHF)."""
    lr: float | None = Field(None, gt=0)
    """Learning rate of the critic's parameters (their own AdamW group; the schedule is the
    policy's); None = `train.lr`."""
    path: str | None = None
    """`separate` only: initialise the critic from this model folder or id (e.g. a trained
    reward model: `runs/<run>/<rm stage>/model`); None = the stage's input model."""

    @model_validator(mode="after")
    def _path_needs_separate(self) -> CriticConfig:
        if self.path is not None and self.kind != "separate":
            raise ValueError("critic.path initialises a separate critic: set kind: separate")
        return self


class PPOParams(Strict):
    prompts_per_iteration: int = Field(16, ge=1)
    """Prompts drawn per iteration; the batch is `prompts_per_iteration * rollout.n` samples."""
    ppo_epochs: int = Field(4, ge=1)
    """Passes over each iteration's batch (Schulman et al. 2017, Alg. 1: K epochs)."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per pass: the batch is shuffled and split into this many minibatches."""
    clip_eps: float = Field(0.2, gt=0)
    """Policy ratio clip range epsilon (Schulman et al. 2017, eq. 7)."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss in `policy_loss + vf_coef * value_loss` (TRL's default)."""
    value_clip: float | None = Field(0.2, gt=0)
    """Clip range of the new values around the old ones in the value loss; None = unclipped."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of GAE (Schulman et al. 2016); 1 = undiscounted, as RLHF implementations."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda: 1 = Monte-Carlo returns minus values, 0 = one-step TD errors."""
    kl_coef: float = Field(0.05, ge=0)
    """Per-token KL penalty towards the reference (the input model), folded into the rewards
    (Ziegler et al. 2019, eq. 2); 0 = no reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate in the penalty (Schulman 2020); `k1` is the log-ratio (TRL)."""
    whiten_advantages: bool = True
    """Normalise the batch's advantages to mean 0, std 1 over completion tokens."""


class RMParams(Strict):
    margin_column: str | None = None
    """Column holding a per-pair margin m: the loss becomes -log sigmoid(r_c - r_r - m)
    (Touvron et al. 2023, Llama 2, eq. 2); None = no margin."""
    center_rewards_coefficient: float = Field(0.0, ge=0)
    """Adds coef * mean((r_c + r_r)^2), keeping rewards centred on 0 (Eisenstein et al. 2023;
    TRL's RewardTrainer option of this name); 0 = off."""
