"""Read a pipeline YAML, apply `key.sub=value` overrides, validate, and explain errors.

Errors name the file, the key path (`stages.1.rollout.n`) and what was expected; an unknown
key comes with the nearest valid name. `dump_config` writes the resolved config.

Test: `pytest tests/test_config.py`.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.config.schema import ALGOS, PipelineConfig


class ConfigError(ValueError):
    """A configuration the user has to fix; the message says where and what."""


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load `path`, apply overrides in order, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return validate_config(data, source=str(path))


def validate_config(
    data: dict, source: str = "<config>", schema: type[BaseModel] = PipelineConfig
) -> Any:
    """Validate `data` against `schema` (default: a pipeline), explaining every error."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        lines = [_describe(e, data, schema) for e in err.errors()]
        count = f"{len(lines)} error{'s' if len(lines) > 1 else ''}"
        raise ConfigError(f"{source}: {count}\n" + "\n".join(f"  {ln}" for ln in lines)) from None


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.0.c=value` in `data`; the value is parsed as YAML (`4`, `true`, `[1, 2]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from None
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            try:
                index = int(part)
            except ValueError:
                raise ConfigError(
                    f"override {item!r}: {where} indexes a list; use a number"
                ) from None
            if not -len(node) <= index < len(node):
                raise ConfigError(
                    f"override {item!r}: {where} is out of range (the list has {len(node)} items)"
                )
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            parent = ".".join(parts[:depth])
            raise ConfigError(f"override {item!r}: {parent} is a value, not a mapping or list")


def dump_config(config: PipelineConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _describe(error: dict, data: dict, schema: type[BaseModel]) -> str:
    loc = error["loc"]
    kind = error["type"]
    path = _key_path(loc)
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1], data, schema)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{path}: unknown key{hint} (valid keys here: {', '.join(valid)})"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        given = error.get("ctx", {}).get("tag")
        if given is None:
            return f"{path}.algo: missing; expected one of {', '.join(ALGOS)}"
        close = difflib.get_close_matches(str(given), ALGOS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (
            f"{path}.algo: unknown algorithm {given!r}{hint} (expected one of {', '.join(ALGOS)})"
        )
    got = error.get("input")
    shown = "" if kind == "missing" or isinstance(got, dict) else f" (got {got!r})"
    return f"{path or '<top>'}: {error['msg']}{shown}"


def _key_path(loc: tuple) -> str:
    # Discriminated unions add the tag (`grpo`) after a stage's index; it is not a key.
    parts = [
        str(p)
        for i, p in enumerate(loc)
        if not (p in ALGOS and i > 0 and isinstance(loc[i - 1], int))
    ]
    return ".".join(parts)


def _valid_keys(loc: tuple, data: dict, schema: type[BaseModel]) -> list[str]:
    model: type[BaseModel] | None = schema
    node: Any = data
    for i, part in enumerate(loc):
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else {}
            continue
        if part in ALGOS and i > 0 and isinstance(loc[i - 1], int):
            model = ALGOS[part]
            continue
        if model is None or part not in model.model_fields:
            return []
        node = node.get(part, {}) if isinstance(node, dict) else {}
        model = _model_in(model.model_fields[part].annotation, node)
    return list(model.model_fields) if model else []


def _model_in(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The pydantic model inside Optional[...], list[...], Annotated[Union[...]] annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg, node)
            if found is not None:
                return found
    return None
