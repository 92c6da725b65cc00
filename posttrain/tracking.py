"""Where metrics go: a JSONL file always, and W&B (one run per stage, one group per pipeline).

W&B runs offline when no credentials are configured (`wandb sync` uploads later), so tracking
always works. `wandb` is imported only when a W&B tracker is created. At the end of a stage,
`record_output(path)` records the stage's output model: in W&B as `summary.output_model` and a
`model` artifact that references the folder (its files are listed, not uploaded). Under
several processes only rank 0 tracks (one W&B run per stage); the others get no trackers.

Test: `pytest tests/test_pipeline.py tests/test_report.py`.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
from pathlib import Path
from typing import Any, Protocol

from posttrain.config.schema import TrackingConfig
from posttrain.distributed import is_main


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None: ...
    def record_output(self, path: Path) -> None: ...
    def finish(self) -> None: ...


class JsonlTracker:
    """Appends `{"stage", "step", **metrics}` lines to the run's `metrics.jsonl`.

    The file is opened for each line (not held open), so a resumed stage's rewind of the file
    (`posttrain.checkpoint.rewind_logs`) is seen by the next write.
    """

    def __init__(self, path: str | Path, stage: str) -> None:
        self.path = Path(path)
        self.stage = stage
        self.path.touch()

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps({"stage": self.stage, "step": step, **clean}) + "\n")

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        path = self.path.with_name(f"samples-{self.stage}.jsonl")
        with path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")

    def record_output(self, path: Path) -> None:
        """Nothing to add: the run folder's layout already places it (`<stage>/model`)."""

    def finish(self) -> None:
        """Nothing held open."""


class WandbTracker:
    def __init__(
        self,
        cfg: TrackingConfig,
        group: str,
        stage: str,
        run_dir: Path,
        config: dict,
        run_id: str | None = None,
    ):
        """`run_id`: the stage's W&B run id; a resumed stage passes the same id, so its W&B
        run resumes instead of starting a new one."""
        import wandb

        self._wandb = wandb
        self.mode = wandb_mode(cfg.mode)
        self.run = wandb.init(
            project=cfg.project,
            group=group,
            name=f"{group}/{stage}",
            job_type=stage,
            config=config,
            dir=str(run_dir),
            mode=self.mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows:
            return
        columns = list(rows[0])
        table = self._wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self.run.log({"samples": table}, step=step)

    def record_output(self, path: Path) -> None:
        """The path in the run's summary, and a `model` artifact referencing the folder.

        `checksum=False`: the entries hash their paths, not their contents, so a
        many-gigabyte checkpoint is not read again at the end of its stage.
        """
        folder = Path(path).resolve()
        self.run.summary["output_model"] = str(folder)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.run.name}-model")
        artifact = self._wandb.Artifact(name, type="model", metadata={"path": str(folder)})
        artifact.add_reference(f"file://{folder}", checksum=False)
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()


class StageTracker:
    """Fans out to the JSONL tracker and, when configured, W&B."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_samples(rows, step)

    def record_output(self, path: Path) -> None:
        for tracker in self.trackers:
            tracker.record_output(path)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def open_stage_tracker(
    cfg: TrackingConfig,
    group: str,
    stage: str,
    run_dir: Path,
    config: dict,
    run_id: str | None = None,
) -> StageTracker:
    if not is_main():  # several processes: rank 0 logs the reduced metrics, once
        return StageTracker([])
    trackers: list[Tracker] = [JsonlTracker(run_dir / "metrics.jsonl", stage)]
    if cfg.backend == "wandb":
        trackers.append(WandbTracker(cfg, group, stage, run_dir, config, run_id))
    return StageTracker(trackers)


def wandb_mode(mode: str) -> str:
    """`auto` -> WANDB_MODE if set, else online with credentials, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"
