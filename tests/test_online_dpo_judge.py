"""Online DPO with an LLM judge as the pair labeller (a scripted judge on a real HTTP server).

Run: `pytest tests/test_online_dpo_judge.py`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from posttrain.algorithms.online_dpo import judge_pairs
from posttrain.config import load_config
from posttrain.pipeline import run_pipeline
from rewards.judge_pairwise import pairwise_judge
from rollouts import SamplingParams, create_engine
from tests.judge_server import JudgeServer, is_pairwise, position_biased


def prefers_shorter(body: dict) -> dict:
    """A position-consistent judge: the shorter response wins; equal lengths tie."""
    text = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
    a = re.search(r"\[Response A\]\n(.*?)\n\[End of response a\]", text, re.S).group(1)
    b = re.search(r"\[Response B\]\n(.*?)\n\[End of response b\]", text, re.S).group(1)
    assert is_pairwise(body)
    winner = "tie" if len(a) == len(b) else ("A" if len(a) < len(b) else "B")
    return {"rationale": "shorter is better", "winner": winner}


@pytest.fixture(scope="module")
def groups(tiny_path):
    from posttrain.models.load import load_policy

    model, tokenizer = load_policy(tiny_path, "float32", "cpu")
    engine = create_engine("hf", model=model, tokenizer=tokenizer)
    prompts = ["12+34=", "7+8=", "99+1=", "5+5=", "40+2=", "3+4="]
    return engine.generate(prompts, 4, SamplingParams(max_new_tokens=6, seed=3))


def test_judge_pairs_follow_the_debiased_verdict(groups):
    with JudgeServer(prefers_shorter) as server:
        judge = pairwise_judge(base_url=server.url, model="judge")
        pairs, chosen, metrics = judge_pairs(groups, judge)
        assert len(server.received) == 2 * metrics["judge/candidate_pairs"]  # both orders
    assert pairs and len(pairs) == len(chosen) == metrics["judge/pairs_kept"]
    for pair, (g, win, lose) in zip(pairs, chosen, strict=True):
        samples = groups[g].samples
        assert len(samples[win].completion) < len(samples[lose].completion)
        assert pair.chosen_ids == samples[win].completion_ids
        assert pair.rejected_ids == samples[lose].completion_ids
    assert metrics["judge/position_consistency"] == 1.0


def test_a_position_biased_judge_labels_no_pairs(groups):
    with JudgeServer(position_biased()) as server:
        pairs, chosen, metrics = judge_pairs(groups, pairwise_judge(base_url=server.url, model="j"))
    assert pairs == [] and chosen == []
    assert metrics["judge/position_consistency"] == 0.0 and metrics["judge/tie_rate"] == 1.0


CONFIG = """
run: {{name: oj, output_dir: {out}}}
tracking: {{backend: jsonl}}
stages:
  - name: odpo
    algo: online_dpo
    iterations: 2
    data: {{source: builtin://arithmetic, limit: 32}}
    rollout: {{engine: hf, n: 4, max_new_tokens: 6}}
    rewards: [{{name: exact_answer}}]
    online_dpo: {{prompts_per_iteration: 6, judge: {{base_url: "{url}", model: judge}}}}
    train: {{lr: 1.0e-3}}
"""


def test_online_dpo_stage_trains_on_judge_labelled_pairs(tmp_path, tiny_path):
    with JudgeServer(prefers_shorter) as server:
        path = tmp_path / "c.yaml"
        path.write_text(CONFIG.format(out=tmp_path / "run", url=server.url))
        run_pipeline(load_config(path), path)
        assert server.received  # the judge labelled the pairs
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("judge/pairs_kept" in x and "judge/position_consistency" in x for x in lines)
    assert any(x["judge/pairs_kept"] > 0 and "train/dpo/accuracy" in x for x in lines)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_path)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "odpo" / "model")
    changed = zip(before.parameters(), after.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in changed)


def test_bad_judge_options_fail_at_stage_start(tmp_path, tiny_path):
    from posttrain.config.load import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "run", url="http://x/v1").replace(
        "model: judge}", "model: judge, temprature: 0}"))  # fmt: skip
    with pytest.raises(ConfigError, match="online_dpo.judge: .*temprature"):
        run_pipeline(load_config(path), path)
