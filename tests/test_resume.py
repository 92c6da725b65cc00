"""Resume: checkpoints, stage hashes, refusing changed stages, and SIGKILL at random moments.

The kill tests run `posttrain run` in a subprocess, kill it with SIGKILL when its metrics
reach a randomly drawn step (seeded), run it again until it finishes, and compare the result
with an uninterrupted run: the same final parameters, bit for bit, and the same metric lines.
Run: `pytest tests/test_resume.py`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config.load import validate_config
from posttrain.pipeline import run_pipeline
from posttrain.resume import StageChangedError, changed_keys, format_status, status
from posttrain.sampler import EpochBatches, PromptSampler

SFT = {
    "name": "sft",
    "algo": "sft",
    "data": {"source": "builtin://arithmetic", "limit": 256},
    "train": {"lr": 1e-3, "batch_size": 16, "max_steps": 12},
}
DPO = {
    "name": "dpo",
    "algo": "dpo",
    "data": {"source": "builtin://arithmetic_pairs", "limit": 64},
    "train": {"lr": 1e-4, "batch_size": 8, "max_steps": 6},
}

GRPO = {
    "name": "grpo",
    "algo": "grpo",
    "iterations": 6,
    "data": {"source": "builtin://arithmetic", "limit": 64},
    "rollout": {"engine": "hf", "n": 4, "max_new_tokens": 4},
    # digits varies between samples of an untrained model, so every iteration updates
    "rewards": [{"name": "exact_answer"}, {"name": "./digits.py:digits"}],
    "grpo": {"prompts_per_iteration": 4, "zero_variance_groups": "keep", "beta": 0.04},
    "train": {"lr": 1e-3},
}


def config(out: Path, *stages: dict, every: int = 4) -> dict:
    return {
        "run": {"name": "r", "output_dir": str(out), "checkpoint_every": every},
        "tracking": {"backend": "jsonl"},
        "stages": list(stages),
    }


def metric_lines(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "sync/seconds"))} for r in rows
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Samplers and the checkpoint files


@pytest.mark.parametrize("sampler", ["epoch", "prompt"])
def test_sampler_state_round_trip(sampler):
    def make():
        if sampler == "epoch":
            return EpochBatches(10, 3, seed=4)
        return PromptSampler(list(range(10)), 3, seed=4)

    whole = make()
    expected = [whole.next() for _ in range(9)]
    first = make()
    for _ in range(4):
        first.next()
    second = make()
    second.load_state(json.loads(json.dumps(first.state())))
    assert [second.next() for _ in range(5)] == expected[4:]


def test_checkpoints_are_atomic_kept_and_resumed(tmp_path, tiny_path):
    cfg = validate_config(config(tmp_path / "run", SFT, every=3))
    run_pipeline(cfg)
    stage = tmp_path / "run" / "sft"
    # every 3 of 12 steps, the newest 2 kept; no temporary folder left behind
    assert sorted(p.name for p in stage.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-12",
        "checkpoint-9",
    ]
    saved = json.loads((stage / "checkpoint-12" / "state.json").read_text())
    assert saved["step"] == 12 and saved["total"] == 12 and "sampler" in saved
    assert {p.name for p in (stage / "checkpoint-12").iterdir()} == {
        "model", "trainer.pt", "rng.pt", "state.json",
    }  # fmt: skip
    assert (stage / "DONE").exists()
    assert format_status(status(tmp_path / "run")).startswith("sft              sft         done")


def test_resume_from_a_middle_checkpoint_matches_the_uninterrupted_run(tmp_path, tiny_path):
    run_pipeline(validate_config(config(tmp_path / "full", SFT, DPO, every=3)))
    part = config(tmp_path / "part", SFT, DPO, every=3)
    part["run"]["keep_checkpoints"] = 10
    run_pipeline(validate_config(part))
    # As if the process had died after step 7 of the SFT stage: keep checkpoints up to 6.
    stage = tmp_path / "part" / "sft"
    for path in [
        stage / "checkpoint-9",
        stage / "checkpoint-12",
        stage / "model",
        tmp_path / "part" / "dpo",
    ]:
        shutil.rmtree(path)
    (stage / "DONE").unlink()
    assert status(tmp_path / "part")[0] == {
        "stage": "sft", "algo": "sft", "state": "in progress", "progress": "6/12"
    }  # fmt: skip
    run_pipeline(validate_config(part))
    for stage_name in ("sft", "dpo"):
        full = weights(tmp_path / "full" / stage_name / "model")
        again = weights(tmp_path / "part" / stage_name / "model")
        assert full.keys() == again.keys()
        assert all(torch.equal(full[k], again[k]) for k in full)
    assert metric_lines(tmp_path / "full") == metric_lines(tmp_path / "part")


# ---------------------------------------------------------------------------------------------
# Changed configs


def test_changed_finished_stage_is_refused_naming_the_keys(tmp_path, tiny_path):
    run_pipeline(validate_config(config(tmp_path / "run", SFT)))
    changed = {**SFT, "train": {**SFT["train"], "lr": 5e-4, "batch_size": 8}}
    with pytest.raises(StageChangedError) as info:
        run_pipeline(validate_config(config(tmp_path / "run", changed)))
    message = str(info.value)
    assert "stage 'sft' finished in this run folder with another config" in message
    assert "train.batch_size, train.lr" in message and "--restart-from sft" in message


def test_restart_from_redoes_that_stage_and_later_ones(tmp_path, tiny_path, capsys):
    run_pipeline(validate_config(config(tmp_path / "run", SFT, DPO)))
    changed = {**DPO, "train": {**DPO["train"], "lr": 5e-5}}
    cfg = validate_config(config(tmp_path / "run", SFT, changed))
    with pytest.raises(StageChangedError, match="'dpo'.*train.lr"):
        run_pipeline(cfg)
    run_pipeline(cfg, restart_from="dpo")
    out = capsys.readouterr().out
    assert "[sft] done earlier with the same config: skipped" in out
    lines = metric_lines(tmp_path / "run")
    assert [r["step"] for r in lines if r["stage"] == "dpo"] == list(range(1, 7))  # logged once


def test_changing_an_earlier_stage_invalidates_the_later_ones(tmp_path, tiny_path):
    run_pipeline(validate_config(config(tmp_path / "run", SFT, DPO)))
    changed = {**SFT, "train": {**SFT["train"], "max_steps": 10}}
    cfg = validate_config(config(tmp_path / "run", changed, DPO))
    with pytest.raises(StageChangedError, match="'sft'.*train.max_steps"):
        run_pipeline(cfg)
    run_pipeline(cfg, restart_from="sft")
    assert json.loads((tmp_path / "run" / "summary.json").read_text()).keys() == {"sft", "dpo"}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}, ["b.c"]),
        ({"a": [1, 2]}, {"a": [1, 3]}, ["a.1"]),
        ({"a": [1, 2]}, {"a": [1]}, ["a"]),
        ({"a": 1}, {"b": 1}, ["a", "b"]),
        ({"a": {"x": None}}, {"a": {"x": None}}, []),
    ],
)
def test_changed_keys_table(old, new, expected):
    assert changed_keys(old, new) == expected


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments


def run_until_done(config_path: Path, run_dir: Path, kills: list[int], stage: str) -> int:
    """Start `posttrain run`; SIGKILL it once `stage` has logged each step in `kills`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "posttrain", "run", str(config_path)]
    killed = 0
    for target in [*kills, None]:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        while process.poll() is None:
            if target is not None and _logged_step(run_dir, stage) >= target:
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed += 1
                break
            time.sleep(0.05)
        else:
            assert process.returncode == 0, process.stderr.read().decode()[-3000:]
            return killed
    return killed


def _logged_step(run_dir: Path, stage: str) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [-1]
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if row["stage"] == stage:
            steps.append(row["step"])
    return max(steps)


@pytest.mark.parametrize("stage", [SFT, DPO, GRPO], ids=["sft", "dpo", "grpo"])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, tiny_path, stage):
    (tmp_path / "digits.py").write_text(
        "def digits(prompts, completions, **kwargs):\n"
        "    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]\n"
    )

    def write(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config(tmp_path / name, stage, every=2)))
        return path

    total = stage.get("iterations") or stage["train"]["max_steps"]
    reference = write("reference")
    assert run_until_done(reference, tmp_path / "reference", [], stage["name"]) == 0
    rng = random.Random(f"kill-{stage['name']}")
    kills = sorted(rng.sample(range(1, total), 3))
    interrupted = write("interrupted")
    assert run_until_done(interrupted, tmp_path / "interrupted", kills, stage["name"]) == 3
    full = weights(tmp_path / "reference" / stage["name"] / "model")
    again = weights(tmp_path / "interrupted" / stage["name"] / "model")
    assert all(torch.equal(full[k], again[k]) for k in full)
    ref_lines, got_lines = (
        metric_lines(tmp_path / "reference"),
        metric_lines(tmp_path / "interrupted"),
    )
    assert [r["step"] for r in got_lines] == [r["step"] for r in ref_lines]  # none twice or lost
    assert got_lines == ref_lines
    if stage is GRPO:  # the policy really moved, so equality is not trivial
        assert all(r["train/grad_norm"] > 0 for r in ref_lines)


def test_a_resumed_stage_continues_its_wandb_run(tmp_path, tiny_path, monkeypatch):
    from tests.wandb_offline import find_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = config(tmp_path / "run", SFT, every=4)
    cfg["tracking"] = {"backend": "wandb", "project": "posttrain-tests"}
    run_pipeline(validate_config(cfg))
    stage = tmp_path / "run" / "sft"
    for name in ("checkpoint-12", "model"):
        shutil.rmtree(stage / name)
    (stage / "DONE").unlink()
    run_pipeline(validate_config(cfg))  # resumes from checkpoint-8
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    runs = find_runs(tmp_path / "run")
    assert len(runs) == 2 and {r.run_id for r in runs} == {info["wandb_ids"]["sft"]}
    assert len({r.group for r in runs}) == 1  # the same group across the resume
