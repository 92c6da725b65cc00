"""The SFT stage: masked NLL on completions, evaluated on held-out prompts at the end."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from posttrain.algorithms import sft
from posttrain.config.schema import SFTStage
from posttrain.data.format import encode_example
from posttrain.data.load import DataError, keep_good, load_rows
from posttrain.distributed import is_main
from posttrain.evaluate import brief
from posttrain.learner import Learner
from posttrain.models.load import load_policy
from posttrain.sampler import EpochBatches
from posttrain.stages.context import StageContext, build_evaluator
from rollouts.hf import HFEngine


def run(stage: SFTStage, ctx: StageContext) -> dict[str, float]:
    torch.manual_seed(ctx.seed)
    cfg = ctx.config
    model, tokenizer = load_policy(
        ctx.input_model, cfg.model.dtype, cfg.model.device, cfg.run.seed, cfg.model.lora
    )
    rows = load_rows(stage.data, need=("prompt|messages",))

    def encode(row: dict, index: int) -> tuple[list[int], list[int]]:
        prompt_ids, completion_ids = encode_example(row, tokenizer, stage.data.source, index)
        if len(prompt_ids) + len(completion_ids) > stage.train.max_length:
            raise DataError(
                f"{stage.data.source}: row {index} has {len(prompt_ids) + len(completion_ids)} "
                f"tokens, over train.max_length={stage.train.max_length}"
            )
        return prompt_ids, completion_ids

    examples = keep_good(rows, stage.data, encode)
    train = stage.train
    steps = train.max_steps or max(1, math.ceil(train.epochs * len(examples) / train.batch_size))
    learner = Learner(model, train, steps)
    evaluator = build_evaluator(stage.eval, None, ctx)
    engine = HFEngine(model, tokenizer)
    order = EpochBatches(len(examples), train.batch_size, ctx.seed)
    final: dict[str, float] = {}
    start = 0
    if (state := ctx.resume(learner)) is not None:
        order.load_state(state["sampler"])
        start, final = state["step"], state["final"]
    progress = tqdm(
        range(start + 1, steps + 1),
        desc=f"{stage.name} (sft)",
        unit="step",
        dynamic_ncols=True,
        initial=start,
        total=steps,
        disable=not is_main(),
    )
    for step in progress:
        batch = sft.make_batch(
            [examples[i] for i in order.next()], tokenizer.pad_token_id, train.train_on_prompt
        )
        metrics = {f"train/{k}": v for k, v in learner.update(batch, sft.loss).items()}
        progress.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        if evaluator and (step == steps or (stage.eval.every and step % stage.eval.every == 0)):
            final = evaluator(engine, tokenizer)
            metrics.update(final)
            progress.write(f"[{stage.name}] step {step}: " + brief(final))
        if step == 1:
            metrics["data/skipped_rows"] = float(examples.skipped)
        ctx.tracker.log(metrics, step)
        ctx.checkpoint(step, steps, learner, sampler=order.state(), final=final)
    ctx.save_output(model, tokenizer)
    return final
