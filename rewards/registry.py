"""Find a reward function by name: built-in names, dotted paths, or file paths.

- built-in: a key of `BUILTIN` (`exact_answer`, ...)
- dotted path: `my_pkg.rewards:fn` or `my_pkg.rewards.fn`
- file path: `./my_reward.py:fn` or `/abs/path/r.py:fn` (relative paths are tried against the
  working directory first, then against `base_dir`, usually the config file's folder)
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from rewards.answer import exact_answer

BUILTIN: dict[str, Callable] = {
    "exact_answer": exact_answer,
}


class RewardLookupError(ValueError):
    """A reward name that does not resolve to a callable."""


def resolve_reward(name: str, base_dir: str | Path | None = None) -> Callable:
    """Return the reward callable that `name` refers to."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ".py:" in name or name.endswith(".py"):
        return _from_file(name, base_dir)
    if ":" in name or "." in name:
        return _from_module(name)
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RewardLookupError(
        f"unknown reward {name!r}{hint} Built-in rewards: {', '.join(sorted(BUILTIN))}; "
        "custom rewards are given as 'package.module:function' or './file.py:function'"
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
    if not callable(fn):
        raise RewardLookupError(f"reward {name!r}: {attr!r} is not callable")
    return fn
