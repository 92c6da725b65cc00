"""Find a reward by name and build it with its options.

Names, tried in this order:
- built-in: a key of `BUILTIN` (`exact_answer`, `length_band`, `code_tests`, ...)
- plugin: an entry point of the group `posttrain.rewards` declared by an installed package
  (`[project.entry-points."posttrain.rewards"] my_reward = "my_pkg.rewards:my_reward"`)
- dotted path: `my_pkg.rewards:fn` or `my_pkg.rewards.fn`
- file path: `./my_reward.py:fn` or `/abs/path/r.py:fn` (relative paths are tried against the
  working directory first, then against `base_dir`, usually the config file's folder)

What a name points to is either a reward (TRL's signature: it names `completions` or takes
`**kwargs`) or a factory that returns one (any other signature, like
`trl.rewards.get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`). Options
(`args:` in a config) are the factory's keyword arguments; for a reward they are bound as
fixed keyword arguments of every call.

Test: `pytest tests/test_reward_registry.py tests/test_reward_plugins.py`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "posttrain.rewards"

# name -> module:attribute, imported on first use so `import rewards` stays light.
_BUILTIN_PATHS: dict[str, str] = {
    "exact_answer": "rewards.answer:exact_answer",
    "math_answer": "rewards.math_answer:math_answer",
    "format_regex": "rewards.rules:format_regex",
    "required_tags": "rewards.rules:required_tags",
    "length_band": "rewards.length_rules:length_band",
    "repetition_penalty": "rewards.length_rules:repetition_penalty",
    "soft_overlong": "rewards.length_rules:soft_overlong",
    "keywords": "rewards.rules:keywords",
    "code_tests": "rewards.code_exec:code_tests",
    "judge_score": "rewards.judge:judge_score",
    "reward_model": "rewards.reward_model:reward_model",
}


class _Builtins(Mapping):
    """`BUILTIN[name]`: the built-in reward or factory, imported when first asked for."""

    def __getitem__(self, name: str) -> Callable:
        module_name, _, attr = _BUILTIN_PATHS[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def __iter__(self):
        return iter(_BUILTIN_PATHS)

    def __len__(self) -> int:
        return len(_BUILTIN_PATHS)

    def __contains__(self, name: object) -> bool:
        return name in _BUILTIN_PATHS


BUILTIN: Mapping[str, Callable] = _Builtins()


class RewardLookupError(ValueError):
    """A reward name that does not resolve to a callable, or options it does not take."""


def resolve_reward(
    name: str, base_dir: str | Path | None = None, args: Mapping[str, Any] | None = None
) -> Callable:
    """Return the reward that `name` refers to, built with the options `args`."""
    target = find(name, base_dir)
    return build(name, target, dict(args or {}))


def check(name: str, base_dir: str | Path | None = None, args: Mapping | None = None) -> Callable:
    """Find `name` and check `args` against its options without building it (no judge called,
    no model loaded); return what `name` points to."""
    target = find(name, base_dir)
    _check_options(name, target, dict(args or {}), reward=is_reward(target))
    return target


def find(name: str, base_dir: str | Path | None = None) -> Callable:
    """The object `name` points to: a reward or a factory of rewards."""
    if name in BUILTIN:
        return BUILTIN[name]
    plugins = plugin_entry_points()
    if name in plugins:
        try:
            target = plugins[name].load()
        except Exception as err:
            raise RewardLookupError(
                f"reward {name!r}: the plugin entry point {plugins[name].value!r} "
                f"(package {_dist_name(plugins[name])}) failed to load: {err}"
            ) from err
        return _check_callable(target, name)
    if ".py:" in name or name.endswith(".py"):
        return _from_file(name, base_dir)
    if ":" in name or "." in name:
        return _from_module(name)
    known = [*BUILTIN, *plugins]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RewardLookupError(
        f"unknown reward {name!r}{hint} Built-in rewards: {', '.join(sorted(BUILTIN))}"
        + (f"; plugins: {', '.join(sorted(plugins))}" if plugins else "")
        + "; custom rewards are given as 'package.module:function' or './file.py:function'"
    )


def is_reward(obj: Callable) -> bool:
    """True for TRL's reward signature (names `completions` or takes **kwargs)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name == "completions" for p in params)


def build(name: str, target: Callable, args: dict[str, Any]) -> Callable:
    """A reward from `target`: call a factory with `args`, or bind `args` to a reward."""
    if is_reward(target):
        if not args:
            return target
        _check_options(name, target, args, reward=True)
        bound = functools.partial(target, **args)
        functools.update_wrapper(bound, target)
        return bound
    _check_options(name, target, args, reward=False)
    try:
        reward = target(**args)
    except (TypeError, ValueError) as err:
        raise RewardLookupError(f"reward {name!r}: bad options {args}: {err}") from err
    if not callable(reward) or not is_reward(reward):
        raise RewardLookupError(
            f"reward {name!r}: {_qualname(target)}(**args) returned {reward!r:.80}, which is not "
            "a reward fn(prompts, completions, **kwargs)"
        )
    return reward


def options(target: Callable) -> list[inspect.Parameter]:
    """The options a factory takes (for a reward: its keyword arguments with defaults)."""
    params = inspect.signature(target).parameters.values()
    if is_reward(target):
        return [p for p in params if p.default is not p.empty and p.kind is not p.VAR_KEYWORD]
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def plugin_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Rewards that installed packages declare in the `posttrain.rewards` entry-point group."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _check_options(name: str, target: Callable, args: dict[str, Any], reward: bool) -> None:
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and not reward:
        return
    accepted = [p.name for p in options(target)] if reward else list(params)
    unknown = [k for k in args if k not in accepted]
    if unknown:
        hints = [difflib.get_close_matches(k, accepted, n=1) for k in unknown]
        hint = "".join(
            f"; did you mean {h[0]!r} for {k!r}?" for k, h in zip(unknown, hints, strict=True) if h
        )
        raise RewardLookupError(
            f"reward {name!r} has no option(s) {unknown}{hint} Options: {accepted or 'none'}"
        )
    if not reward:
        missing = [
            p.name
            for p in params.values()
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in args
        ]
        if missing:
            raise RewardLookupError(
                f"reward {name!r} needs option(s) {missing} under `args:` "
                f"(it is built by {_qualname(target)}{inspect.signature(target)})"
            )


def _from_module(name: str) -> Callable:
    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardLookupError(
            f"reward {name!r}: cannot import module {module_name!r}: {err}"
        ) from err
    return _attribute(module, attr, name)


def _from_file(name: str, base_dir: str | Path | None) -> Callable:
    path_text, _, attr = name.rpartition(":") if ".py:" in name else (name, "", "")
    if not attr:
        raise RewardLookupError(f"reward {name!r}: name the function, as in './file.py:function'")
    candidates = [Path(path_text)]
    if base_dir is not None and not Path(path_text).is_absolute():
        candidates.append(Path(base_dir) / path_text)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        tried = ", ".join(str(p.resolve()) for p in candidates)
        raise RewardLookupError(f"reward {name!r}: file not found (tried {tried})")
    module_name = f"posttrain_user_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return _attribute(module, attr, name)


def _attribute(module, attr: str, name: str) -> Callable:
    fn = getattr(module, attr, None)
    if fn is None:
        public = [a for a in dir(module) if not a.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RewardLookupError(f"reward {name!r}: {module.__name__} has no {attr!r}{hint}")
    return _check_callable(fn, name, attr)


def _check_callable(fn: Any, name: str, attr: str | None = None) -> Callable:
    if not callable(fn):
        what = repr(attr) if attr else f"{fn!r:.60}"
        raise RewardLookupError(f"reward {name!r}: {what} is not callable")
    return fn


def _qualname(obj: Callable) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "unknown"
