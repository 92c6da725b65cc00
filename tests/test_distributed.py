"""Training with several processes: two CPU processes (gloo) under `accelerate launch`.

Real processes, no mocks. One pipeline (SFT, then GRPO with a KL reference) runs under one
process and under two (`accelerate launch --config_file configs/accelerate/ddp.yaml
--num_processes 2`: on a machine without CUDA the processes join through gloo). Two
processes on the same global batch reach the same weights as one, within float32 rounding;
the metrics file holds each step once, with the one-process numbers; a two-process run killed
after a checkpoint resumes under two processes to the uninterrupted result.

SFT runs batches of 5 rows in micro-batches of 2, so one process has a 2-row share (one
micro-batch) and the other 3 (two): the short one pads with a weight-0 row.

FSDP2 is not run here: accelerate applies FSDP only on GPUs (`distributed_type: FSDP` is
ignored when the processes are CPU ones), so `configs/accelerate/fsdp2.yaml` needs GPUs.

Run: `OMP_NUM_THREADS=1 pytest tests/test_distributed.py` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
DDP_CONFIG = REPO / "configs" / "accelerate" / "ddp.yaml"

PIPELINE = {
    "run": {"name": "dist", "seed": 0, "checkpoint_every": 2},
    "tracking": {"backend": "jsonl"},
    "stages": [
        {
            "name": "sft",
            "algo": "sft",
            "data": {"source": "builtin://arithmetic", "limit": 64},
            "train": {"lr": 1e-3, "batch_size": 5, "micro_batch_size": 2, "max_steps": 10},
        },
        {
            "name": "grpo",
            "algo": "grpo",
            "iterations": 1,
            "data": {"source": "builtin://arithmetic", "limit": 64},
            "rollout": {"engine": "hf", "n": 4, "max_new_tokens": 4},
            "rewards": [{"name": "exact_answer"}, {"name": "./digits.py:digits"}],
            "grpo": {"prompts_per_iteration": 3, "zero_variance_groups": "keep", "beta": 0.04},
            "train": {"lr": 1e-4, "micro_batch_size": 4},
        },
    ],
}
DIGITS = (
    "def digits(prompts, completions, **kwargs):\n"
    "    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]\n"
)


def write_config(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "digits.py").write_text(DIGITS)
    config = {**PIPELINE, "run": {**PIPELINE["run"], "output_dir": str(folder / name)}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def command(config: Path, processes: int) -> list[str]:
    run = ["-m", "posttrain", "run", str(config)]
    if processes == 1:
        return [sys.executable, *run]
    with socket.socket() as probe:  # a free port: other runs may hold accelerate's default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG)]
    return [*launch, "--num_processes", str(processes), "--main_process_port", str(port), *run]


def launch(config: Path, processes: int, kill_after: int | None = None) -> str:
    """Run `posttrain run` (to the end, or SIGKILL every process once SFT logged
    `kill_after`); return its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    process = subprocess.Popen(
        command(config, processes),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if kill_after is not None:
        metrics = config.parent / config.stem / "metrics.jsonl"
        while process.poll() is None and logged_steps(metrics, "sft")[-1:] < [kill_after]:
            time.sleep(0.01)
        # The workers may run in sessions of their own: kill each process of the tree.
        for child in [*psutil.Process(process.pid).children(recursive=True)]:
            child.kill()
        process.kill()
    output = process.communicate(timeout=300)[0].decode()
    if kill_after is None:
        assert process.returncode == 0, output[-4000:]
    return output


def logged_steps(metrics: Path, stage: str) -> list[int]:
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if row["stage"] == stage:
            steps.append(row["step"])
    return steps


def metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "sync/"))} for r in rows]


def weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run / stage / "model" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_path) -> Path:
    """The same pipeline under one process and under two."""
    folder = tmp_path_factory.mktemp("distributed")
    for name, processes in [("one", 1), ("two", 2)]:
        launch(write_config(folder, name), processes)
    return folder


def test_two_processes_reach_the_one_process_weights(runs):
    for stage in ("sft", "grpo"):
        one, two = weights(runs / "one", stage), weights(runs / "two", stage)
        print(f"{stage}: max |one - two| = {max_diff(one, two):.3g}")
        assert max_diff(one, two) < 1e-5
    # GRPO really moved the policy, so the comparison is not between untouched copies.
    assert max_diff(weights(runs / "two", "sft"), weights(runs / "two", "grpo")) > 5e-5


def test_metrics_are_reduced_and_written_once_by_rank_0(runs):
    one, two = metric_rows(runs / "one"), metric_rows(runs / "two")
    assert [(r["stage"], r["step"]) for r in two] == [("sft", s) for s in range(1, 11)] + [
        ("grpo", 1)
    ]
    assert [(r["stage"], r["step"]) for r in two] == [(r["stage"], r["step"]) for r in one]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            number = isinstance(a[key], float)
            assert b[key] == (pytest.approx(a[key], rel=1e-4, abs=1e-6) if number else a[key])
    # Every process keeps its RNG state; only rank 0 wrote the shared files.
    checkpoint = runs / "two" / "sft" / "checkpoint-10"
    assert {p.name for p in checkpoint.iterdir()} == {
        "model",
        "trainer.pt",
        "rng.pt",
        "rng-1.pt",
        "state.json",
    }
    assert not list((runs / "two").rglob("*.tmp"))


def test_a_two_process_run_resumes_from_its_checkpoint(runs):
    config = write_config(runs, "resumed")
    launch(config, 2, kill_after=3)
    run = runs / "resumed"
    assert list((run / "sft").glob("checkpoint-*")) and not (run / "sft" / "DONE").exists()
    output = launch(config, 2)
    assert "resuming from the checkpoint at step" in output
    for stage in ("sft", "grpo"):
        again, full = weights(run, stage), weights(runs / "two", stage)
        assert all(torch.equal(again[k], full[k]) for k in full), stage
    assert metric_rows(run) == metric_rows(runs / "two")


@pytest.mark.slow
def test_a_ray_pool_lives_on_rank_0_only(tmp_path, tiny_path):
    """GRPO with `rollout.workers: 2` under two processes: rank 0 alone starts the pool (the
    other process follows), and the weights equal a one-process run with the same pool."""
    grpo = {**PIPELINE["stages"][1], "rollout": {"engine": "hf", "n": 4, "max_new_tokens": 4,
                                                 "workers": 2}}  # fmt: skip
    outputs = {}
    for name, processes in [("pool-one", 1), ("pool-two", 2)]:
        (tmp_path / "digits.py").write_text(DIGITS)
        config = {**PIPELINE, "stages": [grpo],
                  "run": {**PIPELINE["run"], "output_dir": str(tmp_path / name)}}  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        outputs[name] = launch(path, processes)
    assert outputs["pool-two"].count("rollout engine: hf x2 (ray)") == 1
    assert "rollout engine: hf (on rank 0)" in outputs["pool-two"]
    one, two = weights(tmp_path / "pool-one", "grpo"), weights(tmp_path / "pool-two", "grpo")
    assert max_diff(one, two) < 1e-5
