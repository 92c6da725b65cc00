"""The reward-model stage: preference pairs -> a one-label sequence-classification model.

The model is `AutoModelForSequenceClassification(num_labels=1)` built from the stage's input
model (its body; the score head is new, seeded by the run seed; with `model.lora` a LoRA adapter
plus the score head are trained and merged into the saved model) and trained with the
Bradley-Terry loss (`algorithms/rm.py`). Held-out pairs (`eval_pairs`) are scored before
training, every `eval_every` steps and at the end: `eval/pair_accuracy` is the share of pairs
with r(chosen) > r(rejected). The output folder (`<stage>/model`, with `pad_token_id` set in
its config) loads with the `reward_model` reward:

    rewards: [{name: reward_model, args: {path: runs/<run>/<rm stage>/model}}]

and scores exactly the texts it was trained on. An rm stage does not hand its model to the
next stage (the pipeline keeps the policy chain: the next stage gets this stage's input).
Checkpoints (model, optimizer, sampler, RNG) let an interrupted stage resume exactly.

Test: `pytest tests/test_rm_stage.py`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from tqdm.auto import tqdm

from posttrain.algorithms import rm
from posttrain.checkpoint import save_output
from posttrain.config.schema import DataConfig, LoraSpec, RMStage
from posttrain.data.load import Rows
from posttrain.data.pairs import load_pairs
from posttrain.distributed import is_main
from posttrain.evaluate import brief
from posttrain.learner import Learner
from posttrain.models.load import DTYPES, pick_device, resolve_model_path
from posttrain.models.lora import is_adapter_folder, is_peft
from posttrain.sampler import PromptSampler
from posttrain.stages.context import StageContext


def run(stage: RMStage, ctx: StageContext) -> dict[str, float]:
    torch.manual_seed(ctx.seed)
    cfg, train = ctx.config, stage.train
    model, tokenizer = load_reward_model(
        ctx.input_model, cfg.model.dtype, cfg.model.device, cfg.run.seed, cfg.model.lora
    )
    pad, micro = tokenizer.pad_token_id, train.micro_batch_size
    margin_column = stage.rm.margin_column
    pairs = encode_pairs(stage.data, tokenizer, train.max_length, margin_column)
    held_out = (
        encode_pairs(stage.eval_pairs, tokenizer, train.max_length, None)
        if stage.eval_pairs
        else []
    )
    steps = train.max_steps or max(1, math.ceil(train.epochs * len(pairs) / train.batch_size))
    learner = Learner(model, train, steps)
    sampler = PromptSampler(list(range(len(pairs))), min(train.batch_size, len(pairs)), ctx.seed)
    loss_fn = partial(rm.loss, cfg=stage.rm)
    final: dict[str, float] = {}
    start = 0
    if (state := ctx.resume(learner)) is not None:
        sampler.load_state(state["sampler"])
        start, final = state["step"], state["final"]
    elif held_out:
        first = pair_metrics(model, held_out, pad, micro)
        ctx.tracker.log(first, 0)
        if is_main():
            print(f"[{stage.name}] before training: " + brief(first))
    progress = tqdm(
        range(start + 1, steps + 1),
        desc=f"{stage.name} (rm)",
        unit="step",
        dynamic_ncols=True,
        initial=start,
        total=steps,
        disable=not is_main(),
    )
    for step in progress:
        batch = rm.make_batch([pairs[i] for i in sampler.next()], pad)
        metrics = {f"train/{k}": v for k, v in learner.update(batch, loss_fn, rm.forward).items()}
        progress.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        if held_out and (step == steps or (stage.eval_every and step % stage.eval_every == 0)):
            final = pair_metrics(model, held_out, pad, micro)
            metrics.update(final)
            progress.write(f"[{stage.name}] step {step}: " + brief(final))
        if step == 1:
            metrics["data/skipped_rows"] = float(pairs.skipped)
        ctx.tracker.log(metrics, step)
        ctx.checkpoint(step, steps, learner, sampler=sampler.state(), final=final)
    if is_peft(model):  # the scorer loads a plain model: save the adapter merged in
        model = model.merge_and_unload()
    save_output(model, tokenizer, ctx.output_model, None)
    return final


def load_reward_model(path: str, dtype: str, device: str, seed: int, lora: LoraSpec | None = None):
    """`(model, tokenizer)`: a one-label sequence-classification model from `path` (a causal
    LM gets a new score head), `pad_token_id` set in its config, in train mode on `device`.
    With `lora`, a LoRA adapter is trained with the score head fully trainable."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    resolved = resolve_model_path(path, seed)
    if is_adapter_folder(resolved):
        raise ValueError(
            f"the rm stage builds a reward model from a full model, but {path!r} is a LoRA "
            "adapter folder: set model.lora.merge: true so earlier stages save merged models"
        )
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved, num_labels=1, dtype=DTYPES[dtype]
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="SEQ_CLS",  # keeps the new score head trainable (modules_to_save)
            ),
        )
    model.to(pick_device(device)).train()
    return model, tokenizer


def encode_pairs(data: DataConfig, tokenizer, max_length: int, margin_column: str | None) -> Rows:
    """Encoded pairs; bad rows stop the stage, or are skipped and counted (`on_bad_row`)."""
    return load_pairs(
        data,
        lambda row, index: rm.encode_rm_pair(row, tokenizer, data.source, index, margin_column),
        lambda p: max(len(p.chosen_ids), len(p.rejected_ids)),
        max_length,
    )


def pair_metrics(model, pairs: list[rm.RMPair], pad: int, micro: int) -> dict[str, float]:
    """Held-out metrics: pair accuracy, mean margin and mean reward of each side."""
    parts = [
        rm.pair_rewards(model, rm.make_batch(pairs[i : i + micro], pad), micro)
        for i in range(0, len(pairs), micro)
    ]
    chosen = torch.cat([p.chosen_P for p in parts])
    rejected = torch.cat([p.rejected_P for p in parts])
    diff = chosen - rejected
    return {
        "eval/pair_accuracy": (diff > 0).float().mean().item(),
        "eval/reward_margin": diff.mean().item(),
        "eval/chosen_reward": chosen.mean().item(),
        "eval/rejected_reward": rejected.mean().item(),
    }
