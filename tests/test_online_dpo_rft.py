"""Online DPO and rejection-sampling fine-tuning: pairs and kept sets built from groups the
tiny model really generated, the reference refresh, a DPO step's direction, the config checks,
and short end-to-end stages (every trainable parameter changes, metrics are logged).

Run: `pytest tests/test_online_dpo_rft.py`.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from posttrain.algorithms import dpo, online_dpo, rft
from posttrain.config import load_config
from posttrain.config.schema import (
    DPOParams,
    OnlineDPOParams,
    OnlineDPOStage,
    OptimConfig,
    PipelineConfig,
    RFTParams,
    RFTStage,
)
from posttrain.learner import Learner
from posttrain.pipeline import run_pipeline
from posttrain.stages.grpo import frozen_reference
from rollouts import Group, SamplingParams, create_engine

PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (30, 4), (55, 5), (7, 81), (9, 9), (62, 3)]]


def chars(completions: list[str]) -> list[float]:
    """A spread of scores from the characters (ties happen, but not always)."""
    return [float(sum(map(ord, c)) % 4) for c in completions]


def _generate(model, tokenizer, n: int, temperature: float = 1.0):
    engine = create_engine("hf", model=model, tokenizer=tokenizer)
    sampling = SamplingParams(max_new_tokens=3, temperature=temperature, seed=0)
    return engine.generate(PROMPTS, n, sampling)


def test_pairs_from_generated_groups(tiny):
    model, tokenizer = tiny
    groups = _generate(model, tokenizer, n=4)
    # Prompts 0 and 1 score 0 everywhere: ties by construction.
    rewards = [
        r if g > 1 else 0.0
        for g, group in enumerate(groups)
        for r in chars([s.completion for s in group.samples])
    ]
    grid = torch.tensor(rewards).view(len(groups), 4)
    spread = (grid.max(1).values - grid.min(1).values).tolist()

    prepared = online_dpo.make_batch(groups, rewards, 0.0, tokenizer.pad_token_id, None, 8)
    _, selection = online_dpo.make_pairs(groups, rewards, 0.0)
    assert selection.dropped_ties == sum(m == 0 for m in spread) >= 2
    assert prepared.metrics["pairs/dropped_ties"] == selection.dropped_ties
    assert prepared.metrics["pairs/kept"] == len(selection.pairs) == sum(m > 0 for m in spread)
    for row, pair in enumerate(selection.pairs):
        group, scores = groups[pair.prompt_index], grid[pair.prompt_index]
        assert scores[pair.chosen_index] == scores.max() > scores[pair.rejected_index]
        assert scores[pair.rejected_index] == scores.min()
        chosen = group.samples[pair.chosen_index]
        rejected = group.samples[pair.rejected_index]
        width = len(chosen.prompt_ids) + len(chosen.completion_ids)
        assert prepared.batch.chosen_ids_PT[row, :width].tolist() == (
            chosen.prompt_ids + chosen.completion_ids
        )
        assert prepared.batch.rejected_mask_PT[row].sum() == len(rejected.completion_ids)
        k = pair.prompt_index * 4
        assert prepared.advantages[k + pair.chosen_index] == 1.0
        assert prepared.advantages[k + pair.rejected_index] == -1.0
    assert prepared.batch.ref_chosen_P is None  # reference-free

    small = online_dpo.make_batch(groups, rewards, 3.0, tokenizer.pad_token_id, None, 8)
    assert small.metrics["pairs/dropped_small_margin"] == sum(0 < m < 3 for m in spread)
    assert small.metrics["pairs/kept"] == sum(m >= 3 for m in spread)


def test_dpo_step_on_generated_pairs_prefers_chosen(tiny):
    model, tokenizer = tiny
    groups = _generate(model, tokenizer, n=4)
    rewards = chars([s.completion for g in groups for s in g.samples])
    algorithm = online_dpo.OnlineDPO(
        OnlineDPOParams(),
        DPOParams(beta=0.1),
        tokenizer.pad_token_id,
        model,
        frozen_reference(model),
        micro_batch_size=4,
    )
    batch = algorithm.prepare(groups, rewards).batch
    assert batch.ref_chosen_P is not None

    def margin() -> float:
        logps = dpo.sequence_logps(model, batch, 8)
        return (logps.chosen_P - logps.rejected_P).mean().item()

    before = margin()
    Learner(model, OptimConfig(lr=1e-3), 1).update(batch, algorithm.loss, algorithm.forward)
    assert margin() > before


def test_reference_refresh_copies_the_policy(tiny):
    model, tokenizer = tiny
    groups = _generate(model, tokenizer, n=2)
    rewards = chars([s.completion for g in groups for s in g.samples])
    reference = frozen_reference(model)
    algorithm = online_dpo.OnlineDPO(
        OnlineDPOParams(ref_refresh_every=2),
        DPOParams(),
        tokenizer.pad_token_id,
        model,
        reference,
        micro_batch_size=8,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)

    def refreshed(version: int) -> float:
        samples_of = [
            Group(g.prompt, [dataclasses.replace(s, policy_version=version) for s in g.samples])
            for g in groups
        ]
        return algorithm.prepare(samples_of, rewards).metrics["online_dpo/reference_refreshed"]

    assert [refreshed(0), refreshed(1)] == [0.0, 0.0]
    assert not torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert refreshed(2) == 1.0  # before iterations 3, 5, 7, ...
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not any(q.requires_grad for q in reference.parameters())

    with pytest.raises(ValueError, match="set ref_refresh_every: 0"):
        online_dpo.OnlineDPO(OnlineDPOParams(ref_refresh_every=2), DPOParams(), 0, model, None, 8)


@pytest.mark.parametrize(
    ("every", "refreshed_versions"),
    [(0, []), (1, [1, 2, 3, 4, 5]), (2, [2, 4]), (5, [5])],
)
def test_refresh_schedule(every, refreshed_versions):
    due = [v for v in range(6) if online_dpo.refresh_due(v, every)]
    assert due == refreshed_versions


def test_kept_set_from_generated_groups_is_deduplicated(tiny):
    model, tokenizer = tiny
    # Greedy decoding: the 4 samples of a prompt are the same text, so 3 are repeats. The
    # untrained model runs to the length limit, so truncated samples are allowed here.
    greedy = _generate(model, tokenizer, n=4, temperature=0.0)
    rewards = [1.0] * 24
    params = RFTParams(top_k=2, drop_truncated=False)
    prepared = rft.make_batch(greedy, rewards, params, tokenizer.pad_token_id)
    assert prepared.metrics["rft/duplicate_fraction"] == pytest.approx(18 / 24)
    assert prepared.metrics["rft/acceptance_rate"] == pytest.approx(6 / 24)
    assert prepared.batch.num_sequences == 6

    sampled = _generate(model, tokenizer, n=4)
    rewards = chars([s.completion for g in sampled for s in g.samples])
    params = RFTParams(top_k=2, threshold=1.0, drop_truncated=False)
    prepared = rft.make_batch(sampled, rewards, params, tokenizer.pad_token_id)
    selection = rft.select(sampled, rewards, params)
    kept = [(g, sampled[g].samples[k], rewards[4 * g + k]) for g, k in selection.indices]
    for g, group in enumerate(sampled):
        texts = [s.completion for gg, s, _ in kept if gg == g]
        assert len(texts) == len(set(texts)) <= 2
        distinct = {s.completion: rewards[4 * g + k] for k, s in enumerate(group.samples)}
        expected = sorted((r for r in distinct.values() if r >= 1.0), reverse=True)[:2]
        assert sorted((r for gg, _, r in kept if gg == g), reverse=True) == expected
    assert prepared.metrics["rft/acceptance_rate"] == pytest.approx(len(kept) / 24)
    assert prepared.metrics["rft/kept"] == len(kept) == prepared.batch.num_sequences
    assert prepared.batch.loss_mask_BT.sum(-1).tolist() == [
        len(s.completion_ids) for _, s, _ in kept
    ]
    assert prepared.advantages == selection.keep_GK.float().reshape(-1).tolist()


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"algo": "online_dpo", "rollout": {"n": 1}}, "rollout.n must be >= 2"),
        (
            {"algo": "online_dpo", "online_dpo": {"ref_refresh_every": 5},
             "dpo": {"reference": "none", "loss_type": "simpo"}},
            "ref_refresh_every needs dpo.reference: input",
        ),
        ({"algo": "online_dpo", "rewards": []}, "at least one reward"),
        ({"algo": "rft", "rft": {"top_k": None, "threshold": None}}, "set top_k, threshold"),
        ({"algo": "rft", "rft": {"top_k": 0}}, "greater than or equal to 1"),
    ],
)  # fmt: skip
def test_config_checks(stage, message):
    model = {"online_dpo": OnlineDPOStage, "rft": RFTStage}[stage["algo"]]
    fields = {
        "name": "s",
        "data": {"source": "builtin://arithmetic"},
        "rewards": [{"name": "exact_answer"}],
        **stage,
    }
    with pytest.raises(ValidationError, match=message):
        model(**fields)


def test_reference_refresh_with_lora_is_refused_at_load_time():
    stage = {
        "name": "odpo",
        "algo": "online_dpo",
        "data": {"source": "builtin://arithmetic"},
        "rewards": [{"name": "exact_answer"}],
        "online_dpo": {"ref_refresh_every": 5},
    }
    PipelineConfig(stages=[stage])
    with pytest.raises(ValidationError, match="stage 'odpo'.*set ref_refresh_every: 0"):
        PipelineConfig(model={"lora": {"r": 4}}, stages=[stage])


REWARD_FILE = """
def chars(prompts, completions, **_):
    return [float(sum(map(ord, c)) % 4) for c in completions]
"""

STAGE = """
run: {{name: e2e, output_dir: {out}, seed: 0}}
model: {{path: {model}}}
tracking: {{backend: jsonl}}
stages:
  - name: {algo}
    algo: {algo}
    iterations: 3
    data: {{source: builtin://arithmetic, split: train, limit: 64}}
    rollout: {{engine: hf, n: 4, max_new_tokens: 4}}
    rewards: [{{name: exact_answer}}, {{name: ./r.py:chars}}]
    {params}
    train: {{lr: 1.0e-3, micro_batch_size: 8}}
    eval:
      data: {{source: builtin://arithmetic, split: test, limit: 8}}
      max_new_tokens: 4
"""


def _run_stage(tmp_path, tiny_path, algo: str, params: str) -> list[dict]:
    (tmp_path / "r.py").write_text(REWARD_FILE)
    path = tmp_path / "p.yaml"
    path.write_text(STAGE.format(out=tmp_path / "run", model=tiny_path, algo=algo, params=params))
    summary = run_pipeline(load_config(path), path)
    assert 0.0 <= summary[algo]["eval/accuracy"] <= 1.0
    before = AutoModelForCausalLM.from_pretrained(tiny_path)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / algo / "model")
    unchanged = [
        name
        for (name, p), q in zip(before.named_parameters(), after.parameters(), strict=True)
        if torch.equal(p, q)
    ]
    assert unchanged == []
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(x) for x in lines]
    assert [x["step"] for x in logged] == [1, 2, 3]
    assert all("train/reward/total" in x and "train/loss" in x for x in logged)
    return logged


def test_online_dpo_stage_end_to_end(tmp_path, tiny_path):
    logged = _run_stage(
        tmp_path,
        tiny_path,
        "online_dpo",
        "online_dpo: {prompts_per_iteration: 4, ref_refresh_every: 2}",
    )
    for key in (
        "pairs/kept",
        "pairs/dropped_ties",
        "pairs/dropped_small_margin",
        "pairs/margin_mean",
        "train/dpo/accuracy",
        "train/dpo/logps_chosen",
        "train/dpo/both_down_fraction",
    ):
        assert all(key in x for x in logged), key
    assert [x["online_dpo/reference_refreshed"] for x in logged] == [0.0, 0.0, 1.0]
    assert all(x["pairs/kept"] + x["pairs/dropped_ties"] == 4 for x in logged)


def test_rft_stage_end_to_end(tmp_path, tiny_path):
    logged = _run_stage(
        tmp_path,
        tiny_path,
        "rft",
        "rft: {prompts_per_iteration: 4, top_k: 2, drop_truncated: false}",
    )
    for x in logged:
        assert x["rft/acceptance_rate"] == pytest.approx(x["rft/kept"] / 16)
        assert x["rft/kept"] == 8  # 2 distinct samples of every prompt (no repeats here)
        assert "rft/duplicate_fraction" in x and "rft/kept_reward_mean" in x


def _sample(text: str, reason: str):
    from rollouts.types import Sample

    return Sample("p", text, [1], [2] * len(text), [0.0] * len(text), reason, 0)


@pytest.mark.parametrize(
    ("drop", "threshold", "kept"),
    [
        (True, None, [(0, 1)]),  # the best (index 0) was cut off: the next best is kept
        (False, None, [(0, 0)]),
        (True, 0.5, [(0, 1)]),
        (True, 0.9, []),  # only the truncated one reached the threshold
    ],
)
def test_rft_never_keeps_truncated_samples_unless_asked(drop, threshold, kept):
    from posttrain.algorithms.rft import select
    from posttrain.config.schema import RFTParams
    from rollouts.types import Group

    group = Group("p", [_sample("12345", "length"), _sample("12", "stop"), _sample("9", "stop")])
    params = RFTParams(top_k=1, threshold=threshold, drop_truncated=drop)
    assert select([group], [1.0, 0.6, 0.1], params).indices == kept
