"""Which stages of a run folder are done, which can continue, and which changed.

Every stage folder holds `stage.json` (written when the stage starts: its config hash and the
resolved config) and, once it finishes, a `DONE` marker with the same hash and the stage's
final metrics. The hash covers the stage's own config, the model settings, the run seed and
the previous stage's hash, so changing a stage also invalidates every stage after it. On a
new `posttrain run` of the same folder:

- a finished stage whose hash matches is skipped;
- an unfinished one continues from its last checkpoint;
- a stage whose config changed is refused, naming the differing keys, unless the run asks to
  `--restart-from` that stage (or an earlier one), which clears it and every later stage.

Test: `pytest tests/test_resume.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.checkpoint import Checkpointer

DONE = "DONE"
STAGE_FILE = "stage.json"


class StageChangedError(RuntimeError):
    """A stage already started or finished in this run folder with another config."""


@dataclass(frozen=True)
class StageRecord:
    hash: str
    config: dict[str, Any]
    """What the hash covers: the stage's config, the model settings, the seed."""


def stage_record(stage: Any, model: Any, seed: int, previous_hash: str) -> StageRecord:
    config = {
        "stage": stage.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "seed": seed,
        "previous": previous_hash,
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return StageRecord(digest, config)


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out += changed_keys(old[key], new[key], path)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            out += changed_keys(a, b, f"{prefix}.{index}")
        return out
    return [] if old == new else [prefix or "<value>"]


def check_stage(stage_dir: Path, name: str, record: StageRecord) -> dict[str, Any] | None:
    """The DONE marker's content when the stage finished with this config; None when it is
    new or unfinished with this config; raises when it started or finished with another."""
    for filename in (DONE, STAGE_FILE):
        path = stage_dir / filename
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        if saved["hash"] != record.hash:
            keys = changed_keys(saved["config"], record.config)
            shown = ", ".join(_readable(k) for k in keys) or "the input model"
            state = "finished" if filename == DONE else "started"
            raise StageChangedError(
                f"stage {name!r} {state} in this run folder with another config (changed: "
                f"{shown}); pass --restart-from {name} to redo it and the stages after it, or "
                "choose another run.name"
            )
        if filename == DONE:
            return saved
    return None


def mark_started(stage_dir: Path, record: StageRecord) -> None:
    _write_json(stage_dir / STAGE_FILE, {"hash": record.hash, "config": record.config})


def mark_done(stage_dir: Path, record: StageRecord, summary: dict[str, float]) -> None:
    _write_json(
        stage_dir / DONE, {"hash": record.hash, "config": record.config, "summary": summary}
    )


def clear_stage(stage_dir: Path) -> None:
    if stage_dir.exists():
        shutil.rmtree(stage_dir)


def status(run_dir: Path) -> list[dict[str, Any]]:
    """One entry per stage of the run's resolved config: state and progress."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = []
    for stage in config["stages"]:
        folder = run_dir / stage["name"]
        row = {"stage": stage["name"], "algo": stage["algo"], "state": "not started"}
        if (folder / DONE).exists():
            row["state"] = "done"
            row["summary"] = json.loads((folder / DONE).read_text()).get("summary", {})
        elif (folder / STAGE_FILE).exists():
            row["state"] = "in progress"
            found = Checkpointer(folder, 0).checkpoints()
            if found:
                state = json.loads((found[-1] / "state.json").read_text())
                row["progress"] = f"{state['step']}/{state.get('total', '?')}"
        rows.append(row)
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        extra = f" (checkpoint at step {row['progress']})" if "progress" in row else ""
        if row.get("summary"):
            extra = (
                "  "
                + ", ".join(
                    f"{k}={v:.3f}" for k, v in row["summary"].items() if isinstance(v, float)
                )[:200]
            )
        lines.append(f"{row['stage']:<16} {row['algo']:<11} {row['state']}{extra}")
    return "\n".join(lines)


def _readable(key: str) -> str:
    """`stage.train.lr` -> `train.lr`; `model.dtype` stays; `previous` = an earlier stage."""
    if key.startswith("stage."):
        return key[len("stage.") :]
    if key == "previous":
        return "an earlier stage"
    return key


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
