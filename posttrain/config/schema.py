"""The pipeline configuration: pydantic models, one source of truth for every default.

A pipeline YAML has `run`, `model`, `tracking` and a list of `stages`; each stage picks its
algorithm with `algo`. Unknown keys are errors (see `posttrain.config.load` for the messages).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class RunConfig(Strict):
    name: str = "run"
    """Name of the pipeline run; also the W&B group name."""
    output_dir: str | None = None
    """Run folder; default `runs/<name>`."""
    seed: int = 0
    """Seed for model building, data order, sampling and dropout."""
    checkpoint_every: int = Field(100, ge=0)
    """Save a resumable checkpoint every this many steps (SFT, DPO, RM) or iterations (GRPO,
    PPO, online DPO, RFT); 0 = only at the end of each stage."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept per stage (the newest)."""

    @property
    def folder(self) -> str:
        return self.output_dir or f"runs/{self.name}"


class LoraSpec(Strict):
    r: int = Field(16, ge=1)
    """Rank of the adapter matrices."""
    alpha: float = 32.0
    """Scale numerator: updates are scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]); `all-linear`: every linear layer but the
    output head."""
    merge: bool = True
    """At the end of each stage, save the adapter merged into the weights (a plain model the next
    stage and vLLM load; the next stage gets a new adapter and its reference is this stage's
    output); False saves the adapter alone (PEFT format), the next stage keeps training it, and
    every stage's reference is the original base model."""


class ModelConfig(Strict):
    path: str = "tiny://arithmetic"
    """`tiny://<preset>` (built locally, cached), a Hugging Face model id, or a local folder
    (a full model, or a PEFT adapter folder whose base model is reachable)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the policy is trained in."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    lora: LoraSpec | None = None
    """Train a LoRA adapter instead of all weights (every stage); the reference model is the
    base with the adapter disabled, so no second copy is kept."""


class TrackingConfig(Strict):
    backend: Literal["wandb", "jsonl"] = "wandb"
    """`wandb` (plus the JSONL file) or `jsonl` only. The JSONL file is always written."""
    project: str = "posttrain"
    """W&B project."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """`auto`: online when W&B credentials are configured, else offline (synced later)."""
    samples_every: int = 10
    """Log a table of samples every this many iterations of an iterative stage (0 = never)."""


class DataConfig(Strict):
    source: str
    """`builtin://arithmetic`, a .jsonl/.json/.parquet/.csv file, or a `datasets` name."""
    split: str = "train"
    """Split to read (built-in tasks and `datasets` names; files have a single split)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Map our column names (prompt, completion, messages, answer) to the source's names."""
    limit: int | None = None
    """Use at most this many rows (the first ones)."""
    subset: str | None = None
    """`datasets` configuration name (e.g. `main` for `openai/gsm8k`)."""
    prompt_format: str | None = None
    """Rewrite each text prompt with this Python format string over the row's columns, e.g.
    `"{prompt}\nPut the final answer in \\boxed{{}}."`."""
    chat: bool = False
    """Send text prompts as one user message, so the tokenizer's chat template applies
    (instruct models)."""
    system: str | None = None
    """With `chat`, a system message put before the user message."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A row that cannot be used (missing or empty column, wrong type, invalid messages, too
    long): `error` stops with the file, row and column named; `skip` leaves it out, prints the
    first few reasons and logs the count as `data/skipped_rows`."""


class RewardSpec(Strict):
    name: str
    """Built-in name (`posttrain rewards list`), plugin name, `package.module:function`, or
    `./file.py:function`."""
    weight: float = 1.0
    """Weight in the total; 0 logs the reward as a metric without training on it."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Options of the reward (a built-in's or factory's keyword arguments)."""
    label: str | None = None
    """Name in metrics (`reward/<label>`) and gates; default: the function's short name."""
    gate: str | None = None
    """Score this reward only where the reward with this label reached `gate_min` (elsewhere
    it does not apply), e.g. a judge that counts only for verified answers."""
    gate_min: float = 1.0
    timeout: float | None = Field(None, gt=0)
    """Seconds one scoring call may take before it counts as failed; None = no limit."""


class RewardErrorPolicy(Strict):
    on_error: Literal["raise", "count"] = "count"
    """`raise`: the first failing reward stops the run; `count`: failed samples are left out
    of the total and counted in `reward/<name>/errors`, up to `max_error_rate`."""
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)
    """Stop once a reward has failed on more than this fraction of the samples it has seen."""


class RewardsFile(Strict):
    """A rewards-only YAML for `posttrain rewards score` (a pipeline YAML works too)."""

    rewards: list[RewardSpec] = Field(min_length=1)
    reward_errors: RewardErrorPolicy = Field(
        default_factory=lambda: RewardErrorPolicy(on_error="raise")
    )


class OptimConfig(Strict):
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up (to 0 at the stage's last step)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (None = no clipping)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward; gradients accumulate up to the full batch."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN or infinite loss or gradient norm: `stop` the stage with the step named, or
    `skip` that optimizer step (its gradients dropped, counted in `train/skipped_steps`)."""


class EvalConfig(Strict):
    data: DataConfig | None = None
    """Held-out prompts; None disables evaluation."""
    every: int = 0
    """Evaluate every this many steps/iterations (0 = only at the end of the stage)."""
    rewards: list[RewardSpec] | None = None
    """Rubric for evaluation; None = the stage's rewards, or `exact_answer` for SFT."""
    accuracy_reward: str | None = None
    """Component whose value >= 1 counts as correct for `eval/accuracy`; None = the first."""
    max_new_tokens: int = 32
    """Greedy decoding length limit."""


class RolloutConfig(Strict):
    engine: Literal["auto", "hf", "vllm", "vllm-server"] = "auto"
    """`auto`: `vllm` when vLLM is importable, else `hf` (the choice is printed). `hf`:
    transformers in the trainer's process. `vllm`: a vLLM engine in the trainer's process.
    `vllm-server`: an OpenAI-compatible vLLM server, started here or at `server_url`."""
    n: int = Field(8, ge=1)
    """Samples per prompt (the group size)."""
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(256, ge=1)
    """Sequences decoded at once (`hf` engine)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """vLLM dtype; `auto` = `model.dtype`, so the sync probe compares like with like."""
    max_model_len: int | None = None
    """vLLM context length; None = the model's."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vLLM's share of GPU memory (GPU only)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallelism (GPU only)."""
    sleep_mode: bool = False
    """`vllm` on GPU: free the engine's memory while the trainer updates."""
    server_url: str | None = None
    """`vllm-server`: an existing server (started with VLLM_SERVER_DEV_MODE=1 and able to read
    `server_weights_dir`); None starts one on a free loopback port."""
    server_weights_dir: str | None = None
    """`vllm-server`: folder the weights are written to for the server to reload."""
    server_restarts: int = Field(0, ge=0)
    """`vllm-server`: restart a started server that dies this many times (0 = stop the run)."""
    request_timeout: float = Field(300.0, gt=0)
    """`vllm-server`: seconds per HTTP request."""
    sync_probe: int = Field(8, ge=0)
    """After each weight sync, compare the engine's logprobs of this many sampled sequences
    with the trainer's (0 = off)."""
    max_logprob_diff: float = Field(1e-2, gt=0)
    """Stop the run when the probe's largest absolute logprob difference passes this."""


class SFTTrainConfig(OptimConfig):
    lr: float = 1e-4
    batch_size: int = 32
    """Sequences per optimizer step."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed); ignored when `max_steps` is set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_length: int = 1024
    """Longest prompt + completion in tokens; longer rows are an error."""
    train_on_prompt: bool = False
    """Also put loss on prompt tokens (default: completion tokens only)."""


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


class RMParams(Strict):
    margin_column: str | None = None
    """Column holding a per-pair margin m: the loss becomes -log sigmoid(r_c - r_r - m)
    (Touvron et al. 2023, Llama 2, eq. 2); None = no margin."""
    center_rewards_coefficient: float = Field(0.0, ge=0)
    """Adds coef * mean((r_c + r_r)^2), keeping rewards centred on 0 (Eisenstein et al. 2023;
    TRL's RewardTrainer option of this name); 0 = off."""


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
