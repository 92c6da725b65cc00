"""Shared pieces of the pipeline configuration: run, model, data, rewards, optimizer, rollouts.

Imported through `posttrain.config.schema`, which adds the stages and the pipeline.
"""

from __future__ import annotations

from typing import Any, Literal

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
    compile: bool | None = None
    """`torch.compile` each decoder layer for training (`posttrain/compile_layers.py`). None:
    on CUDA in a single process for Llama-family models; true: any model with `model.layers`;
    false: never. The first steps of each new sequence length pay the compilation."""


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
    ignore_eos: bool = False
    """Sample every completion to `max_new_tokens`: end-of-sequence tokens are drawn like any
    other and stop nothing (benchmarks, fixed-length experiments)."""
    batch_size: int = Field(256, ge=1)
    """Sequences decoded at once (`hf` engine)."""
    static_cache: bool = True
    """`hf` engine: decode Llama-family models (Llama, Qwen2/3, Mistral) through a static KV
    cache (`rollouts/static_decode.py`); false, or other models: transformers' own cache."""
    compile: bool | None = None
    """`hf` engine with `static_cache`: `torch.compile` the decode step (the first rollout pays
    the compilation); None = on CUDA only."""
    fuse_weights: bool | None = None
    """`hf` engine with `static_cache`: the prefill and decode steps run q/k/v and gate/up as one
    matmul each; None = on CUDA only (on CPU it did not pay: tiny model, batch 256, 7.0k vs
    8.3k and 6.7k vs 7.2k tokens/s fused vs unfused). The weights are laid side by side for
    each rollout and the model's parameters point into them until it ends
    (`rollouts/fused_weights.py`): no second copy, and the parameters get their own storage
    back before training resumes. `bench/RESULTS.md` (B2) has
    the speed with and without."""
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
    max_logprob_diff: float | None = Field(None, gt=0)
    """Stop the run when the probe's largest absolute logprob difference passes this. None:
    0.01 for a float32 policy, 0.1 in bfloat16 or float16, where two code paths round
    differently (`posttrain/sync.py` `probe_bound`)."""
    workers: int = Field(1, ge=1)
    """Engines sampling in parallel. 1: the engine runs in the trainer's process. > 1: a Ray
    pool of that many `hf` or `vllm` engine actors (one GPU each where the cluster has GPUs);
    prompts are split across them and the weights pushed to all after every update."""
    ray_address: str | None = None
    """`workers` > 1: the Ray cluster to join (e.g. `ray://head:10001` or `auto`); None starts
    a local Ray for the stage."""
    worker_restarts: int = Field(3, ge=0)
    """`workers` > 1: actors that die are replaced (with the latest weights, their prompts
    re-sent) this many times per stage; one more death stops the run."""

    @model_validator(mode="after")
    def _pool_engine(self) -> RolloutConfig:
        if self.workers > 1 and self.engine == "vllm-server":
            raise ValueError(
                "rollout.workers > 1 runs a Ray pool of engine actors, each with its own `hf` or "
                "`vllm` engine; `vllm-server` cannot be pooled: set rollout.engine to vllm (or "
                "hf), or rollout.workers to 1"
            )
        if self.workers > 1 and self.tensor_parallel_size > 1:
            raise ValueError(
                "rollout.workers > 1 gives each engine actor one GPU: tensor_parallel_size > 1 "
                "is not supported in a Ray pool; set one of them to 1"
            )
        if self.workers == 1 and self.ray_address is not None:
            raise ValueError(
                "rollout.ray_address is used only by a Ray pool: set rollout.workers > 1 or "
                "remove ray_address"
            )
        return self


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
