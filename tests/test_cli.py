"""The command line: help, config errors as exit code 2 without a traceback, run-folder safety.

Runs go in-process through `posttrain.cli.main` (a 2-step SFT run of the tiny model on CPU),
so the whole file takes a few seconds.

Run: `pytest tests/test_cli.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tiny_config(tmp_path: Path, **stage_extra) -> Path:
    data = {
        "run": {"name": "cli-test", "output_dir": str(tmp_path / "run")},
        "model": {"path": "tiny://arithmetic", "device": "cpu"},
        "tracking": {"backend": "jsonl"},
        "stages": [
            {
                "name": "sft",
                "algo": "sft",
                "data": {"source": "builtin://arithmetic", "limit": 16},
                "train": {"max_steps": 2, "batch_size": 4},
                **stage_extra,
            }
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(argv: list[str]) -> int:
    """`main`'s exit code, whether returned or raised by argparse."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_help_lists_the_run_command():
    done = subprocess.run(
        [sys.executable, "-m", "posttrain", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: posttrain")
    assert re.search(r"^\s+run\s+run a pipeline config$", done.stdout, re.MULTILINE)


def test_run_help_lists_overrides_and_overwrite(capsys):
    assert run_cli(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "overrides" in out
    assert "--overwrite" in out


def test_unknown_key_exits_2_with_the_key_path(env, capsys):
    path = tiny_config(env, rollout={"n": 4})
    assert run_cli(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {path}: 1 error\n")
    assert "stages.0.rollout: unknown key (valid keys here: name, algo, data, train, eval)" in (
        captured.err
    )
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not (env / "run").exists()


def test_unknown_key_in_an_override_exits_2(env, capsys):
    path = tiny_config(env)
    assert run_cli(["run", str(path), "stages.0.train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "stages.0.train.max_stepz: unknown key; did you mean 'max_steps'?" in err
    assert "Traceback" not in err


def test_missing_config_file_exits_2(env, capsys):
    assert run_cli(["run", str(env / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: config file not found: {env / 'nope.yaml'}\n"


def test_existing_run_folder_resumes_and_overwrite_starts_afresh(env, capsys):
    path = tiny_config(env)
    run_dir = env / "run"

    assert run_cli(["run", str(path)]) == 0
    assert f"run folder: {run_dir}" in capsys.readouterr().out
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "sft" / "model" / "config.json").is_file()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["step"]) for m in lines] == [("sft", 1), ("sft", 2)]

    marker = run_dir / "keep-me.txt"
    marker.write_text("earlier results")
    assert run_cli(["run", str(path)]) == 0  # the finished stage is skipped, nothing redone
    assert "[sft] done earlier with the same config: skipped" in capsys.readouterr().out
    assert marker.read_text() == "earlier results"  # nothing of the earlier run was touched
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2

    assert run_cli(["status", str(run_dir)]) == 0
    assert capsys.readouterr().out.startswith("sft              sft         done")

    assert run_cli(["run", str(path), "--overwrite"]) == 0
    assert not marker.exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # a fresh run


def test_empty_existing_run_folder_is_used(env):
    (env / "run").mkdir()
    assert run_cli(["run", str(tiny_config(env)), "stages.0.train.max_steps=1"]) == 0
    assert len((env / "run" / "metrics.jsonl").read_text().splitlines()) == 1
