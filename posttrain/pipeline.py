"""Run a pipeline: stages in order, each stage's output model is the next stage's input
(except side outputs such as a reward model: see `SIDE_OUTPUTS`).

The run folder (`runs/<name>/`) holds the resolved `config.yaml`, `metrics.jsonl`, one folder
per stage (with the stage's output `model/`), and `summary.json` with each stage's final
evaluation metrics.

Under `accelerate launch` every process runs the pipeline; rank 0 alone writes the run folder
(`config.yaml`, `run.json`, `stage.json`, `DONE`, `summary.json`, metrics, W&B) and the others
wait for it at barriers (see `posttrain.distributed`).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from posttrain import resume
from posttrain.checkpoint import rewind_logs
from posttrain.config.load import dump_config
from posttrain.config.schema import PipelineConfig
from posttrain.distributed import barrier, is_main
from posttrain.plan import format_plan
from posttrain.stages import dpo, grpo, online_dpo, ppo, rft, rm, sft
from posttrain.stages.context import StageContext
from posttrain.tracking import open_stage_tracker

RUNNERS = {
    "sft": sft.run,
    "dpo": dpo.run,
    "grpo": grpo.run,
    "online_dpo": online_dpo.run,
    "rft": rft.run,
    "ppo": ppo.run,
    "rm": rm.run,
}
RUN_FILE = "run.json"
SIDE_OUTPUTS = {"rm"}
"""Algorithms whose output is not a policy (a reward model): the next stage's input stays
this stage's input. Later stages name such an output in their rewards, e.g.
`{name: reward_model, args: {path: runs/<run>/<rm stage>/model}}`."""


class RunFolderError(FileExistsError):
    """The run folder holds something that is not a posttrain run."""


def run_pipeline(
    cfg: PipelineConfig,
    config_path: str | Path | None = None,
    overwrite: bool = False,
    restart_from: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run every stage, resuming a run folder that already holds this pipeline (see
    `posttrain.resume`); `overwrite` starts from scratch, `restart_from` redoes that stage and
    the ones after it."""
    run_dir = Path(cfg.run.folder)
    names = [s.name for s in cfg.stages]
    if restart_from is not None and restart_from not in names:
        raise RunFolderError(f"--restart-from {restart_from!r}: no such stage (have {names})")
    barrier()  # several processes: all look at the folder before rank 0 changes it
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            barrier()
            if is_main():
                shutil.rmtree(run_dir)
        elif not (run_dir / RUN_FILE).exists():
            raise RunFolderError(
                f"run folder {run_dir} holds files but no posttrain run; pass --overwrite to "
                "replace it or choose another name (run.name=...)"
            )
    config_dir = Path(config_path).resolve().parent if config_path else Path.cwd()
    # Names, options, files and folders of every stage are checked now, not when a late stage
    # starts after hours of training.
    format_plan(cfg, config_dir)
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        _run_info(run_dir, cfg)
        dump_config(cfg, run_dir / "config.yaml")
    barrier()
    run_info = json.loads((run_dir / RUN_FILE).read_text())
    summary: dict[str, dict[str, float]] = {}
    input_model, previous = cfg.model.path, ""
    redo = names.index(restart_from) if restart_from else len(names)
    for index, stage in enumerate(cfg.stages):
        stage_dir = run_dir / stage.name
        record = resume.stage_record(stage, cfg.model, cfg.run.seed, previous)
        previous = record.hash
        if index >= redo and is_main():
            resume.clear_stage(stage_dir)
            rewind_logs(run_dir, stage.name, -1)
        barrier()
        done = resume.check_stage(stage_dir, stage.name, record)
        if done is not None:
            if is_main():
                print(f"[{stage.name}] done earlier with the same config: skipped")
            summary[stage.name] = done["summary"]
        else:
            summary[stage.name] = _run_stage(cfg, index, stage, input_model, stage_dir,
                                             config_dir, record, run_info)  # fmt: skip
        if is_main():
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if stage.algo not in SIDE_OUTPUTS:
            input_model = str(stage_dir / "model")
    return summary


def _run_stage(cfg, index, stage, input_model, stage_dir, config_dir, record, run_info):
    config = {"pipeline": cfg.model_dump(mode="json"), "stage": stage.model_dump(mode="json")}
    run_id = run_info["wandb_ids"].setdefault(stage.name, uuid.uuid4().hex[:12])
    if is_main():
        stage_dir.mkdir(parents=True, exist_ok=True)
        resume.mark_started(stage_dir, record)
        _write_run_info(stage_dir.parent, run_info)
    barrier()
    tracker = open_stage_tracker(
        cfg.tracking, run_info["group"], stage.name, stage_dir.parent, config, run_id
    )
    ctx = StageContext(cfg, index, input_model, stage_dir, config_dir, tracker)
    try:
        final = RUNNERS[stage.algo](stage, ctx)
        tracker.record_output(ctx.output_model)
    finally:
        tracker.finish()
    if is_main():
        resume.mark_done(stage_dir, record, final)
    barrier()
    return final


def _run_info(run_dir: Path, cfg: PipelineConfig) -> dict:
    """The W&B group and per-stage run ids, kept across resumes of one run folder."""
    path = run_dir / RUN_FILE
    if path.exists():
        return json.loads(path.read_text())
    info = {"group": f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}", "wandb_ids": {}}
    _write_run_info(run_dir, info)
    return info


def _write_run_info(run_dir: Path, info: dict) -> None:
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(run_dir / RUN_FILE)


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
