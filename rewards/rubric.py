"""Combine reward functions into one score per sample.

A reward is any callable with TRL's signature, `fn(prompts, completions, **columns)`, returning
one `float | None` per completion (`None`: does not apply to that sample). The rubric calls each
with keyword arguments, as TRL does, passing the dataset columns it accepts. The total is the
weighted sum of the components that apply; weight 0 keeps a component as a logged metric only.

Signatures are checked when the rubric is built, so a reward that needs a column the data does
not have fails at start-up. A reward that raises propagates with its name attached: there is no
silent 0.0.

Test: `pytest tests/test_rubric.py`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ALWAYS_PASSED = ("prompts", "completions")
PASSED_WHEN_GIVEN = ("completion_ids",)  # as TRL's trainers pass them


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not one score per completion."""


@dataclass(frozen=True)
class RewardTerm:
    name: str
    fn: Callable
    weight: float = 1.0


@dataclass(frozen=True)
class Scores:
    """Per-sample results: `total[i]` and `components[name][i]` (None = not applicable)."""

    total: list[float]
    components: dict[str, list[float | None]]

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Mean total and mean of each component over the samples where it applies."""
        out = {f"{prefix}/total": _mean(self.total)}
        for name, values in self.components.items():
            applied = [v for v in values if v is not None]
            if applied:
                out[f"{prefix}/{name}"] = _mean(applied)
        return out


class Rubric:
    """Weighted reward functions, checked against the available dataset columns."""

    def __init__(self, terms: Sequence[RewardTerm], columns: Sequence[str] | None = None) -> None:
        if not terms:
            raise ValueError("a rubric needs at least one reward")
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward names must be unique; repeated: {duplicates}")
        self.terms = list(terms)
        self._accepts = {t.name: _check_signature(t, columns) for t in self.terms}

    def score(
        self,
        prompts: list[Any],
        completions: list[Any],
        columns: dict[str, list] | None = None,
        completion_ids: list[list[int]] | None = None,
    ) -> Scores:
        """Score each completion; `columns` are dataset columns as keyword lists."""
        columns = dict(columns or {})
        if completion_ids is not None:
            columns["completion_ids"] = completion_ids
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        for key, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(
                    f"column {key!r} has {len(values)} values for {len(completions)} completions"
                )
        components: dict[str, list[float | None]] = {}
        for term in self.terms:
            accepts = self._accepts[term.name]
            kwargs = {k: v for k, v in columns.items() if accepts is None or k in accepts}
            components[term.name] = _call(term, prompts, completions, kwargs)
        total = []
        for i in range(len(completions)):
            values = [(t.weight, components[t.name][i]) for t in self.terms if t.weight != 0]
            total.append(sum(w * v for w, v in values if v is not None and not math.isnan(v)))
        return Scores(total, components)


def _check_signature(term: RewardTerm, columns: Sequence[str] | None) -> set[str] | None:
    """Return the keyword names the reward accepts (None = any, it takes **kwargs)."""
    try:
        params = inspect.signature(term.fn).parameters.values()
    except (TypeError, ValueError):
        return None
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [a for a in ALWAYS_PASSED if a not in named and not var_kw]
    if missing:
        raise TypeError(
            f"reward {term.name!r} must accept the keyword arguments prompts and completions "
            f"(TRL's signature fn(prompts, completions, **kwargs)); it lacks {missing}"
        )
    required = {
        p.name
        for p in params
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ALWAYS_PASSED
    }
    if columns is not None:
        absent = sorted(required - set(columns) - set(PASSED_WHEN_GIVEN))
        if absent:
            raise TypeError(
                f"reward {term.name!r} needs column(s) {absent}, but the data has "
                f"{sorted(columns)}; map a column to that name or give the argument a default"
            )
    return None if var_kw else named


def _call(term: RewardTerm, prompts, completions, kwargs) -> list[float | None]:
    try:
        result = term.fn(prompts=prompts, completions=completions, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    except Exception as err:
        raise RewardError(f"reward {term.name!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(result, (list, tuple)) or len(result) != len(completions):
        size = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
        raise RewardError(
            f"reward {term.name!r} must return one score per completion "
            f"({len(completions)}), got {size}"
        )
    out: list[float | None] = []
    for i, value in enumerate(result):
        if value is None:
            out.append(None)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
        elif hasattr(value, "item"):
            out.append(float(value.item()))
        else:
            raise RewardError(
                f"reward {term.name!r} returned {value!r} for completion {i}; "
                "expected a float or None"
            )
    return out


async def _await(awaitable):
    return await awaitable


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
