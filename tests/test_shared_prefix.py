"""`shared_prefix`: rows that share a prompt run it once, with the plain path's values and
gradients.

A batch of groups (prompts of different lengths, several samples each, completions of
different lengths, right padding) through `token_logprobs` with a loss mask must equal the
plain forward at every loss position, in float32, for the logprobs and for the gradients of a
weighted masked sum; a LoRA model and a Llama model too. The plan runs only when it saves
tokens; `longest_first` keeps a prompt's rows together.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posttrain import logprobs, shared_prefix
from posttrain.batch import GRPOBatch, SFTBatch, longest_first, pad_right
from tests.small_models import random_lm


def _groups(prompt_lengths=(5, 3, 7), n=3, seed=0):
    """Rows of `n` samples per prompt, right-padded: ids, attention and loss masks."""
    gen = torch.Generator().manual_seed(seed)
    rows, starts = [], []
    for length in prompt_lengths:
        prompt = torch.randint(1, 97, (length,), generator=gen).tolist()
        for _ in range(n):
            size = int(torch.randint(1, 8, (1,), generator=gen))
            rows.append(prompt + torch.randint(1, 97, (size,), generator=gen).tolist())
            starts.append(length)
    ids, attention = pad_right(rows, 0)
    loss = torch.zeros_like(ids)
    for row, (seq, start) in enumerate(zip(rows, starts, strict=True)):
        loss[row, start : len(seq)] = 1
    return ids, attention, loss


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _compare(model, ids, attention, loss):
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1))
    plain = logprobs.token_logprobs(model, ids, attention)
    (plain * loss * weights).sum().backward()
    want = _grads(model)
    model.zero_grad()

    assert shared_prefix.plan(ids, attention, loss) is not None  # the shared path runs
    got = logprobs.token_logprobs(model, ids, attention, loss)
    assert got.shape == ids.shape
    torch.testing.assert_close(got * loss, plain * loss, atol=1e-5, rtol=0)
    assert torch.all(got[loss == 0] == 0)
    (got * loss * weights).sum().backward()
    for g, w in zip(_grads(model), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_shared_prefix_equals_plain_values_and_gradients():
    _compare(random_lm(), *_groups())


def test_shared_prefix_llama_and_equal_prompt_lengths():
    """Equal prompt lengths: the prefix pass runs without an attention mask."""
    _compare(random_lm("llama"), *_groups(prompt_lengths=(4, 4), n=4, seed=2))


def test_shared_prefix_with_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        random_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"])
    )
    for name, p in model.named_parameters():  # nonzero B matrices: the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    _compare(model, *_groups(seed=3))


def test_no_grad_values_match():
    model = random_lm()
    ids, attention, loss = _groups(seed=4)
    with torch.no_grad():
        plain = logprobs.token_logprobs(model, ids, attention)
        got = logprobs.token_logprobs(model, ids, attention, loss)
    torch.testing.assert_close(got * loss, plain * loss, atol=1e-5, rtol=0)


def test_plan_groups_rows_by_exact_prefix():
    ids = torch.tensor([[5, 6, 7, 1], [5, 6, 8, 2], [5, 6, 7, 3], [9, 6, 7, 4]])
    attention = torch.ones_like(ids)
    loss = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]])
    plan = shared_prefix.plan(ids, attention, loss)
    assert plan is not None
    assert plan.lengths == [3, 3, 3, 3]
    assert plan.group_B.tolist() == [0, 1, 0, 2]
    assert plan.firsts == [0, 1, 3]


def test_plan_declines_when_nothing_or_little_is_saved():
    ids, attention, loss = _groups(prompt_lengths=(5, 3), n=1)
    assert shared_prefix.plan(ids, attention, loss) is None  # no repeated prompt
    # One repeated token in 10+ tokens per row is under MIN_SAVED_FRACTION.
    ids = torch.tensor([[4] + list(range(10, 30)), [4] + list(range(30, 50))])
    loss = torch.ones_like(ids)
    loss[:, 0] = 0
    assert shared_prefix.plan(ids, torch.ones_like(ids), loss) is None
    loss[0, 0] = 1  # a loss on a first token: no prefix to share
    assert shared_prefix.plan(ids, torch.ones_like(ids), loss) is None
    loss[0] = 0  # a row without loss positions
    assert shared_prefix.plan(ids, torch.ones_like(ids), loss) is None


def test_longest_first_keeps_a_prompts_rows_together():
    ids, attention, loss = _groups(prompt_lengths=(2, 2, 2), n=3, seed=5)
    batch = GRPOBatch(ids, attention, loss, torch.zeros(9), None, None, 9, int(loss.sum()))
    ordered = longest_first(batch)
    groups = shared_prefix.prefix_groups(ordered.input_ids_BT, ordered.loss_mask_BT)[1]
    assert groups == sorted(groups)  # contiguous, in order of first appearance
    lengths = ordered.attention_mask_BT.sum(1).view(3, 3)
    assert torch.all(lengths[:, :-1] >= lengths[:, 1:])  # longest first within a prompt
    longest = lengths.max(1).values
    assert torch.all(longest[:-1] >= longest[1:])  # prompts by their longest row
    assert sorted(map(tuple, ordered.input_ids_BT.tolist())) == sorted(map(tuple, ids.tolist()))


def test_longest_first_without_shared_prompts_sorts_by_length():
    ids, attention, loss = _groups(prompt_lengths=(2, 3, 4, 5), n=1, seed=6)
    batch = SFTBatch(ids, attention, loss, 4, int(loss.sum()))
    ordered = longest_first(batch)
    want = torch.sort(attention.sum(1), descending=True, stable=True).indices
    assert torch.equal(ordered.input_ids_BT, ids[want])


@pytest.mark.parametrize("micro_batch", [3, 4, 9])
def test_learner_step_with_shared_prefix_equals_plain(micro_batch, monkeypatch):
    """One GRPO-shaped optimizer step: the same loss and accumulated gradients whether the
    prompts are shared or not (the plan forced off), with micro-batches that cut across
    groups."""
    from posttrain.config.schema import OptimConfig
    from posttrain.learner import Learner

    ids, attention, loss = _groups(seed=7)
    batch = SFTBatch(ids, attention, loss, ids.shape[0], int(loss.sum()))

    def sft(lp, micro):
        return -(lp * micro.loss_mask_BT).sum() / micro.num_tokens, {}

    results = []
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(shared_prefix, "MIN_SAVED_FRACTION", 2.0)
        model = random_lm()
        learner = Learner(model, OptimConfig(lr=1e-2, micro_batch_size=micro_batch), 1)
        stats = learner.update(dataclasses.replace(batch), sft)
        results.append((stats["loss"], [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_layers_take_the_plain_path():
    """A KV cache inside compiled layers would recompile each layer: not shared."""
    from posttrain.compile_layers import compile_layers

    model = random_lm()
    compile_layers(model, True)
    ids, attention, loss = _groups(seed=8)
    with torch.no_grad():
        got = logprobs.token_logprobs(model, ids, attention, loss)
    prompt = (loss == 0) & (attention == 1)
    prompt[:, 0] = False  # position 0 has no logprob on any path
    assert torch.all(got[prompt] != 0)  # the plain path computed the prompts' logprobs


def test_longest_first_can_sort_by_length_only():
    """`keep_prompts=False` (compiled layers, which never share): a plain sort by length."""
    ids, attention, loss = _groups(prompt_lengths=(2, 2, 2), n=3, seed=5)
    batch = GRPOBatch(ids, attention, loss, torch.zeros(9), None, None, 9, int(loss.sum()))
    ordered = longest_first(batch, keep_prompts=False)
    want = torch.sort(attention.sum(1), descending=True, stable=True).indices
    assert torch.equal(ordered.input_ids_BT, ids[want])


@pytest.mark.gpu
@torch.no_grad()
def test_shared_prefix_cuda_bf16():
    """On the GPU in bf16 (layers not compiled): the shared path within bf16 rounding of the
    plain one."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = random_lm().to("cuda", torch.bfloat16)
    ids, attention, loss = _groups(seed=9)
    plain = logprobs.token_logprobs(model, ids, attention).float().cpu()
    got = logprobs.token_logprobs(model, ids, attention, loss).float().cpu()
    gap = ((got - plain) * loss).abs().max().item()
    print(f"shared vs plain, bf16: max gap {gap:.4f}")
    assert gap < 0.1


def test_longest_first_ignores_prefixes_too_short_to_share():
    """Losses from the second token on (a one-token prefix, shared by many rows) save nothing:
    the rows are sorted by length alone, whatever their first token."""
    gen = torch.Generator().manual_seed(10)
    rows = [[int(t)] + torch.randint(1, 97, (int(n),), generator=gen).tolist()
            for t, n in zip([5, 6, 5, 6, 5, 6], [3, 9, 4, 8, 2, 7], strict=True)]  # fmt: skip
    ids, attention = pad_right(rows, 0)
    loss = attention.clone()
    loss[:, 0] = 0
    batch = SFTBatch(ids, attention, loss, 6, int(loss.sum()))
    ordered = longest_first(batch)
    want = torch.sort(attention.sum(1), descending=True, stable=True).indices
    assert torch.equal(ordered.input_ids_BT, ids[want])
