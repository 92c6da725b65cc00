"""Where metrics go: a JSONL file always, and W&B (one run per stage, one group per pipeline).

W&B runs offline when no credentials are configured (`wandb sync` uploads later), so tracking
always works. `wandb` is imported only when a W&B tracker is created.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any, Protocol

from posttrain.config.schema import TrackingConfig


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None: ...
    def finish(self) -> None: ...


class JsonlTracker:
    """Appends `{"stage", "step", **metrics}` lines to the run's `metrics.jsonl`."""

    def __init__(self, path: str | Path, stage: str) -> None:
        self.path = Path(path)
        self.stage = stage
        self._file = self.path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        self._file.write(json.dumps({"stage": self.stage, "step": step, **clean}) + "\n")
        self._file.flush()

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        path = self.path.with_name(f"samples-{self.stage}.jsonl")
        with path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")

    def finish(self) -> None:
        self._file.close()


class WandbTracker:
    def __init__(self, cfg: TrackingConfig, group: str, stage: str, run_dir: Path, config: dict):
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

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def open_stage_tracker(
    cfg: TrackingConfig, group: str, stage: str, run_dir: Path, config: dict
) -> StageTracker:
    trackers: list[Tracker] = [JsonlTracker(run_dir / "metrics.jsonl", stage)]
    if cfg.backend == "wandb":
        trackers.append(WandbTracker(cfg, group, stage, run_dir, config))
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
