"""Calling reward functions: signature checks, concurrency, timeouts, and result checks.

How terms run (one `run_terms` call per wave of the rubric):
- async rewards are awaited together on one event loop (in a worker thread, so a caller that
  already runs a loop, such as a notebook, is fine), each under its timeout;
- plain functions with a timeout run in their own worker thread, awaited on that same loop;
- plain functions without a timeout run in the calling thread, one after another, while the
  loop works. This keeps libraries that rely on the main thread (math-verify's signal-based
  timeouts, for one) working when used as rewards.

Test: `pytest tests/test_rubric.py tests/test_rubric_composition.py`.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rewards.types import Failed, Scored

ALWAYS_PASSED = ("prompts", "completions")
PASSED_WHEN_GIVEN = ("completion_ids",)  # as TRL's trainers pass them


class RewardSignatureError(TypeError):
    """A reward whose signature does not fit TRL's, or needs a column the data lacks."""


Job = tuple[Callable, list, list, dict, float | None]  # fn, prompts, completions, kwargs, timeout


@dataclass
class Outcome:
    """One term's call: values and feedback per sample, per-sample failures, or a call error."""

    values: list[float | None]
    feedback: list[str | None]
    failures: list[str]
    error: str | None
    cause: BaseException | None = None


def check_signature(name: str, fn: Callable, columns: Sequence[str] | None) -> set[str] | None:
    """Return the keyword names the reward accepts (None = any, it takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [a for a in ALWAYS_PASSED if a not in named and not var_kw]
    if missing:
        raise RewardSignatureError(
            f"reward {name!r} must accept the keyword arguments prompts and completions "
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
            raise RewardSignatureError(
                f"reward {name!r} needs column(s) {absent}, but the data has "
                f"{sorted(columns)}; map a column to that name or give the argument a default"
            )
    return None if var_kw else named


def run_terms(jobs: list[Job]) -> list[Outcome]:
    """Run every job (see the module docstring for how) and return outcomes in order."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    background = [i for i, job in enumerate(jobs) if _is_async(job[0]) or job[4] is not None]
    thread = None
    if background:

        def loop() -> None:
            results = asyncio.run(_gather([jobs[i] for i in background]))
            for i, outcome in zip(background, results, strict=True):
                outcomes[i] = outcome

        thread = threading.Thread(target=loop, name="posttrain-rewards", daemon=True)
        thread.start()
    for i, (fn, prompts, completions, kwargs, _) in enumerate(jobs):
        if i not in background:
            outcomes[i] = _checked(_call_here(fn, prompts, completions, kwargs), len(completions))
    if thread is not None:
        thread.join()
    return outcomes


async def _gather(jobs: list[Job]) -> list[Outcome]:
    return list(await asyncio.gather(*(_call_async(*job) for job in jobs)))


async def _call_async(fn, prompts, completions, kwargs, timeout) -> Outcome:
    try:
        if _is_async(fn):
            pending = fn(prompts=prompts, completions=completions, **kwargs)
        else:
            pending = asyncio.to_thread(fn, prompts=prompts, completions=completions, **kwargs)
        result = await asyncio.wait_for(pending, timeout)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, timeout)
    except TimeoutError as err:
        return Outcome([], [], [], f"timed out after {timeout} s", err)
    except Exception as err:
        return Outcome([], [], [], f"raised {type(err).__name__}: {err}", err)
    return _checked(result, len(completions))


def _call_here(fn, prompts, completions, kwargs) -> Any:
    try:
        result = fn(prompts=prompts, completions=completions, **kwargs)
        if inspect.isawaitable(result):  # a sync callable that returned a coroutine
            result = asyncio.run(_await(result))
    except Exception as err:
        return Outcome([], [], [], f"raised {type(err).__name__}: {err}", err)
    return result


async def _await(awaitable):
    return await awaitable


def _checked(result: Any, count: int) -> Outcome:
    """Check a reward's return value: one float, None, Scored or Failed per completion."""
    if isinstance(result, Outcome):
        return result
    if not isinstance(result, (list, tuple)) or len(result) != count:
        size = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
        return Outcome([], [], [], f"must return one score per completion ({count}), got {size}")
    values: list[float | None] = []
    feedback: list[str | None] = []
    failures: list[str] = []
    for i, value in enumerate(result):
        note = None
        if isinstance(value, Scored):
            value, note = value.score, value.feedback or None
        if isinstance(value, Failed):
            failures.append(f"failed on completion {i}: {value.error}")
            value = None
        elif value is None:
            pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif hasattr(value, "item") and not isinstance(value, bool):
            value = float(value.item())
        else:
            return Outcome(
                [], [], [], f"returned {value!r} for completion {i}; expected a float or None"
            )
        values.append(value)
        feedback.append(note)
    return Outcome(values, feedback, failures, None)


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with `async def __call__`
    )
