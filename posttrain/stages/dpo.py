"""The offline DPO stage: preference pairs -> a policy that prefers the chosen responses.

Reference log-probabilities are computed once, before the first update, with the stage's
input model (with LoRA: the same weights with the adapter disabled), so no second model is
kept in memory. Held-out pairs (`eval_pairs`) are scored before training and at every
evaluation: how often the policy gives the chosen response the higher likelihood, how often
its implicit reward does, and the mean log-probabilities of chosen and rejected responses
(both falling is likelihood displacement).

Test: `pytest tests/test_dpo_stage.py`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
from tqdm.auto import tqdm

from posttrain.algorithms import dpo
from posttrain.config.schema import DataConfig, DPOStage
from posttrain.data.load import Rows
from posttrain.data.pairs import EncodedPair, encode_pair, load_pairs
from posttrain.distributed import is_main
from posttrain.evaluate import brief
from posttrain.learner import Learner
from posttrain.models.load import load_policy
from posttrain.models.lora import reference_mode
from posttrain.sampler import PromptSampler
from posttrain.stages.context import StageContext, build_evaluator
from rollouts.hf import HFEngine


def run(stage: DPOStage, ctx: StageContext) -> dict[str, float]:
    torch.manual_seed(ctx.seed)
    cfg, train = ctx.config, stage.train
    model, tokenizer = load_policy(
        ctx.input_model, cfg.model.dtype, cfg.model.device, cfg.run.seed, cfg.model.lora
    )
    pad, micro = tokenizer.pad_token_id, train.micro_batch_size
    pairs = encode_pairs(stage.data, tokenizer, train.max_length)
    held_out = (
        encode_pairs(stage.eval_pairs, tokenizer, train.max_length) if stage.eval_pairs else []
    )
    refs = held_out_refs = None
    if stage.dpo.reference == "input":
        with reference_mode(model):  # LoRA: the adapter is disabled
            refs = pair_logps(model, pairs, pad, micro)
            held_out_refs = pair_logps(model, held_out, pad, micro) if held_out else None
    steps = train.max_steps or max(1, math.ceil(train.epochs * len(pairs) / train.batch_size))
    learner = Learner(model, train, steps)
    evaluator = build_evaluator(stage.eval, None, ctx)
    engine = HFEngine(model, tokenizer)
    sampler = PromptSampler(list(range(len(pairs))), min(train.batch_size, len(pairs)), ctx.seed)
    loss_fn = partial(dpo.loss, cfg=stage.dpo)
    final: dict[str, float] = {}
    start = 0
    if (state := ctx.resume(learner)) is not None:
        sampler.load_state(state["sampler"])
        start, final = state["step"], state["final"]
    elif held_out:
        ctx.tracker.log(pair_metrics(model, held_out, held_out_refs, pad, micro), 0)
    progress = tqdm(
        range(start + 1, steps + 1),
        desc=f"{stage.name} (dpo)",
        unit="step",
        dynamic_ncols=True,
        initial=start,
        total=steps,
        disable=not is_main(),
    )
    for step in progress:
        index = sampler.next()
        ref_c, ref_r = (refs.chosen_P[index], refs.rejected_P[index]) if refs else (None, None)
        batch = dpo.make_batch([pairs[i] for i in index], pad, ref_c, ref_r)
        metrics = {f"train/{k}": v for k, v in learner.update(batch, loss_fn, dpo.forward).items()}
        progress.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        if step == steps or (stage.eval.every and step % stage.eval.every == 0):
            results: dict[str, float] = {}
            if held_out:
                results.update(pair_metrics(model, held_out, held_out_refs, pad, micro))
            if evaluator is not None:
                results.update(evaluator(engine, tokenizer))
            if results:
                final = results
                metrics.update(results)
                progress.write(f"[{stage.name}] step {step}: " + brief(results))
        if step == 1:
            metrics["data/skipped_rows"] = float(pairs.skipped)
        ctx.tracker.log(metrics, step)
        ctx.checkpoint(step, steps, learner, sampler=sampler.state(), final=final)
    ctx.save_output(model, tokenizer)
    return final


def encode_pairs(data: DataConfig, tokenizer, max_length: int) -> Rows:
    """Encoded pairs; bad rows stop the stage, or are skipped and counted (`on_bad_row`)."""
    return load_pairs(
        data,
        lambda row, index: encode_pair(row, tokenizer, data.source, index),
        lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)),
        max_length,
    )


def pair_logps(model, pairs: list[EncodedPair], pad: int, micro: int) -> dpo.PairLogps:
    """Summed response logprobs of every pair, `micro` pairs per forward, no gradient."""
    parts = [
        dpo.sequence_logps(model, dpo.make_batch(pairs[i : i + micro], pad), micro)
        for i in range(0, len(pairs), micro)
    ]
    return dpo.PairLogps(*(torch.cat([getattr(p, f.name) for p in parts])
                           for f in dataclasses.fields(dpo.PairLogps)))  # fmt: skip


def pair_metrics(
    model, pairs: list[EncodedPair], refs: dpo.PairLogps | None, pad: int, micro: int
) -> dict[str, float]:
    """Held-out preference metrics of the current policy."""
    logps = pair_logps(model, pairs, pad, micro)
    out = {
        "eval/pair_accuracy": (logps.chosen_P > logps.rejected_P).float().mean().item(),
        "eval/logps_chosen": logps.chosen_P.mean().item(),
        "eval/logps_rejected": logps.rejected_P.mean().item(),
    }
    if refs is not None:
        margin = (logps.chosen_P - refs.chosen_P) - (logps.rejected_P - refs.rejected_P)
        out["eval/reward_accuracy"] = (margin > 0).float().mean().item()
        out["eval/reward_margin"] = margin.mean().item()
    return out
