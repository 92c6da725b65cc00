"""Small types shared by reward functions and the rubric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Reward = Callable[..., Any]
"""TRL's signature: `fn(prompts, completions, **columns) -> list[float | None | Scored]`."""


@dataclass(frozen=True)
class Scored:
    """A score with feedback text (e.g. a sandbox's stderr, a judge's rationale).

    A reward may return these in place of floats; the rubric keeps `score` in the totals and
    `feedback` beside it (`Scores.feedback[name][i]`), e.g. for samples tables.
    """

    score: float | None
    feedback: str = ""


@dataclass(frozen=True)
class Failed:
    """One sample a reward could not score (returned by `per_sample` rewards that raise).

    The rubric treats it by its error policy: raise, or count under `reward/<name>/errors`.
    """

    error: str
