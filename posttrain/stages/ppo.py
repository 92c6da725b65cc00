"""The PPO stage: policy, critic, reference, engine, rubric and one learner, then the loop.

One `Learner` updates policy and critic together: one forward gives logprobs and values (with
a value head it is one pass of the policy), the loss is `policy_loss + vf_coef * value_loss`,
and the optimizer has two AdamW parameter groups, the policy's at `train.lr` and the
critic's at `critic.lr`; the gradient norm is clipped over both. So micro-batching, gradient
accumulation and the loop's passes work unchanged. The policy is saved as a plain causal LM
(`<stage>/model`, the next stage's input); the critic to `<stage>/critic/` (a value head file,
or a sequence-classification model for `critic.kind: separate`). Checkpoints hold the critic
beside the policy, so a resumed stage continues where it stopped.

Test: `pytest tests/test_ppo_stage.py`. Run: `posttrain run configs/ppo.yaml`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch

from posttrain.algorithms.ppo import PPO
from posttrain.config.schema import PPOStage
from posttrain.data.load import load_rows
from posttrain.distributed import is_main
from posttrain.engines import build_engine
from posttrain.learner import Learner
from posttrain.loop import LoopParts
from posttrain.models.critic import Critic, build_critic
from posttrain.models.load import DTYPES, load_policy, resolve_model_path
from posttrain.models.lora import is_peft
from posttrain.reward_setup import build_rubric, ungated_learned_rewards
from posttrain.sampler import PromptSampler
from posttrain.stages.context import StageContext, build_evaluator
from posttrain.stages.grpo import run_resumable, sampling_params
from posttrain.sync import probe_bound, probe_logprob_diff


@dataclass(frozen=True)
class PPORun:
    """Everything the stage runs: the loop's parts (policy in `parts.learner.model`), the
    critic, which is not part of the policy, and the prompt sampler (resumable state)."""

    parts: LoopParts
    critic: Critic
    sampler: PromptSampler


def run(stage: PPOStage, ctx: StageContext) -> dict[str, float]:
    built = build(stage, ctx)
    ctx.checkpointer.modules["critic"] = built.critic  # not part of the policy
    final = run_resumable(stage, ctx, built.parts, built.sampler)
    model, tokenizer = built.parts.learner.model, built.parts.tokenizer
    ctx.save_output(model, tokenizer)
    if is_main():
        built.critic.save(ctx.stage_dir / "critic")
    return final


def build(stage: PPOStage, ctx: StageContext) -> PPORun:
    """Load the policy, build critic, reference, rubric, evaluator, engine and learner."""
    torch.manual_seed(ctx.seed)
    cfg, p = ctx.config, stage.ppo
    model, tokenizer = load_policy(
        ctx.input_model, cfg.model.dtype, cfg.model.device, cfg.run.seed, cfg.model.lora
    )
    model_path = resolve_model_path(ctx.input_model, cfg.run.seed)
    critic_path = resolve_model_path(stage.critic.path, cfg.run.seed) if stage.critic.path else None
    critic = build_critic(
        stage.critic.kind,
        model,
        critic_path or model_path,
        DTYPES[cfg.model.dtype],
        tokenizer.pad_token_id,
    )
    reference = None
    if p.kl_coef != 0 and not is_peft(model):  # with LoRA: the adapter is disabled instead
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    rows = load_rows(stage.data, need=("prompt|messages",))
    rubric = build_rubric(stage.rewards, list(rows[0]), ctx.config_dir, stage.reward_errors)
    for warning in ungated_learned_rewards(stage.rewards):
        print(f"[{stage.name}] warning: {warning}")
    evaluator = build_evaluator(stage.eval, stage.rewards, ctx)
    sampler = PromptSampler(rows, p.prompts_per_iteration, ctx.seed)
    r = stage.rollout
    engine = build_engine(r, model, tokenizer, model_path, cfg.model.dtype, ctx.seed)
    print(
        f"[{stage.name}] rollout engine: {engine.name}" + (" (auto)" if r.engine == "auto" else "")
    )
    groups = [
        {"params": [x for x in model.parameters() if x.requires_grad], "lr": stage.train.lr},
        {"params": list(critic.parameters()), "lr": stage.critic.lr or stage.train.lr},
    ]
    steps = stage.iterations * p.ppo_epochs * p.minibatches
    learner = Learner(model, stage.train, steps, param_groups=groups)
    algorithm = PPO(
        p,
        tokenizer.pad_token_id,
        model,
        critic,
        reference,
        stage.train.micro_batch_size,
    )
    parts = LoopParts(
        name=f"{stage.name} (ppo)",
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
    return PPORun(parts, critic, sampler)
