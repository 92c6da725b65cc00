"""`posttrain rewards list` and `posttrain rewards score`: check rewards before any training.

    posttrain rewards list
    posttrain rewards score --config rewards.yaml --input samples.jsonl --output scored.jsonl

`score` reads rows with `prompt` (or `messages`) and `completion` plus any columns the rewards
need, scores them in batches with the rubric the config describes (a rewards-only YAML with a
`rewards:` list, or a pipeline YAML, whose first stage with rewards is used unless `--stage`
names one), writes every row back with `rewards` (each component), `reward` (the weighted
total) and `feedback`, and prints a per-component summary. The output is written to a
temporary file and renamed when complete, so a failure never leaves half a file.

Test: `pytest tests/test_rewards_cli.py`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml


def add_commands(commands: argparse._SubParsersAction) -> None:
    rewards = commands.add_parser("rewards", help="list rewards, or score a file offline")
    sub = rewards.add_subparsers(dest="rewards_command", required=True)
    sub.add_parser("list", help="built-in and plugin rewards with their options")
    score = sub.add_parser("score", help="score a JSONL file of prompts and completions")
    score.add_argument("--config", type=Path, required=True, help="rewards or pipeline YAML")
    score.add_argument("--input", type=Path, required=True, help="JSONL/JSON/CSV/Parquet rows")
    score.add_argument("--output", type=Path, required=True, help="JSONL with the scores")
    score.add_argument("--stage", help="pipeline stage whose rewards to use")
    score.add_argument("--batch-size", type=int, default=64, help="rows per rubric call")
    score.add_argument(
        "--tokenizer", help="model path or tiny:// preset giving `completion_ids` to rewards"
    )


def run(args: argparse.Namespace) -> int:
    if args.rewards_command == "list":
        print(format_listing())
        return 0
    return score_file(args)


def format_listing() -> str:
    from rewards.registry import BUILTIN, options, plugin_entry_points

    lines = ["built-in rewards (use under `rewards:` as {name: NAME, args: {...}}):", ""]
    entries: list[tuple[str, Any, str]] = [(name, None, "built-in") for name in BUILTIN]
    entries += [(name, ep, f"plugin {ep.value}") for name, ep in plugin_entry_points().items()]
    plugin_header = False
    for name, ep, origin in entries:
        if ep is not None and not plugin_header:
            lines += ["", "plugins (entry-point group posttrain.rewards):", ""]
            plugin_header = True
        try:
            target = BUILTIN[name] if ep is None else ep.load()
        except Exception as err:  # a broken plugin is listed, not fatal
            lines.append(f"  {name:<20} {origin}: failed to load ({type(err).__name__}: {err})")
            continue
        doc = inspect.getdoc(target) or ""
        summary = " ".join(doc.split("\n\n")[0].split())  # the first paragraph, one line
        lines.append(f"  {name:<20} {summary}")
        opts = [_format_option(p) for p in options(target)]
        if opts:
            lines.append(f"  {'':<20} options: {', '.join(opts)}")
    return "\n".join(lines)


def _format_option(param: inspect.Parameter) -> str:
    if param.default is param.empty:
        return f"{param.name} (required)"
    return f"{param.name}={param.default!r}"


def score_file(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from posttrain.config.schema import DataConfig
    from posttrain.data.load import load_rows
    from posttrain.reward_setup import build_rubric

    specs, policy, base_dir = _rewards_from(args.config, args.stage)
    rows = load_rows(DataConfig(source=str(args.input)), need=("prompt|messages", "completion"))
    rubric = build_rubric(specs, list(rows[0]), base_dir, policy)
    tokenizer = _tokenizer(args.tokenizer) if args.tokenizer else None
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    summary = _Summary([t.name for t in rubric.terms])
    try:
        with partial.open("w") as out:
            for start in tqdm(range(0, len(rows), args.batch_size), desc="scoring", unit="batch"):
                batch = rows[start : start + args.batch_size]
                summary.add(_score_batch(rubric, batch, tokenizer, out))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, args.output)
    print(summary.format(len(rows), args.output))
    return 0


def _score_batch(rubric, batch: list[dict], tokenizer, out) -> Any:
    from posttrain.reward_setup import reward_columns

    prompts = [r.get("prompt") or r.get("messages") for r in batch]
    completions = [r["completion"] for r in batch]
    ids = _completion_ids(tokenizer, completions) if tokenizer else None
    scores = rubric.score(prompts, completions, reward_columns(batch), ids)
    for i, row in enumerate(batch):
        record = dict(row)
        record["rewards"] = {k: v[i] for k, v in scores.components.items()}
        record["reward"] = scores.total[i]
        notes = {k: v[i] for k, v in scores.feedback.items() if v[i] is not None}
        if notes:
            record["feedback"] = notes
        out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return scores


def _rewards_from(path: Path, stage_name: str | None):
    from posttrain.config.load import ConfigError, load_config, validate_config
    from posttrain.config.schema import RewardsFile

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and "stages" in data:
        cfg = load_config(path)
        with_rewards = [s for s in cfg.stages if getattr(s, "rewards", None)]
        if stage_name is not None:
            match = [s for s in cfg.stages if s.name == stage_name]
            if not match or not getattr(match[0], "rewards", None):
                names = [s.name for s in with_rewards]
                raise ConfigError(f"{path}: no stage {stage_name!r} with rewards (have {names})")
            stage = match[0]
        elif with_rewards:
            stage = with_rewards[0]
        else:
            raise ConfigError(f"{path}: no stage has rewards")
        return stage.rewards, stage.reward_errors, path.parent
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with a `rewards:` list")
    cfg = validate_config(data, source=str(path), schema=RewardsFile)
    return cfg.rewards, cfg.reward_errors, path.parent


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    from posttrain.models.load import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def _completion_ids(tokenizer, completions: list) -> list[list[int]]:
    from rewards.text import completion_text

    return [
        tokenizer(completion_text(c), add_special_tokens=False)["input_ids"] for c in completions
    ]


class _Summary:
    """Per-component mean (where it applies), applied count, and error count."""

    def __init__(self, names: list[str]) -> None:
        self.values: dict[str, list[float]] = {n: [] for n in names}
        self.skipped = dict.fromkeys(names, 0)
        self.errors = dict.fromkeys(names, 0)
        self.total: list[float] = []

    def add(self, scores) -> None:
        self.total += scores.total
        for name, values in scores.components.items():
            self.values[name] += [v for v in values if v is not None and not math.isnan(v)]
            self.skipped[name] += sum(v is None for v in values)
        for name, count in scores.errors.items():
            self.errors[name] += count

    def format(self, rows: int, output: Path) -> str:
        lines = [f"scored {rows} rows -> {output}", ""]
        lines.append(f"  {'reward':<24}{'mean':>10}{'applied':>10}{'n/a':>8}{'errors':>8}")
        for name, values in self.values.items():
            mean = f"{sum(values) / len(values):.4f}" if values else "-"
            lines.append(
                f"  {name:<24}{mean:>10}{len(values):>10}"
                f"{self.skipped[name] - self.errors[name]:>8}{self.errors[name]:>8}"
            )
        mean_total = sum(self.total) / len(self.total) if self.total else 0.0
        lines.append(f"  {'total (weighted)':<24}{mean_total:>10.4f}{len(self.total):>10}")
        return "\n".join(lines)
