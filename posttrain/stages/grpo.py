"""The GRPO stage: builds the policy, reference, engine, rubric and learner, then runs the loop."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from posttrain.algorithms import grpo
from posttrain.config.schema import GRPOParams, GRPOStage
from posttrain.data.load import load_rows
from posttrain.engines import build_engine
from posttrain.learner import Learner
from posttrain.loop import LoopParts, run_loop
from posttrain.models.load import load_policy, resolve_model_path
from posttrain.reward_setup import build_rubric
from posttrain.sampler import PromptSampler
from posttrain.stages.context import StageContext, build_evaluator
from posttrain.sync import probe_logprob_diff
from rollouts import SamplingParams


@dataclass
class GRPO:
    """GRPO bound to its config and models, in the shape the loop expects."""

    cfg: GRPOParams
    pad_id: int
    policy: nn.Module
    reference: nn.Module | None
    micro_batch_size: int

    @property
    def passes(self) -> int:
        return self.cfg.epochs

    def prepare(self, groups, rewards) -> grpo.Prepared:
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
        return grpo.loss(logprobs_BT, batch, self.cfg)


def run(stage: GRPOStage, ctx: StageContext) -> dict[str, float]:
    torch.manual_seed(ctx.seed)
    cfg = ctx.config
    model, tokenizer = load_policy(ctx.input_model, cfg.model.dtype, cfg.model.device, cfg.run.seed)
    reference = None
    if stage.grpo.beta != 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    rows = load_rows(stage.data, need=("prompt|messages",))
    rubric = build_rubric(stage.rewards, list(rows[0]), ctx.config_dir, stage.reward_errors)
    evaluator = build_evaluator(stage.eval, stage.rewards, ctx)
    r = stage.rollout
    model_path = resolve_model_path(ctx.input_model, cfg.run.seed)
    engine = build_engine(r, model, tokenizer, model_path, cfg.model.dtype, ctx.seed)
    print(
        f"[{stage.name}] rollout engine: {engine.name}" + (" (auto)" if r.engine == "auto" else "")
    )
    learner = Learner(model, stage.train, stage.iterations * stage.grpo.epochs)
    algorithm = GRPO(
        stage.grpo, tokenizer.pad_token_id, model, reference, stage.train.micro_batch_size
    )
    sampler = PromptSampler(rows, stage.grpo.prompts_per_iteration, ctx.seed)
    parts = LoopParts(
        name=f"{stage.name} (grpo)",
        iterations=stage.iterations,
        next_prompts=sampler.next,
        engine=engine,
        n=r.n,
        sampling=partial(_sampling, stage, ctx.seed),
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
        max_logprob_diff=r.max_logprob_diff,
    )
    try:
        final = run_loop(parts)
    finally:
        engine.close()
    model.save_pretrained(ctx.output_model)
    tokenizer.save_pretrained(ctx.output_model)
    return final


def _sampling(stage: GRPOStage, seed: int, iteration: int) -> SamplingParams:
    r = stage.rollout
    return SamplingParams(r.max_new_tokens, r.temperature, r.top_p, seed=seed * 100_003 + iteration)
