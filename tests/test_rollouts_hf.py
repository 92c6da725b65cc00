"""The HF rollout engine: shapes, stopping, logprobs that agree with the trainer, weight sync."""

from __future__ import annotations

import torch

from posttrain.batch import pad_right
from posttrain.logprobs import token_logprobs
from rollouts import Group, RolloutEngine, SamplingParams, create_engine
from rollouts.hf import inverse_cdf

PROMPTS = ["12+34=", "7+8=", "99+99="]


def test_generate_shapes_and_metadata(tiny):
    model, tokenizer = tiny
    engine = create_engine("hf", model=model, tokenizer=tokenizer, batch_size=4)
    assert isinstance(engine, RolloutEngine)
    rows = [{"answer": str(i)} for i in range(3)]
    groups = engine.generate(PROMPTS, 5, SamplingParams(max_new_tokens=6, seed=1), rows)
    assert [type(g) for g in groups] == [Group] * 3
    assert [g.prompt for g in groups] == PROMPTS
    assert [g.row for g in groups] == rows
    for g in groups:
        assert len(g.samples) == 5
        for s in g.samples:
            assert 1 <= len(s.completion_ids) <= 6
            assert len(s.logprobs) == len(s.completion_ids)
            assert all(lp <= 0 for lp in s.logprobs)
            assert s.prompt_ids == tokenizer(s.prompt, add_special_tokens=False).input_ids
            stopped = s.completion_ids[-1] == tokenizer.eos_token_id
            assert s.finish_reason == ("stop" if stopped else "length")
            assert s.policy_version == 0
            assert s.completion == tokenizer.decode(s.completion_ids, skip_special_tokens=True)


def test_logprobs_agree_with_trainer(tiny):
    model, tokenizer = tiny
    engine = create_engine("hf", model=model, tokenizer=tokenizer)
    groups = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=8, seed=3))
    samples = [s for g in groups for s in g.samples]
    ids, mask = pad_right(
        [s.prompt_ids + s.completion_ids for s in samples], tokenizer.pad_token_id
    )
    with torch.no_grad():
        trainer = token_logprobs(model.eval(), ids, mask)
    for row, s in enumerate(samples):
        start = len(s.prompt_ids)
        expected = trainer[row, start : start + len(s.completion_ids)]
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-4, rtol=0)


def test_engine_logprobs_build_no_kv_cache(tiny):
    """The engine's logprobs (the weight-sync probe) run without a KV cache: with one, the
    trainer's compiled decoder layers recompile once per layer."""
    model, tokenizer = tiny
    engine = create_engine("hf", model=model, tokenizer=tokenizer)
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("past_key_values")), with_kwargs=True
    )
    try:
        engine.logprobs([[1, 5, 6, 7], [1, 8]])
        model(input_ids=torch.tensor([[1, 5, 6]]))  # transformers' default builds one
    finally:
        hook.remove()
    assert seen[0] is None and seen[1] is not None, seen


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(tiny):
    model, tokenizer = tiny
    engine = create_engine("hf", model=model, tokenizer=tokenizer)
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    a = engine.generate(PROMPTS, 2, greedy)
    assert all(len({s.completion for s in g.samples}) == 1 for g in a)
    seeded = SamplingParams(max_new_tokens=6, seed=7)
    first = [s.completion_ids for g in engine.generate(PROMPTS, 3, seeded) for s in g.samples]
    second = [s.completion_ids for g in engine.generate(PROMPTS, 3, seeded) for s in g.samples]
    assert first == second


def test_inverse_cdf_draws_from_the_distribution():
    """Token frequencies over 200k draws match the normalised weights (within 5 standard
    errors); tokens of weight 0 (first, middle, last) are never drawn."""
    weights = torch.tensor([0.0, 3.0, 1.0, 0.0, 0.5, 2.0, 0.0])
    rows = 200_000
    tokens = inverse_cdf(weights.expand(rows, -1), torch.Generator().manual_seed(0))
    want = (weights / weights.sum()).double()
    freq = torch.bincount(tokens, minlength=7).double() / rows
    stderr = (want * (1 - want) / rows).sqrt()
    assert torch.all((freq - want).abs() <= 5 * stderr), (freq, want)
    assert torch.all(freq[weights == 0] == 0)


def test_top_p_tiny_keeps_only_the_top_token(tiny):
    model, tokenizer = tiny
    engine = create_engine("hf", model=model, tokenizer=tokenizer)
    greedy = engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=5, temperature=0))
    nucleus = engine.generate(PROMPTS, 3, SamplingParams(max_new_tokens=5, top_p=1e-6, seed=0))
    for g, n in zip(greedy, nucleus, strict=True):
        assert {s.completion for s in n.samples} == {g.samples[0].completion}


def test_load_weights_changes_outputs_and_version(tiny, tiny_path):
    from posttrain.models.load import load_policy

    model, tokenizer = tiny
    other, _ = load_policy(tiny_path, "float32", "cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine = create_engine("hf", model=model, tokenizer=tokenizer)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    before = [g.samples[0].completion_ids for g in engine.generate(PROMPTS, 1, greedy)]
    engine.load_weights(other, version=3)
    after = engine.generate(PROMPTS, 1, greedy)
    assert [g.samples[0].completion_ids for g in after] != before
    assert {g.samples[0].policy_version for g in after} == {3}
    assert torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_finish_cuts_each_row_after_its_first_stop_token():
    from rollouts.hf import _finish

    tokens = torch.tensor([[5, 6, 7, 8], [9, 2, 0, 0], [3, 2, 4, 2], [2, 0, 0, 0]])
    logps = -torch.arange(16, dtype=torch.float32).reshape(4, 4)
    rows = _finish(tokens, logps, torch.tensor([2, 4]))
    assert [r[0] for r in rows] == [[5, 6, 7, 8], [9, 2], [3, 2], [2]]
    assert [r[1] for r in rows] == [[0, -1, -2, -3], [-4, -5], [-8, -9], [-12]]
    assert [r[2] for r in rows] == ["length", "stop", "stop", "stop"]
    # Without stop tokens every row runs to the end.
    rows = _finish(tokens, logps, torch.tensor([], dtype=torch.long))
    assert [r[0] for r in rows] == tokens.tolist() and {r[2] for r in rows} == {"length"}
