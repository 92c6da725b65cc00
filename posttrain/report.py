"""`posttrain report RUN_DIR`: plots and a markdown summary of a run folder.

    posttrain report runs/quickstart            # writes runs/quickstart/report/
    posttrain report runs/quickstart --output /tmp/report

Reads `metrics.jsonl` (one `{"stage", "step", **metrics}` line per logged step), and, when
present, `summary.json` (each stage's final evaluation) and `config.yaml` (stage algorithms).
All stages share one time axis: stage k's steps are shifted by the summed lengths (last
logged step) of the stages before it, so SFT steps and GRPO iterations run end to end, with a
separator and the stage's name at each boundary. Writes `overview.png` (every panel that has
data), one PNG per panel (train reward, eval accuracy, KL, completion length, loss) and
`report.md` (a per-stage table of final metrics, the config's path, the pictures).
A partial run (a stage that crashed) is reported up to its last logged step; a stage that
was run again is reported from its last attempt.

Test: `pytest tests/test_report.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

Record = dict[str, Any]
"""One metrics.jsonl line: `stage` (str), `step` (int) and float metrics."""

TABLE_KEYS = (
    "train/reward/total",
    "train/loss",
    "rollout/completion_length_mean",
    "health/warnings",
)
"""Last logged train values shown in the stage table, after the evaluation metrics."""


class ReportError(ValueError):
    """The run folder cannot be reported on (no metrics, or a malformed metrics file)."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="plots and a markdown summary of a run folder")
    report.add_argument("run_dir", type=Path, help="run folder (holds metrics.jsonl)")
    report.add_argument("--output", type=Path, help="where to write (default: RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    paths = write_report(args.run_dir, args.output)
    for path in paths:
        print(path)
    return 0


def write_report(run_dir: str | Path, output: str | Path | None = None) -> list[Path]:
    """Write the PNGs and `report.md`; return their paths (report.md first)."""
    from posttrain.report_plots import PANELS, plot_overview, plot_panel

    run_dir = Path(run_dir)
    records = last_attempts(read_metrics(run_dir / "metrics.jsonl"))
    out = Path(output) if output is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    offsets = stage_offsets(records)
    pictures: list[tuple[str, Path]] = []
    missing: list[str] = []
    for panel in PANELS:
        path = out / f"{panel.file}.png"
        if plot_panel(panel, records, offsets, path):
            pictures.append((panel.title, path))
        else:
            path.unlink(missing_ok=True)  # a stale picture from an earlier report
            missing.append(panel.title)
    overview = out / "overview.png"
    plot_overview(records, offsets, overview)
    summary = _read_json(run_dir / "summary.json")
    markdown = format_markdown(run_dir, out, records, summary, _stage_algos(run_dir), pictures)
    if missing:
        markdown += f"\nNot logged in this run: {', '.join(missing)}.\n"
    report = out / "report.md"
    report.write_text(markdown)
    return [report, overview, *(path for _, path in pictures)]


def read_metrics(path: Path) -> list[Record]:
    """The records of `metrics.jsonl`, non-finite values (written as strings) as floats."""
    if not path.is_file():
        raise ReportError(
            f"{path} not found: `posttrain report` needs a run folder written by "
            "`posttrain run` (it holds metrics.jsonl, config.yaml and summary.json)"
        )
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}, line {number}: not JSON ({err.msg})") from err
        if not isinstance(raw, dict) or not isinstance(raw.get("stage"), str):
            raise ReportError(f'{path}, line {number}: expected an object with a "stage" name')
        if not isinstance(raw.get("step"), int):
            raise ReportError(f'{path}, line {number}: expected an integer "step"')
        record: Record = {"stage": raw["stage"], "step": raw["step"]}
        for key, value in raw.items():
            if key not in record and (number_ := _number(value)) is not None:
                record[key] = number_
        records.append(record)
    if not records:
        raise ReportError(f"{path} holds no metrics (did the run log a step?)")
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return None


def last_attempts(records: list[Record]) -> list[Record]:
    """Drop the lines a later attempt replaced: when a stage's step goes back to s (the stage
    was run again, or resumed from step s - 1 without rewinding the file), its earlier lines
    from step s on are superseded by the new ones."""
    kept: dict[str, list[int]] = {}
    for index, r in enumerate(records):
        lines = kept.setdefault(r["stage"], [])
        if lines and r["step"] <= records[lines[-1]]["step"]:
            lines[:] = [i for i in lines if records[i]["step"] < r["step"]]
        lines.append(index)
    return [records[i] for i in sorted(i for lines in kept.values() for i in lines)]


def stage_order(records: list[Record]) -> list[str]:
    """Stage names in the order they first appear (the order they ran)."""
    return list(dict.fromkeys(r["stage"] for r in records))


def stage_offsets(records: list[Record]) -> dict[str, int]:
    """Stage -> the number added to its steps on the shared time axis.

    Stage k's offset is the sum of the lengths (last logged step) of stages 0..k-1, so a
    700-step SFT stage followed by 100 GRPO iterations places GRPO iteration 1 at 701.
    """
    lengths: dict[str, int] = {}
    for r in records:
        lengths[r["stage"]] = max(lengths.get(r["stage"], 0), r["step"])
    offsets, total = {}, 0
    for stage in stage_order(records):
        offsets[stage] = total
        total += lengths[stage]
    return offsets


def final_metrics(records: list[Record]) -> dict[str, dict[str, float]]:
    """Stage -> the last logged value of each of its metrics (and `steps`, its last step)."""
    final: dict[str, dict[str, float]] = {}
    for r in records:
        stage = final.setdefault(r["stage"], {})
        stage.update({k: v for k, v in r.items() if k not in ("stage", "step")})
        stage["steps"] = max(stage.get("steps", 0), r["step"])
    return final


def format_markdown(
    run_dir: Path,
    out: Path,
    records: list[Record],
    summary: dict[str, dict[str, float]],
    algos: dict[str, str],
    pictures: list[tuple[str, Path]],
) -> str:
    """The report: stage table, config path, pictures (paths relative to `out`)."""
    final = final_metrics(records)
    for stage, metrics in summary.items():  # the pipeline's own record of final evaluations
        final.setdefault(stage, {}).update(metrics)
    eval_keys = sorted({k for m in final.values() for k in m if k.startswith("eval/")})
    eval_keys = [k for k in eval_keys if k.count("/") == 1]
    keys = eval_keys + [k for k in TABLE_KEYS if any(k in m for m in final.values())]
    config = run_dir / "config.yaml"
    lines = [
        f"# Run report: {run_dir.resolve().name}",
        "",
        f"- run folder: `{run_dir}`",
        f"- config: [{config}]({_relative(config, out)})"
        if config.is_file()
        else f"- config: `{config}` (not found)",
        "",
        "## Stages",
        "",
        "Evaluation metrics are each stage's final evaluation; the others are the last "
        "logged value.",
        "",
        "| " + " | ".join(["stage", "algo", "steps", *keys]) + " |",
        "|" + "---|" * (3 + len(keys)),
    ]
    for stage in [*stage_order(records), *(s for s in summary if s not in final)]:
        metrics = final.get(stage, {})
        cells = [stage, algos.get(stage, "-"), str(int(metrics.get("steps", 0)))]
        cells += [_format(metrics[k]) if k in metrics else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Plots", "", "Stages run end to end on one step axis.", ""]
    lines += [f"![overview]({_relative(out / 'overview.png', out)})", ""]
    for title, path in pictures:
        lines += [f"### {title}", "", f"![{title}]({_relative(path, out)})", ""]
    return "\n".join(lines)


def _format(value: float) -> str:
    return str(value) if not math.isfinite(value) else f"{value:.4g}"


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from err


def _stage_algos(run_dir: Path) -> dict[str, str]:
    """Stage name -> algo from the run's resolved config.yaml (empty if it is missing)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    stages = data.get("stages", []) if isinstance(data, dict) else []
    return {
        s["name"]: s["algo"]
        for s in stages
        if isinstance(s, dict) and isinstance(s.get("name"), str) and "algo" in s
    }
