"""Combine reward functions into one score per sample.

A reward is any callable with TRL's signature, `fn(prompts, completions, **columns)`, returning
one `float | None` per completion (`None`: does not apply to that sample; `Scored(score,
feedback)` attaches text such as a sandbox's stderr). The rubric calls each with keyword
arguments, as TRL does, passing the dataset columns it accepts. The total is the weighted sum
of the components that apply; weight 0 keeps a component as a logged metric only.

Composition:
- gate: a term with `gate="verifier"` is scored only on the samples where the `verifier` term
  reached `gate_min`; elsewhere it is None (e.g. a judge counts only for correct answers).
- concurrency: terms run at the same time (async rewards on one event loop, plain functions in
  threads), gated terms after the terms they wait for. Rewards must therefore be thread-safe.
- timeout: a term slower than its `timeout` seconds fails (a plain function's thread cannot be
  killed and finishes in the background; rewards that can hang should bound themselves, as
  `code_tests` and `judge_score` do).
- errors: `on_error="raise"` (the default, for tests and scripts) raises `RewardError` naming
  the reward; `on_error="count"` (training) records failed samples as None, counts them in
  `reward/<name>/errors`, and raises once a term's failures pass `max_error_rate` of the
  samples it has seen. Never a silent 0.0.

Signatures are checked when the rubric is built, so a reward that needs a column the data does
not have, or a gate on an unknown term, fails at start-up.

Test: `pytest tests/test_rubric.py tests/test_rubric_composition.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rewards.calls import Outcome, check_signature, run_terms

OnError = Literal["raise", "count"]


class RewardConfigError(ValueError):
    """A rubric that cannot be built: no rewards, repeated names, bad gates or policy."""


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not one score per completion."""


@dataclass(frozen=True)
class RewardTerm:
    name: str
    fn: Callable
    weight: float = 1.0
    gate: str | None = None
    """Score this term only where the term named here reached `gate_min`."""
    gate_min: float = 1.0
    timeout: float | None = None
    """Seconds one call may take; None = no limit."""


@dataclass(frozen=True)
class Scores:
    """Per-sample results: `total[i]` and `components[name][i]` (None = not applicable).

    `feedback[name][i]` holds text a reward attached (None where it gave none); `errors[name]`
    counts the samples a term failed on in this call (filled when the rubric counts errors).
    """

    total: list[float]
    components: dict[str, list[float | None]]
    feedback: dict[str, list[str | None]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Mean total, mean of each component where it applies, and error counts."""
        out = {f"{prefix}/total": _mean(self.total)}
        for name, values in self.components.items():
            applied = [v for v in values if v is not None]
            if applied:
                out[f"{prefix}/{name}"] = _mean(applied)
        for name, count in self.errors.items():
            out[f"{prefix}/{name}/errors"] = float(count)
        return out


class Rubric:
    """Weighted reward functions, checked against the available dataset columns."""

    def __init__(
        self,
        terms: Sequence[RewardTerm],
        columns: Sequence[str] | None = None,
        on_error: OnError = "raise",
        max_error_rate: float = 0.0,
    ) -> None:
        if not terms:
            raise RewardConfigError("a rubric needs at least one reward")
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RewardConfigError(f"reward names must be unique; repeated: {duplicates}")
        if on_error not in ("raise", "count"):
            raise RewardConfigError(f"on_error must be 'raise' or 'count', got {on_error!r}")
        if not 0.0 <= max_error_rate <= 1.0:
            raise RewardConfigError(f"max_error_rate must be in [0, 1], got {max_error_rate}")
        self.terms = list(terms)
        self.on_error = on_error
        self.max_error_rate = max_error_rate
        self._accepts = {t.name: check_signature(t.name, t.fn, columns) for t in self.terms}
        self._waves = _gate_waves(self.terms)
        self.seen = dict.fromkeys(names, 0)
        self.failed = dict.fromkeys(names, 0)

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
        values: dict[str, list[float | None]] = {}
        feedback: dict[str, list[str | None]] = {}
        errors: dict[str, int] = {}
        for wave in self._waves:
            calls = []
            for term in wave:
                rows = self._rows_for(term, values, len(completions))
                accepts = self._accepts[term.name]
                kwargs = {
                    k: [v[i] for i in rows]
                    for k, v in columns.items()
                    if accepts is None or k in accepts
                }
                sub_prompts = [prompts[i] for i in rows]
                sub_completions = [completions[i] for i in rows]
                calls.append((term, rows, sub_prompts, sub_completions, kwargs))
            live = [call for call in calls if call[1]]
            outcomes = run_terms([(t.fn, p, c, k, t.timeout) for t, _, p, c, k in live])
            done = {call[0].name: out for call, out in zip(live, outcomes, strict=True)}
            for term, rows, *_ in calls:
                outcome = done.get(term.name, Outcome([], [], [], None))
                self._settle(term, rows, outcome, len(completions), values, feedback, errors)
        total = []
        for i in range(len(completions)):
            parts = [(t.weight, values[t.name][i]) for t in self.terms if t.weight != 0]
            total.append(sum(w * v for w, v in parts if v is not None and not math.isnan(v)))
        return Scores(
            total,
            values,
            {k: v for k, v in feedback.items() if any(f is not None for f in v)},
            errors if self.on_error == "count" else {},
        )

    def _rows_for(self, term: RewardTerm, values: dict, n: int) -> list[int]:
        if term.gate is None:
            return list(range(n))
        gate = values[term.gate]
        return [i for i in range(n) if gate[i] is not None and gate[i] >= term.gate_min]

    def _settle(self, term, rows, outcome: Outcome, n, values, feedback, errors) -> None:
        """Place a term's outcome at its rows and apply the error policy."""
        column: list[float | None] = [None] * n
        notes: list[str | None] = [None] * n
        failed = len(rows) if outcome.error else len(outcome.failures)
        if outcome.error is None:
            for j, i in enumerate(rows):
                column[i] = outcome.values[j]
                notes[i] = outcome.feedback[j]
        message = outcome.error or (outcome.failures[0] if outcome.failures else None)
        if failed and self.on_error == "raise":
            raise RewardError(f"reward {term.name!r} {message}") from outcome.cause
        self.seen[term.name] += len(rows)
        self.failed[term.name] += failed
        values[term.name], feedback[term.name], errors[term.name] = column, notes, failed
        seen, bad = self.seen[term.name], self.failed[term.name]
        if bad and bad > self.max_error_rate * seen:
            raise RewardError(
                f"reward {term.name!r} failed on {bad} of {seen} samples so far "
                f"({bad / seen:.1%}), above max_error_rate {self.max_error_rate:.1%}; "
                f"last error: {message}"
            ) from outcome.cause


def _gate_waves(terms: list[RewardTerm]) -> list[list[RewardTerm]]:
    """Terms grouped so that every gate is scored in an earlier wave than what it gates."""
    by_name = {t.name: t for t in terms}
    depth: dict[str, int] = {}

    def level(term: RewardTerm, trail: tuple[str, ...]) -> int:
        if term.name in depth:
            return depth[term.name]
        if term.gate is None:
            depth[term.name] = 0
            return 0
        if term.gate not in by_name:
            raise RewardConfigError(
                f"reward {term.name!r} is gated on {term.gate!r}, which is not a reward of this "
                f"rubric ({sorted(by_name)})"
            )
        if term.gate in trail:
            raise RewardConfigError(
                f"reward gates form a cycle: {' -> '.join((*trail, term.gate))}"
            )
        depth[term.name] = level(by_name[term.gate], (*trail, term.gate)) + 1
        return depth[term.name]

    for term in terms:
        level(term, (term.name,))
    return [[t for t in terms if depth[t.name] == d] for d in range(max(depth.values()) + 1)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
