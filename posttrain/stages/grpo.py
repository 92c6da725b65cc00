"""The GRPO stage, and the set-up every iterative stage shares.

`run_iterative` builds the policy, the rollout engine, the rubric, the evaluator and the
learner from a stage's config, runs `posttrain.loop.run_loop` with the algorithm object the
stage builds, and saves the policy; the `grpo`, `online_dpo` and `rft` stages differ only in
that object. `GRPO` is GRPO's: it binds the config and models to `algorithms/grpo.py`.

Test: `pytest tests/test_grpo_stage_options.py tests/test_pipeline.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from posttrain.algorithms import grpo
from posttrain.compile_layers import compile_layers
from posttrain.config.schema import GRPOParams, GRPOStage, OnlineDPOStage, PPOStage, RFTStage
from posttrain.data.load import load_rows
from posttrain.engines import build_engine
from posttrain.learner import Learner
from posttrain.loop import Algorithm, LoopParts, run_loop
from posttrain.models.load import load_policy, resolve_model_path
from posttrain.models.lora import is_peft
from posttrain.reward_setup import build_rubric, ungated_learned_rewards
from posttrain.sampler import PromptSampler
from posttrain.stages.context import StageContext, build_evaluator
from posttrain.sync import probe_bound, probe_logprob_diff
from rollouts import Group, SamplingParams

IterativeStage = GRPOStage | OnlineDPOStage | RFTStage


@dataclass
class GRPO:
    """GRPO bound to its config and models, in the shape the loop expects."""

    cfg: GRPOParams
    pad_id: int
    policy: nn.Module
    reference: nn.Module | None
    micro_batch_size: int
    max_completion_length: int | None = None
    """The generation limit (`rollout.max_new_tokens`): the divisor of `constant` aggregation."""

    @property
    def passes(self) -> int:
        return self.cfg.epochs

    def wants_more(self, groups: list[Group], rewards: list[float], rounds: int) -> bool:
        return grpo.wants_more(groups, rewards, rounds, self.cfg)

    def prepare(self, groups: list[Group], rewards: list[float]) -> grpo.Prepared:
        return grpo.make_batch(
            groups,
            rewards,
            self.cfg,
            self.pad_id,
            self.policy,
            self.reference,
            self.micro_batch_size,
        )

    def loss(self, logprobs_BT, batch):
        return grpo.loss(logprobs_BT, batch, self.cfg, self.max_completion_length)


def run(stage: GRPOStage, ctx: StageContext) -> dict[str, float]:
    def build(model: nn.Module, tokenizer: Any) -> GRPO:
        reference = frozen_reference(model, stage.train.compile) if stage.grpo.beta != 0 else None
        return GRPO(
            stage.grpo,
            tokenizer.pad_token_id,
            model,
            reference,
            stage.train.micro_batch_size,
            stage.rollout.max_new_tokens,
        )

    return run_iterative(stage, ctx, stage.grpo.prompts_per_iteration, build)


def frozen_reference(model: nn.Module, compile: bool | None = None) -> nn.Module:
    """The stage's input model as a reference: a frozen copy, or with LoRA the policy itself
    (algorithms run it under `reference_mode`, which disables the adapter; no second copy).
    `compile`: `train.compile` for the copy's layers (the policy's are compiled by its
    `Learner`, after this copy: see `posttrain/compile_layers.py`)."""
    if is_peft(model):
        return model
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    compile_layers(reference, compile)
    return reference


def run_iterative(
    stage: IterativeStage,
    ctx: StageContext,
    prompts_per_iteration: int,
    build: Callable[[nn.Module, Any], Algorithm],
) -> dict[str, float]:
    """Run an iterative stage whose algorithm object is `build(policy, tokenizer)`."""
    torch.manual_seed(ctx.seed)
    cfg = ctx.config
    model, tokenizer = load_policy(
        ctx.input_model, cfg.model.dtype, cfg.model.device, cfg.run.seed, cfg.model.lora
    )
    algorithm = build(model, tokenizer)  # before any update: a reference copies the input model
    rows = load_rows(stage.data, need=("prompt|messages",))
    rubric = build_rubric(stage.rewards, list(rows[0]), ctx.config_dir, stage.reward_errors)
    for warning in ungated_learned_rewards(stage.rewards):
        print(f"[{stage.name}] warning: {warning}")
    evaluator = build_evaluator(stage.eval, stage.rewards, ctx)
    r = stage.rollout
    model_path = resolve_model_path(ctx.input_model, cfg.run.seed)
    engine = build_engine(r, model, tokenizer, model_path, cfg.model.dtype, ctx.seed)
    print(
        f"[{stage.name}] rollout engine: {engine.name}" + (" (auto)" if r.engine == "auto" else "")
    )
    learner = Learner(model, stage.train, stage.iterations * algorithm.passes)
    sampler = PromptSampler(rows, prompts_per_iteration, ctx.seed)
    parts = LoopParts(
        name=f"{stage.name} ({stage.algo})",
        iterations=stage.iterations,
        next_prompts=sampler.next,
        engine=engine,
        n=r.n,
        sampling=partial(sampling_params, stage, ctx.seed),
        rubric=rubric,
        algorithm=algorithm,
        learner=learner,
        tokenizer=tokenizer,
        tracker=ctx.tracker,
        evaluator=evaluator,
        eval_every=stage.eval.every,
        samples_every=cfg.tracking.samples_every,
        probe=partial(probe_logprob_diff, engine, model, pad_id=tokenizer.pad_token_id),
        probe_size=r.sync_probe,
        max_logprob_diff=probe_bound(r.max_logprob_diff, model),
    )
    final = run_resumable(stage, ctx, parts, sampler)
    ctx.save_output(model, tokenizer)
    return final


def run_resumable(
    stage: Any, ctx: StageContext, parts: LoopParts, sampler: PromptSampler
) -> dict[str, float]:
    """Continue from the stage's newest checkpoint (if any), run the loop with checkpoints,
    and close the engine; returns the last evaluation."""
    # Modules an algorithm changes besides the policy (a refreshed reference) are checkpointed.
    ctx.checkpointer.modules.update(getattr(parts.algorithm, "state_modules", {}))
    learner = parts.learner
    if (state := ctx.resume(learner)) is not None:
        sampler.load_state(state["sampler"])
        parts.start, parts.final, parts.health = state["step"], state["final"], state["health"]

    def checkpoint(iteration: int, loop_state: dict) -> None:
        ctx.checkpoint(iteration, stage.iterations, learner, sampler=sampler.state(), **loop_state)

    parts.checkpoint = checkpoint
    try:
        return run_loop(parts)
    finally:
        parts.engine.close()


def sampling_params(stage: IterativeStage | PPOStage, seed: int, iteration: int) -> SamplingParams:
    """The rollout's sampling for one iteration (every sampling stage, PPO's too)."""
    r = stage.rollout
    return SamplingParams(
        r.max_new_tokens, r.temperature, r.top_p, seed=seed * 100_003 + iteration,
        ignore_eos=r.ignore_eos,
    )  # fmt: skip
