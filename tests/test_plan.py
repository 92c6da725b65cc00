"""`posttrain plan`: every shipped config validates and plans without downloading anything.

Run: `pytest tests/test_plan.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.cli import main

CONFIGS = sorted(Path("configs").glob("*.yaml")) + sorted(Path("configs/examples").glob("*.yaml"))


def test_there_are_configs_to_check():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "dpo.yaml", "qwen2.5-0.5b-gsm8k-grpo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_plans(path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run '")
    assert "1. " in out


def test_plan_shows_the_policy_chain_and_hub_downloads(capsys):
    assert main(["plan", "configs/examples/qwen2.5-0.5b-lora-sft-dpo.yaml"]) == 0
    out = capsys.readouterr().out
    assert "model: Qwen/Qwen2.5-0.5B (Hugging Face id, downloaded at start)" in out
    assert "LoRA r=32 alpha=64.0" in out
    assert "2. dpo (dpo) from runs/qwen05b-lora-sft-dpo/sft/model" in out
    assert "trl-lib/ultrafeedback_binarized split=train (datasets, downloaded at start)" in out


BASE = """
run: {name: p}
model: {path: MODEL}
stages:
  - name: g
    algo: grpo
    data: {source: DATA}
    rewards: [REWARD]
"""


@pytest.mark.parametrize(
    ("model", "data", "reward", "message"),
    [
        ("tiny://arithmetic", "builtin://arithmetic", "{name: exact_anwser}",
         "did you mean 'exact_answer'"),
        ("tiny://arithmetic", "builtin://arithmetic", "{name: length_band, args: {max_len: 3}}",
         "no option(s) ['max_len']; did you mean 'max_length'"),
        ("tiny://arithmetic", "builtin://arithmetic", "{name: soft_overlong}",
         "needs option(s) ['max_completion_len', 'cache_len']"),
        ("./no/such/model", "builtin://arithmetic", "{name: exact_answer}",
         "model.path './no/such/model': no such folder"),
        ("tiny://arithmetic", "missing.jsonl", "{name: exact_answer}",
         "data file not found: missing.jsonl"),
        ("tiny://arithmetic", "builtin://nope", "{name: exact_answer}",
         "unknown built-in data 'builtin://nope'"),
    ],
)  # fmt: skip
def test_plan_catches_mistakes_before_anything_runs(
    tmp_path, capsys, monkeypatch, model, data, reward, message
):
    monkeypatch.chdir(tmp_path)
    text = BASE.replace("MODEL", model).replace("DATA", data).replace("REWARD", reward)
    (tmp_path / "p.yaml").write_text(text)
    assert main(["plan", "p.yaml"]) == 2
    assert message in capsys.readouterr().err
