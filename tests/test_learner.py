"""The learner: SFT loss falls on the tiny model; micro-batching does not change the step."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.algorithms import sft
from posttrain.config.schema import OptimConfig, SFTTrainConfig
from posttrain.data.arithmetic import arithmetic_rows
from posttrain.data.format import encode_example
from posttrain.learner import Learner, NonFiniteError


def _examples(tokenizer, count=32):
    rows = arithmetic_rows("train")[:count]
    return [encode_example(r, tokenizer, "builtin://arithmetic", i) for i, r in enumerate(rows)]


def test_sft_loss_falls(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    batch = sft.make_batch(_examples(tokenizer), tokenizer.pad_token_id)
    learner = Learner(model, SFTTrainConfig(lr=1e-3, micro_batch_size=16), total_steps=30)
    losses = [learner.update(batch, sft.loss)["loss"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert learner.step == 30


def test_sft_batch_masks_prompt_tokens(tiny):
    _, tokenizer = tiny
    examples = _examples(tokenizer, 2)
    batch = sft.make_batch(examples, tokenizer.pad_token_id)
    for row, (prompt, completion) in enumerate(examples):
        mask = batch.loss_mask_BT[row].tolist()
        expected = [0] * len(prompt) + [1] * len(completion)
        assert mask[: len(expected)] == expected
        assert sum(mask) == len(completion)  # completion digits + EOS, no padding
    assert batch.num_tokens == sum(len(c) for _, c in examples)
    with_prompt = sft.make_batch(examples, tokenizer.pad_token_id, train_on_prompt=True)
    assert with_prompt.num_tokens == sum(len(p) + len(c) - 1 for p, c in examples)


def test_micro_batches_give_the_same_step(tiny):
    model, tokenizer = tiny
    twin = copy.deepcopy(model)
    batch = sft.make_batch(_examples(tokenizer, 8), tokenizer.pad_token_id)
    whole = Learner(model, OptimConfig(lr=1e-3, micro_batch_size=8), 1).update(batch, sft.loss)
    split = Learner(twin, OptimConfig(lr=1e-3, micro_batch_size=3), 1).update(batch, sft.loss)
    assert abs(whole["loss"] - split["loss"]) < 1e-5
    assert abs(whole["grad_norm"] - split["grad_norm"]) < 1e-4
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        # Adam normalises each element, so float noise in tiny gradients shows at ~lr * 1e-2.
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_warmup_and_cosine_schedule(tiny):
    model, _ = tiny
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    learner = Learner(model, cfg, total_steps=6)
    factors = []
    for _ in range(7):
        factors.append(learner.scheduler.get_last_lr()[0])
        learner.scheduler.step()
    assert factors[:3] == [1 / 3, 2 / 3, 1.0]
    assert factors[-1] < 1e-9  # decayed to 0 at the last step


def test_non_finite_loss_stops_with_the_step(tiny):
    model, tokenizer = tiny
    batch = sft.make_batch(_examples(tokenizer, 4), tokenizer.pad_token_id)
    learner = Learner(model, OptimConfig(), 1)

    def nan_loss(logprobs, micro):
        return logprobs.sum() * float("nan"), {}

    with pytest.raises(NonFiniteError, match="optimizer step 1"):
        learner.update(batch, nan_loss)


def test_non_finite_loss_can_skip_the_step(tiny, capsys):
    model, tokenizer = tiny
    batch = sft.make_batch(_examples(tokenizer, 4), tokenizer.pad_token_id)
    learner = Learner(model, OptimConfig(lr=1e-3, on_nonfinite="skip"), 3)
    before = [p.detach().clone() for p in model.parameters()]

    def nan_loss(logprobs, micro):
        return logprobs.sum() * float("nan"), {}

    assert learner.update(batch, nan_loss)["skipped_steps"] == 1.0
    assert learner.step == 0  # no optimizer step, no schedule step
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert "loss is nan at optimizer step 1 (update call 1): step skipped (1 so far)" in (
        capsys.readouterr().out
    )
    metrics = learner.update(batch, sft.loss)
    assert metrics["skipped_steps"] == 1.0 and learner.step == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_non_finite_gradient_stops_with_advice(tiny):
    model, tokenizer = tiny
    batch = sft.make_batch(_examples(tokenizer, 4), tokenizer.pad_token_id)
    learner = Learner(model, OptimConfig(), 1)

    def exploding(logprobs, micro):
        # finite loss (0), but d sqrt(u)/du is infinite at u = 0: the gradient is NaN
        return (logprobs.sum() * 0).abs().sqrt(), {}

    with pytest.raises(
        NonFiniteError, match=r"^gradient norm is nan at optimizer step 1 .*on_nonfinite: skip"
    ):
        learner.update(batch, exploding)


def test_longest_first_orders_rows_by_their_longest_mask():
    from posttrain.batch import PairBatch, SFTBatch, longest_first, pad_right

    ids, mask = pad_right([[1] * 2, [1] * 5, [1] * 3], 0)
    batch = SFTBatch(ids, mask, mask.clone(), 3, 10)
    ordered = longest_first(batch)
    assert ordered.attention_mask_BT.sum(-1).tolist() == [5, 3, 2]
    assert (ordered.num_sequences, ordered.num_tokens) == (3, 10)  # counts stay whole-batch
    chosen, chosen_mask = pad_right([[1] * 4, [1] * 1], 0)
    rejected, rejected_mask = pad_right([[1] * 2, [1] * 6], 0)
    pairs = PairBatch(chosen, chosen_mask, chosen_mask, rejected, rejected_mask, rejected_mask,
                      torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4]), 2)  # fmt: skip
    assert longest_first(pairs).ref_chosen_P.tolist() == pytest.approx([0.2, 0.1])
