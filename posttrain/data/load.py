"""Load rows for a stage: built-in tasks, JSONL / JSON / Parquet / CSV files, `datasets` names.

Rows come back as plain dicts with our column names (`prompt`, `completion`, `messages`,
`answer`, plus any other columns, which reach reward functions as keyword lists). A bad row is
an error naming the file, the row and the column.

Test: `pytest tests/test_data.py`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.config.schema import DataConfig
from posttrain.data.arithmetic import arithmetic_pair_rows, arithmetic_rows

BUILTIN = {"arithmetic": arithmetic_rows, "arithmetic_pairs": arithmetic_pair_rows}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """Input data the user has to fix; the message names file, row and column."""


def load_rows(cfg: DataConfig, need: tuple[str, ...] = ("prompt",)) -> Rows:
    """Read `cfg.source`, rename columns, check that each row has the columns in `need`.

    `need` entries may be alternatives joined by `|` (e.g. `"prompt|messages"`).
    """
    rows = _read(cfg)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise DataError(f"{cfg.source}: no rows")
    present = set(rows[0])
    missing_src = sorted(set(cfg.columns.values()) - present)
    if missing_src:
        raise DataError(
            f"{cfg.source}: data.columns maps from {missing_src}, which the data lacks "
            f"(columns: {sorted(present)})"
        )
    if cfg.columns:
        rows = [_map_columns(row, cfg.columns) for row in rows]

    def check(row: dict[str, Any], index: int) -> dict[str, Any]:
        _check_row(cfg.source, index, row, need)
        _shape_prompt(cfg, index, row)
        return row

    return keep_good(rows, cfg, check)


class Rows(list):
    """A list of rows (or encoded examples) that remembers how many bad rows were left out and
    each kept item's row number in the source (`indices`), for error messages."""

    skipped: int = 0
    indices: list[int]

    def source_index(self, position: int) -> int:
        return self.indices[position] if hasattr(self, "indices") else position


def keep_good(rows: list, cfg: DataConfig, fn: Callable[[Any, int], Any]) -> Rows:
    """`fn(row, index)` for every row; a `DataError` stops, or with `on_bad_row: skip` the row
    is left out and counted in the result's `skipped` (plus the input's own, if it has one).
    Nothing left is an error."""
    out, skipped = Rows(), []
    out.indices = []
    for position, row in enumerate(rows):
        index = rows.source_index(position) if isinstance(rows, Rows) else position
        try:
            out.append(fn(row, index))
            out.indices.append(index)
        except DataError as err:
            if cfg.on_bad_row == "error":
                raise
            skipped.append(str(err))
    out.skipped = getattr(rows, "skipped", 0) + len(skipped)
    if skipped:
        shown = "\n  ".join(skipped[:3])
        print(
            f"skipped {len(skipped)} bad row(s) of {cfg.source} (data.on_bad_row: skip):\n  {shown}"
        )
    if rows and not out:
        raise DataError(f"{cfg.source}: every row was bad (data.on_bad_row: skip)")
    return out


def _shape_prompt(cfg: DataConfig, index: int, row: dict[str, Any]) -> None:
    """Apply `prompt_format`, then `chat` (text prompt -> [system], user message)."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        return
    if cfg.prompt_format is not None:
        try:
            prompt = cfg.prompt_format.format(**row)
        except KeyError as err:
            raise DataError(
                f"{cfg.source}: row {index}: data.prompt_format names column {err.args[0]!r}, "
                f"which the row lacks (columns: {sorted(row)})"
            ) from None
        except (IndexError, ValueError) as err:
            raise DataError(f"data.prompt_format {cfg.prompt_format!r} is invalid: {err}") from None
    if cfg.chat:
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        prompt = [*system, {"role": "user", "content": prompt}]
    row["prompt"] = prompt


def _map_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename source columns to our names (one source column may feed several of ours)."""
    mapped = {ours: row.get(source) for ours, source in columns.items()}
    dropped = set(mapped) | set(columns.values())
    return {**{k: v for k, v in row.items() if k not in dropped}, **mapped}


def _read(cfg: DataConfig) -> list[dict[str, Any]]:
    source = cfg.source
    if source.startswith("builtin://"):
        name = source.removeprefix("builtin://")
        if name not in BUILTIN:
            raise DataError(f"unknown built-in data {source!r} (have: {', '.join(BUILTIN)})")
        return BUILTIN[name](cfg.split)
    path = Path(source).expanduser()
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file not found: {source}")
        return _read_file(path)
    from datasets import load_dataset

    try:
        return list(load_dataset(source, cfg.subset, split=cfg.split))
    except Exception as err:
        raise DataError(
            f"cannot load dataset {source!r} (subset {cfg.subset!r}) split {cfg.split!r}: {err}"
        ) from err


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not valid JSON: {err}") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects")
        return data
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _check_row(source: str, index: int, row: dict, need: tuple[str, ...]) -> None:
    for requirement in need:
        options = requirement.split("|")
        if not any(row.get(o) not in (None, "") for o in options):
            which = " or ".join(repr(o) for o in options)
            raise DataError(
                f"{source}: row {index} has no {which} column (or it is empty); "
                f"row columns: {sorted(row)}; map yours with data.columns"
            )
    for key in ("prompt", "completion"):
        if key in row and not isinstance(row[key], (str, list)):
            raise DataError(
                f"{source}: row {index} column {key!r} must be text, got {type(row[key]).__name__}"
            )
    messages = row.get("messages")
    if messages is not None:
        ok = isinstance(messages, list) and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok or not messages:
            raise DataError(
                f"{source}: row {index} column 'messages' must be a non-empty list of "
                "{'role': str, 'content': str}"
            )
