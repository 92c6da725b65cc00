"""Run a pipeline: stages in order, each stage's output model is the next stage's input.

The run folder (`runs/<name>/`) holds the resolved `config.yaml`, `metrics.jsonl`, one folder
per stage (with the stage's output `model/`), and `summary.json` with each stage's final
evaluation metrics.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from posttrain.config.load import dump_config
from posttrain.config.schema import PipelineConfig
from posttrain.stages import dpo, grpo, sft
from posttrain.stages.context import StageContext
from posttrain.tracking import open_stage_tracker

RUNNERS = {"sft": sft.run, "dpo": dpo.run, "grpo": grpo.run}


class RunFolderError(FileExistsError):
    """The run folder already holds a run."""


def run_pipeline(
    cfg: PipelineConfig, config_path: str | Path | None = None, overwrite: bool = False
) -> dict[str, dict[str, float]]:
    run_dir = Path(cfg.run.folder)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(
                f"run folder {run_dir} already holds a run; pass --overwrite to replace it "
                f"or choose another name (run.name=...)"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    group = f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config_dir = Path(config_path).resolve().parent if config_path else Path.cwd()
    summary: dict[str, dict[str, float]] = {}
    input_model = cfg.model.path
    for index, stage in enumerate(cfg.stages):
        stage_dir = run_dir / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        config = {"pipeline": cfg.model_dump(mode="json"), "stage": stage.model_dump(mode="json")}
        tracker = open_stage_tracker(cfg.tracking, group, stage.name, run_dir, config)
        ctx = StageContext(cfg, index, input_model, stage_dir, config_dir, tracker)
        try:
            summary[stage.name] = RUNNERS[stage.algo](stage, ctx)
        finally:
            tracker.finish()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        input_model = str(ctx.output_model)
    return summary


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per stage, one column per top-level eval metric."""
    keys = sorted({k for m in summary.values() for k in m if k.count("/") == 1})
    if not keys:
        return "no evaluation metrics (no stage has eval.data)"
    width = max(len(s) for s in [*summary, "stage"])
    header = "stage".ljust(width) + "".join(k.rjust(max(len(k), 8) + 2) for k in keys)
    lines = [header, "-" * len(header)]
    for stage, metrics in summary.items():
        cells = "".join(
            (f"{metrics[k]:.3f}" if k in metrics else "-").rjust(max(len(k), 8) + 2) for k in keys
        )
        lines.append(stage.ljust(width) + cells)
    return "\n".join(lines)
