"""`@per_sample`: write a reward for one sample, get TRL's batch signature.

    @per_sample
    def brevity(prompt, completion, answer=None):
        return 1.0 if len(completion) < 20 else 0.0

becomes `brevity(prompts, completions, **columns) -> list[float | None]`: each row's columns
arrive as single values, conversational completions as their last message's text (pass
`raw=True` to get them as they are). A sample that raises becomes `Failed(error)`, so one bad
sample is counted (or raised) by the rubric's error policy without losing the others.

Test: `pytest tests/test_rubric_composition.py`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from rewards.text import completion_text
from rewards.types import Failed


def per_sample(fn: Callable | None = None, *, raw: bool = False) -> Callable:
    """Wrap `fn(prompt, completion, **row) -> float | None` as a batch reward."""

    def wrap(one: Callable) -> Callable:
        params = inspect.signature(one).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        wanted = [n for n in params if n not in ("prompt", "completion")]

        @functools.wraps(one)
        def batch(prompts: list, completions: list, **columns: list) -> list[Any]:
            keys = list(columns) if takes_any else [k for k in wanted if k in columns]
            out: list[Any] = []
            for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
                row = {k: columns[k][i] for k in keys}
                text = completion if raw else completion_text(completion)
                try:
                    out.append(one(prompt, text, **row))
                except Exception as err:
                    out.append(Failed(f"{type(err).__name__}: {err}"))
            return out

        # The rubric checks this signature against the data's columns.
        batch.__signature__ = inspect.Signature(
            [
                inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                inspect.Parameter("completions", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                *[p for n, p in params.items() if n not in ("prompt", "completion")],
            ]
        )
        return batch

    return wrap(fn) if fn is not None else wrap
