"""`posttrain plan CONFIG`: check a pipeline and print what it would do, without running it.

Nothing is downloaded or trained: the config is validated, every reward name is looked up
(built-in, plugin, dotted or file path; factories are not built, so no judge is called and no
reward model loaded), local data files and model folders are checked for existence, and each
stage is listed with its input model, data and main settings. Hub ids and `datasets` names
are shown as such (they are fetched when the run starts).

Test: `pytest tests/test_plan.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from posttrain.config.schema import DataConfig, PipelineConfig

SIDE_STAGES = ("rm",)
ALGORITHM_KEYS = ("grpo", "ppo", "critic", "dpo", "online_dpo", "rft", "rm")
"""Each stage's own settings block, shown in the plan."""
"""Stages whose output is not the next stage's policy (a reward model)."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="check a pipeline config and print its stages")
    plan.add_argument("config", type=Path, help="pipeline YAML file")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def run(args: argparse.Namespace) -> int:
    from posttrain.config.load import load_config

    cfg = load_config(args.config, args.overrides)
    print(format_plan(cfg, args.config.resolve().parent))
    return 0


def format_plan(cfg: PipelineConfig, config_dir: Path) -> str:
    """Check names and paths; return the plan as text. Raises on the first problem found."""
    from rewards.registry import check

    lines = [f"run {cfg.run.name!r} -> {cfg.run.folder}", f"model: {_model(cfg.model.path)}"]
    if cfg.model.lora is not None:
        lines.append(f"  LoRA r={cfg.model.lora.r} alpha={cfg.model.lora.alpha}")
    policy = cfg.model.path
    for index, stage in enumerate(cfg.stages):
        lines.append(f"{index + 1}. {stage.name} ({stage.algo}) from {policy}")
        for label, data in _data_of(stage):
            lines.append(f"     {label}: {_data(data)}")
        for spec in getattr(stage, "rewards", None) or []:
            check(spec.name, config_dir, spec.args)  # unknown names and options raise here
            extras = f" args={spec.args}" if spec.args else ""
            lines.append(f"     reward {spec.label or spec.name} (weight {spec.weight}){extras}")
        for key in ("iterations", *ALGORITHM_KEYS, "train", "rollout"):
            value = getattr(stage, key, None)
            if value is not None:
                lines.append(f"     {key}: {_brief(value)}")
        if stage.algo not in SIDE_STAGES:
            policy = f"{cfg.run.folder}/{stage.name}/model"
    return "\n".join(lines)


def _data_of(stage) -> list[tuple[str, DataConfig]]:
    found = []
    for key in ("data", "eval_pairs"):
        value = getattr(stage, key, None)
        if isinstance(value, DataConfig):
            found.append((key, value))
    evaluation = getattr(stage, "eval", None)
    if evaluation is not None and evaluation.data is not None:
        found.append(("eval.data", evaluation.data))
    return found


def _model(path: str) -> str:
    if path.startswith("tiny://"):
        return f"{path} (built locally)"
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"model.path {path!r}: no such folder")
        return f"{path} (local folder)"
    return f"{path} (Hugging Face id, downloaded at start)"


def _data(data: DataConfig) -> str:
    source = data.source
    if source.startswith("builtin://"):
        from posttrain.data.load import BUILTIN, DataError

        if source.removeprefix("builtin://") not in BUILTIN:
            raise DataError(f"unknown built-in data {source!r} (have: {', '.join(BUILTIN)})")
        return f"{source} split={data.split}"
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {source}")
        return f"{source} (file)"
    return f"{source} split={data.split} (datasets, downloaded at start)"


def _brief(value) -> str:
    if hasattr(value, "model_dump"):
        shown = {k: v for k, v in value.model_dump().items() if v not in (None, {}, [])}
        return ", ".join(f"{k}={v}" for k, v in list(shown.items())[:8])
    return str(value)
