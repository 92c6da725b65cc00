"""`posttrain report`: stage offsets, the report of a made-up run folder, the command line, and
a real tiny SFT -> GRPO run tracked in offline W&B (health metrics, output-model records).

Run: `pytest tests/test_report.py` (about 20 s, most of it the tiny pipeline).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.pipeline import run_pipeline
from posttrain.report import (
    ReportError,
    final_metrics,
    last_attempts,
    stage_offsets,
    write_report,
)
from posttrain.report_plots import PANELS, panel_series
from tests.wandb_offline import read_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(*stages: tuple[str, int]) -> list[dict]:
    return [{"stage": name, "step": s} for name, steps in stages for s in range(1, steps + 1)]


@pytest.mark.parametrize(
    ("records", "offsets"),
    [
        (_records(("sft", 700), ("grpo", 100)), {"sft": 0, "grpo": 700}),
        (_records(("a", 3), ("b", 2), ("c", 4)), {"a": 0, "b": 3, "c": 5}),
        (_records(("only", 9)), {"only": 0}),
        # a stage's length is its last logged step, even when it logs only some steps
        (
            [
                {"stage": "sft", "step": 10},
                {"stage": "sft", "step": 20},
                {"stage": "dpo", "step": 1},
            ],
            {"sft": 0, "dpo": 20},
        ),
        ([], {}),
    ],
)
def test_stage_offsets(records, offsets):
    assert stage_offsets(records) == offsets


@pytest.mark.parametrize(
    ("lines", "kept"),
    [
        ([("a", 1), ("a", 2), ("b", 1)], [0, 1, 2]),
        # stage b was run again from step 1: its first attempt is dropped
        ([("a", 1), ("b", 1), ("b", 2), ("b", 1), ("b", 2), ("b", 3)], [0, 3, 4, 5]),
        # resumed after step 2, the file not rewound: the second step 3 replaces the first
        ([("a", 1), ("a", 2), ("a", 3), ("a", 3), ("a", 4)], [0, 1, 3, 4]),
        # the whole pipeline run again: each stage's second attempt, in order
        ([("a", 1), ("b", 1), ("a", 1), ("b", 1)], [2, 3]),
        ([], []),
    ],
)
def test_last_attempts(lines, kept):
    records = [{"stage": stage, "step": step, "line": i} for i, (stage, step) in enumerate(lines)]
    assert [r["line"] for r in last_attempts(records)] == kept


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _write_run(run_dir: Path, kl: bool = True) -> Path:
    """A made-up two-stage run folder: 5 SFT steps, then 3 GRPO iterations."""
    run_dir.mkdir(parents=True)
    lines = [{"stage": "sft", "step": s, "train/loss": 3.0 - 0.5 * s} for s in range(1, 6)]
    lines[-1].update({"eval/accuracy": 0.25, "eval/reward": 0.25, "eval/reward/exact": 0.25})
    for s in range(1, 4):
        line = {
            "stage": "grpo",
            "step": s,
            "train/loss": 0.1 * s,
            "train/reward/total": 0.2 * s,
            "rollout/completion_length_mean": 3.0 + s,
            "rollout/completion_length_p95": 5.0,
            "health/warnings": 0.0,
        }
        if kl:
            line["train/grpo/kl"] = 0.01 * s
        if s >= 2:
            line["eval/accuracy"] = 0.3 + 0.1 * s
        lines.append(line)
    lines[-1]["train/grad_norm"] = "nan"  # how JsonlTracker writes a non-finite value
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"sft": {"eval/accuracy": 0.25, "eval/reward": 0.25}, "grpo": {"eval/accuracy": 0.6}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    config = {"stages": [{"name": "sft", "algo": "sft"}, {"name": "grpo", "algo": "grpo"}]}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_report_of_a_run_folder(tmp_path):
    run_dir = _write_run(tmp_path / "run")
    paths = write_report(run_dir)
    out = run_dir / "report"
    assert [p.name for p in paths] == [
        "report.md",
        "overview.png",
        "reward.png",
        "eval.png",
        "kl.png",
        "length.png",
        "loss.png",
    ]
    for png in paths[1:]:
        width, height = _png_size(png)
        assert width > 100 and height > 100
    overview_height = _png_size(out / "overview.png")[1]
    assert overview_height > 3 * _png_size(out / "loss.png")[1]  # five panels stacked
    markdown = (out / "report.md").read_text()
    assert (
        "| stage | algo | steps | eval/accuracy | eval/reward | train/reward/total | " in markdown
    )
    assert "| sft | sft | 5 | 0.25 | 0.25 | - | 0.5 | - | - |" in markdown
    assert "| grpo | grpo | 3 | 0.6 | - | 0.6 | 0.3 | 6 | 0 |" in markdown
    assert "- config: [" in markdown and "](../config.yaml)" in markdown
    for name in ("overview.png", "reward.png", "kl.png", "length.png"):
        assert f"]({name})" in markdown
    assert "Not logged" not in markdown


def test_report_lists_panels_without_data_and_removes_stale_pictures(tmp_path):
    run_dir = _write_run(tmp_path / "run")
    write_report(run_dir)
    assert (run_dir / "report" / "kl.png").is_file()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    without_kl = [{k: v for k, v in x.items() if k != "train/grpo/kl"} for x in lines]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in without_kl))
    paths = write_report(run_dir)
    assert "kl.png" not in [p.name for p in paths]
    assert not (run_dir / "report" / "kl.png").exists()
    assert "Not logged in this run: KL." in (run_dir / "report" / "report.md").read_text()


def test_series_are_shifted_by_stage_offsets(tmp_path):
    from posttrain.report import read_metrics

    records = read_metrics(_write_run(tmp_path / "run") / "metrics.jsonl")
    offsets = stage_offsets(records)
    assert offsets == {"sft": 0, "grpo": 5}
    loss = panel_series(next(p for p in PANELS if p.file == "loss"), records, offsets)
    assert loss["train/loss"]["sft"] == ([1, 2, 3, 4, 5], [2.5, 2.0, 1.5, 1.0, 0.5])
    assert loss["train/loss"]["grpo"] == ([6, 7, 8], pytest.approx([0.1, 0.2, 0.3]))
    evals = panel_series(next(p for p in PANELS if p.file == "eval"), records, offsets)
    assert evals["eval/accuracy"]["grpo"][0] == [7, 8]
    final = final_metrics(records)
    assert final["sft"]["steps"] == 5 and final["grpo"]["steps"] == 3
    assert str(final["grpo"]["train/grad_norm"]) == "nan"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"metrics\.jsonl not found: `posttrain report` needs a run folder"),
        ("", "holds no metrics"),
        ('{"stage": "sft", "step": 1}\n{"stage": "sft", "step": 2', "line 2: not JSON"),
        ('{"step": 1, "train/loss": 1.0}\n', 'line 1: expected an object with a "stage" name'),
        ('{"stage": "sft", "step": "one"}\n', 'line 1: expected an integer "step"'),
    ],
)
def test_bad_run_folders_are_named(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message):
        write_report(tmp_path)


def test_cli_report_prints_the_paths(tmp_path, capsys):
    run_dir = _write_run(tmp_path / "run")
    assert main(["report", str(run_dir), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [
        str(tmp_path / "out" / "report.md"),
        str(tmp_path / "out" / "overview.png"),
    ]
    assert all(Path(p).is_file() for p in printed)


def test_cli_report_without_metrics_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {tmp_path / 'metrics.jsonl'} not found")
    assert "Traceback" not in captured.err


REWARD_FILE = """
from rewards.types import Scored

def noted_length(prompts, completions, **kwargs):
    return [Scored(-len(c) / 10, f"{len(c)} characters") for c in completions]
"""

CONFIG = """
run: {{name: report-e2e, output_dir: {out}, seed: 0}}
model: {{path: tiny://arithmetic}}
tracking: {{backend: wandb, mode: offline, project: posttrain-tests, samples_every: 1}}
stages:
  - name: sft
    algo: sft
    data: {{source: builtin://arithmetic, split: train, limit: 32}}
    train: {{lr: 1.0e-3, batch_size: 8, max_steps: 2}}
  - name: grpo
    algo: grpo
    iterations: 2
    data: {{source: builtin://arithmetic, split: train, limit: 16}}
    rollout: {{engine: hf, n: 4, max_new_tokens: 4}}
    rewards:
      - {{name: exact_answer, weight: 1.0}}
      - {{name: ./noted.py:noted_length, weight: 0.1}}
    grpo: {{prompts_per_iteration: 2, beta: 0.04, zero_variance_groups: keep}}
    train: {{lr: 1.0e-3, micro_batch_size: 8}}
    eval:
      every: 1
      data: {{source: builtin://arithmetic, split: test, limit: 8}}
      max_new_tokens: 4
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("report-e2e")
    (root / "noted.py").write_text(REWARD_FILE)
    config_path = root / "pipeline.yaml"
    config_path.write_text(CONFIG.format(out=root / "run"))
    run_pipeline(load_config(config_path), config_path)
    return root / "run"


def test_online_stage_logs_health_metrics_and_feedback(tiny_run):
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    grpo = [x for x in lines if x["stage"] == "grpo"]
    assert len(grpo) == 2
    for line in grpo:
        assert 1 <= line["rollout/completion_length_mean"] <= line["rollout/completion_length_p95"]
        assert line["rollout/completion_length_p95"] <= 4
        assert -1 <= line["rollout/reward_length_corr"] <= 1
        assert 0 < line["rollout/distinct_2"] <= 1
        assert line["rollout/neg_logprob_mean"] > 0
        assert line["train/grpo/kl"] >= 0  # the loss's KL to the reference (beta > 0)
        assert line["health/warnings"] == 0.0
    sample = json.loads((tiny_run / "samples-grpo.jsonl").read_text().splitlines()[0])
    assert sample["noted_length_feedback"] == f"{len(sample['completion'])} characters"


def _records_of(path: Path) -> dict[str, list]:
    from wandb.proto import wandb_internal_pb2

    found: dict[str, list] = {"summary": [], "artifact": [], "run": []}
    for raw in read_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind in found:
            found[kind].append(getattr(record, kind))
    return found


def test_wandb_records_each_stages_output_model(tiny_run):
    files = sorted(tiny_run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2
    by_stage = {}
    for path in files:
        records = _records_of(path)
        by_stage[records["run"][0].job_type] = records
    assert set(by_stage) == {"sft", "grpo"}
    for stage, records in by_stage.items():
        model = (tiny_run / stage / "model").resolve()
        summary = {
            u.key: json.loads(u.value_json) for s in records["summary"] for u in s.update if u.key
        }
        assert summary["output_model"] == str(model)
        (artifact,) = [a for a in records["artifact"] if a.type == "model"]
        assert artifact.name.endswith(f"-{stage}-model")
        refs = {c.path: c.ref for c in artifact.manifest.contents}
        assert refs["config.json"] == f"file://{model}/config.json"
        assert set(refs) == {p.name for p in model.iterdir()}


def test_report_of_a_real_run(tiny_run):
    paths = write_report(tiny_run)
    assert {"report.md", "overview.png", "reward.png", "kl.png", "length.png", "loss.png"} <= {
        p.name for p in paths
    }
    markdown = paths[0].read_text()
    assert "| sft | sft | 2 |" in markdown and "| grpo | grpo | 2 |" in markdown
    assert _png_size(paths[1])[0] > 100
