"""The pipeline configuration: pydantic models, one source of truth for every default.

A pipeline YAML has `run`, `model`, `tracking` and a list of `stages`; each stage picks its
algorithm with `algo`. Unknown keys are errors (see `posttrain.config.load` for the messages).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from posttrain.config.algos import (  # noqa: F401 - re-exported
    CriticConfig,
    DPOParams,
    GRPOParams,
    OnlineDPOParams,
    PPOParams,
    RFTParams,
    RMParams,
)
from posttrain.config.base import (  # noqa: F401 - re-exported
    DataConfig,
    EvalConfig,
    LoraSpec,
    ModelConfig,
    OptimConfig,
    RewardErrorPolicy,
    RewardsFile,
    RewardSpec,
    RolloutConfig,
    RunConfig,
    SFTTrainConfig,
    Strict,
    TrackingConfig,
)


class SFTStage(Strict):
    name: str
    algo: Literal["sft"]
    data: DataConfig
    train: SFTTrainConfig = Field(default_factory=SFTTrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class GRPOStage(Strict):
    name: str
    algo: Literal["grpo"]
    data: DataConfig
    """Training prompts (with the columns the rewards need)."""
    iterations: int = Field(100, ge=1)
    """Generate-score-update rounds."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardSpec]
    reward_errors: RewardErrorPolicy = Field(default_factory=RewardErrorPolicy)
    grpo: GRPOParams = Field(default_factory=GRPOParams)
    train: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _needs_rewards(self) -> GRPOStage:
        if not self.rewards:
            raise ValueError("a grpo stage needs at least one reward in `rewards`")
        if self.grpo.advantage == "rloo" and self.rollout.n < 2:
            raise ValueError("grpo.advantage rloo needs rollout.n >= 2 samples per prompt")
        return self


class DPOStage(Strict):
    name: str
    algo: Literal["dpo"]
    data: DataConfig
    """Preference pairs: `prompt`, `chosen`, `rejected` (plain or conversational)."""
    dpo: DPOParams = Field(default_factory=DPOParams)
    train: SFTTrainConfig = Field(default_factory=lambda: SFTTrainConfig(lr=5e-6))
    """`batch_size` counts pairs; `max_length` bounds prompt + the longer response."""
    eval_pairs: DataConfig | None = None
    """Held-out pairs: logs how often the policy (and its implicit reward) prefers `chosen`."""
    eval: EvalConfig = Field(default_factory=EvalConfig)


class OnlineDPOStage(Strict):
    """Online / iterative DPO: each iteration samples `rollout.n` completions per prompt from
    the current policy, scores them with `rewards`, pairs the best with the worst and takes DPO
    steps; the reference is the stage's input model (refreshed per `online_dpo`)."""

    name: str
    algo: Literal["online_dpo"]
    data: DataConfig
    """Training prompts (with the columns the rewards need)."""
    iterations: int = Field(100, ge=1)
    """Generate-score-pair-update rounds."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardSpec]
    reward_errors: RewardErrorPolicy = Field(default_factory=RewardErrorPolicy)
    online_dpo: OnlineDPOParams = Field(default_factory=OnlineDPOParams)
    dpo: DPOParams = Field(default_factory=DPOParams)
    """The DPO loss; `reference: input` uses reference logprobs computed each iteration."""
    train: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> OnlineDPOStage:
        if not self.rewards:
            raise ValueError("an online_dpo stage needs at least one reward in `rewards`")
        if self.rollout.n < 2:
            raise ValueError("online_dpo pairs completions: rollout.n must be >= 2")
        if self.online_dpo.ref_refresh_every and self.dpo.reference == "none":
            raise ValueError("online_dpo.ref_refresh_every needs dpo.reference: input")
        return self


class RFTStage(Strict):
    """Rejection-sampling fine-tuning (RAFT): each iteration samples `rollout.n` completions per
    prompt, keeps the best distinct ones (`rft`) and takes SFT steps on them."""

    name: str
    algo: Literal["rft"]
    data: DataConfig
    """Training prompts (with the columns the rewards need)."""
    iterations: int = Field(100, ge=1)
    """Generate-score-select-update rounds."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardSpec]
    reward_errors: RewardErrorPolicy = Field(default_factory=RewardErrorPolicy)
    rft: RFTParams = Field(default_factory=RFTParams)
    train: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _needs_rewards(self) -> RFTStage:
        if not self.rewards:
            raise ValueError("an rft stage needs at least one reward in `rewards`")
        return self


class PPOStage(Strict):
    """PPO with a critic (Ouyang et al. 2022): each iteration samples `rollout.n` completions
    per prompt (1 = classic PPO), scores them with `rewards` (the score lands on the last
    token), folds the per-token KL penalty into the rewards, runs GAE and takes
    `ppo.ppo_epochs` x `ppo.minibatches` steps of the clipped policy and value losses. The
    output model is the policy alone; the critic is saved to `<stage>/critic/`."""

    name: str
    algo: Literal["ppo"]
    data: DataConfig
    """Training prompts (with the columns the rewards need)."""
    iterations: int = Field(100, ge=1)
    """Generate-score-update rounds."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardSpec]
    reward_errors: RewardErrorPolicy = Field(default_factory=RewardErrorPolicy)
    ppo: PPOParams = Field(default_factory=PPOParams)
    """PPO's own settings: epochs, minibatches, clipping, GAE, KL penalty, whitening."""
    critic: CriticConfig = Field(default_factory=CriticConfig)
    """The value model: a head on the policy or a separate model, and its learning rate."""
    train: OptimConfig = Field(default_factory=OptimConfig)
    """The policy's optimizer (the critic shares it, at `critic.lr`)."""
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> PPOStage:
        if not self.rewards:
            raise ValueError("a ppo stage needs at least one reward in `rewards`")
        rows = self.ppo.prompts_per_iteration * self.rollout.n
        if self.ppo.minibatches > rows:
            raise ValueError(
                f"ppo.minibatches={self.ppo.minibatches} exceeds the {rows} samples of an "
                "iteration (ppo.prompts_per_iteration * rollout.n)"
            )
        return self


class RMStage(Strict):
    """Reward-model training: a one-label sequence-classification model (built from the
    stage's input model) learns `r(chosen) > r(rejected)` with the Bradley-Terry loss
    (Ouyang et al. 2022, eq. 1). Its output is a reward model for the `reward_model` reward,
    not a policy: the next stage's input stays this stage's input."""

    name: str
    algo: Literal["rm"]
    data: DataConfig
    """Preference pairs: `prompt`, `chosen`, `rejected` (plain or conversational)."""
    rm: RMParams = Field(default_factory=RMParams)
    """Loss options: per-pair margin and reward centring."""
    train: SFTTrainConfig = Field(default_factory=lambda: SFTTrainConfig(lr=5e-5))
    """`batch_size` counts pairs; `max_length` bounds prompt + the longer response."""
    eval_pairs: DataConfig | None = None
    """Held-out pairs: `eval/pair_accuracy` (how often r(chosen) > r(rejected)) before
    training, every `eval_every` steps and at the end."""
    eval_every: int = Field(0, ge=0)
    """Evaluate the held-out pairs every this many steps (0 = before and after training)."""


Stage = Annotated[
    SFTStage | DPOStage | GRPOStage | OnlineDPOStage | RFTStage | PPOStage | RMStage,
    Field(discriminator="algo"),
]


ALGOS = {
    "sft": SFTStage,
    "dpo": DPOStage,
    "grpo": GRPOStage,
    "online_dpo": OnlineDPOStage,
    "rft": RFTStage,
    "ppo": PPOStage,
    "rm": RMStage,
}


class PipelineConfig(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    stages: list[Stage]

    @model_validator(mode="after")
    def _unique_stage_names(self) -> PipelineConfig:
        if not self.stages:
            raise ValueError("`stages` is empty; a pipeline needs at least one stage")
        names = [s.name for s in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stage names must be unique; repeated: {repeated}")
        return self

    @model_validator(mode="after")
    def _lora_reference_is_the_base(self) -> PipelineConfig:
        if self.model.lora is None:
            return self
        for stage in self.stages:
            if isinstance(stage, OnlineDPOStage) and stage.online_dpo.ref_refresh_every:
                raise ValueError(
                    f"stage {stage.name!r}: online_dpo.ref_refresh_every copies the policy "
                    "into a separate reference model, but with model.lora the reference is "
                    "the base model (adapter disabled): set ref_refresh_every: 0"
                )
        return self
