"""End to end: a small SFT -> GRPO pipeline on the tiny model, with a custom reward file."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.pipeline import RunFolderError, format_summary, run_pipeline
from tests.wandb_offline import find_runs

REWARD_FILE = """
def brevity(prompts, completions, **kwargs):
    return [-len(c) / 10 for c in completions]
"""

CONFIG = """
run: {{name: e2e, output_dir: {out}, seed: 0}}
model: {{path: tiny://arithmetic}}
tracking: {{backend: wandb, project: posttrain-tests, samples_every: 2}}
stages:
  - name: sft
    algo: sft
    data: {{source: builtin://arithmetic, split: train, limit: 256}}
    train: {{lr: 1.0e-3, batch_size: 16, max_steps: 6}}
    eval:
      data: {{source: builtin://arithmetic, split: test, limit: 16}}
      max_new_tokens: 4
  - name: grpo
    algo: grpo
    iterations: 3
    data: {{source: builtin://arithmetic, split: train, limit: 64}}
    rollout: {{n: 4, max_new_tokens: 4}}
    rewards:
      - {{name: exact_answer, weight: 1.0}}
      - {{name: ./my_reward.py:brevity, weight: 0.1}}
    grpo: {{prompts_per_iteration: 4, beta: 0.04, epochs: 2}}
    train: {{lr: 1.0e-3, micro_batch_size: 8}}
    eval:
      every: 2
      data: {{source: builtin://arithmetic, split: test, limit: 16}}
      max_new_tokens: 4
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("e2e")
    (root / "my_reward.py").write_text(REWARD_FILE)
    config_path = root / "pipeline.yaml"
    config_path.write_text(CONFIG.format(out=root / "run"))
    summary = run_pipeline(load_config(config_path), config_path)
    return root / "run", summary, tiny_path


def _params(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_every_trainable_parameter_changed_in_each_stage(finished_run):
    run_dir, _, tiny_path = finished_run
    initial, sft, grpo = (
        _params(p) for p in (tiny_path, run_dir / "sft" / "model", run_dir / "grpo" / "model")
    )
    assert initial.keys() == sft.keys() == grpo.keys()
    assert [n for n in initial if torch.equal(initial[n], sft[n])] == []
    assert [n for n in sft if torch.equal(sft[n], grpo[n])] == []


def test_run_folder_summary_and_metrics(finished_run):
    run_dir, summary, _ = finished_run
    assert (run_dir / "config.yaml").is_file()
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == summary
    assert set(summary) == {"sft", "grpo"}
    for metrics in summary.values():
        assert 0.0 <= metrics["eval/accuracy"] <= 1.0
        assert "eval/reward" in metrics
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [x for x in lines if x["stage"] == "sft"]
    grpo = [x for x in lines if x["stage"] == "grpo"]
    assert [x["step"] for x in sft] == [1, 2, 3, 4, 5, 6]
    assert [x["step"] for x in grpo] == [1, 2, 3]
    assert all("train/loss" in x for x in sft)
    for key in (
        "train/reward/total",
        "train/reward/brevity",
        "train/reward/exact_answer",
        "grpo/zero_variance_fraction",
        "time/generate",
        "time/update",
    ):
        assert all(key in x for x in grpo), key
    # The custom reward is used: every completion has length >= 1, so brevity < 0.
    assert all(x["train/reward/brevity"] < 0 for x in grpo)
    assert [x["step"] for x in grpo if "eval/accuracy" in x] == [2, 3]
    samples = (run_dir / "samples-grpo.jsonl").read_text().splitlines()
    assert {"prompt", "completion", "brevity", "total", "advantage"} <= set(json.loads(samples[0]))
    assert "eval/accuracy" in format_summary(summary)


def test_offline_wandb_runs_read_back(finished_run):
    run_dir, _, _ = finished_run
    runs = find_runs(run_dir / "wandb")
    assert sorted(r.job_type for r in runs) == ["grpo", "sft"]
    assert len({r.group for r in runs}) == 1 and runs[0].group.startswith("e2e-")
    by_stage = {r.job_type: r for r in runs}
    assert by_stage["sft"].config["stage"]["algo"] == "sft"
    assert [h["train/loss"] for h in by_stage["sft"].history if "train/loss" in h].__len__() == 6
    grpo_keys = set().union(*(h.keys() for h in by_stage["grpo"].history))
    assert {"train/reward/brevity", "eval/accuracy", "train/loss"} <= grpo_keys


def test_rerun_of_a_finished_run_skips_every_stage(finished_run, capsys):
    run_dir, summary, _ = finished_run
    before = (run_dir / "metrics.jsonl").read_text()
    cfg = load_config(run_dir / "config.yaml")
    assert run_pipeline(cfg, run_dir.parent / "pipeline.yaml") == summary
    out = capsys.readouterr().out
    assert "[sft] done earlier with the same config: skipped" in out
    assert "[grpo] done earlier with the same config: skipped" in out
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_folder_that_is_not_a_run_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    cfg = load_config_text(f"run: {{output_dir: {tmp_path}}}\n" + ONE_STAGE)
    with pytest.raises(RunFolderError, match="holds files but no posttrain run.*--overwrite"):
        run_pipeline(cfg)
    assert (tmp_path / "notes.txt").read_text() == "mine"


ONE_STAGE = """
stages:
  - {name: s, algo: sft, data: {source: builtin://arithmetic, limit: 8}, train: {max_steps: 1}}
"""


def load_config_text(text: str):
    from posttrain.config.load import validate_config

    return validate_config(yaml.safe_load(text))


def test_reward_needing_a_missing_column_fails_before_training(tmp_path, tiny_path):
    (tmp_path / "r.py").write_text(
        textwrap.dedent(
            """
            def needs_solution(prompts, completions, solution):
                return [0.0 for _ in completions]
            """
        )
    )
    config_path = tmp_path / "p.yaml"
    config_path.write_text(
        CONFIG.format(out=tmp_path / "run").replace(
            "./my_reward.py:brevity", "./r.py:needs_solution"
        )
    )
    cfg = load_config(config_path)
    cfg.stages.pop(0)
    with pytest.raises(TypeError, match=r"needs column\(s\) \['solution'\]"):
        run_pipeline(cfg, config_path)
    assert not (tmp_path / "run" / "grpo" / "model").exists()


CHAT_CONFIG = """
run: {{name: chat, output_dir: {out}, seed: 0}}
tracking: {{backend: jsonl}}
stages:
  - name: grpo
    algo: grpo
    iterations: 1
    data: {{source: builtin://arithmetic, limit: 8, chat: true, system: Answer with the sum.}}
    rollout: {{engine: hf, n: 2, max_new_tokens: 4}}
    rewards: [{{name: exact_answer}}, {{name: trl.rewards:think_format_reward, weight: 0.0}}]
    grpo: {{prompts_per_iteration: 2}}
    eval: {{data: {{source: builtin://arithmetic, split: test, limit: 4, chat: true}}}}
"""


def test_chat_data_reaches_rewards_in_trls_conversational_format(tmp_path, tiny_path):
    path = tmp_path / "chat.yaml"
    path.write_text(CHAT_CONFIG.format(out=tmp_path / "run"))
    summary = run_pipeline(load_config(path), path)
    assert "eval/accuracy" in summary["grpo"]
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["train/reward/think_format_reward"] == 0.0  # scored, not an error
    samples = (tmp_path / "run" / "samples-grpo.jsonl").read_text()
    assert "<|im_start|>system\\nAnswer with the sum.<|im_end|>" in samples  # templated prompt
