"""Math answers: extract a completion's final answer and check it against a ground-truth column.

`extract_answer(text, strategies=...)` tries strategies in order and returns the first answer
found: `boxed` (the last `\\boxed{...}` or `\\fbox{...}`, nested braces included), `answer_is`
(the last "The answer is X" / "Answer: X"), `gsm8k` (the last "#### X" line), `last_number`
(the last number: signs, thousands commas, decimals, fractions like 3/4) and `whole` (the whole
text). `answers_match(predicted, gold)` decides equivalence, first match wins:

1. both sides are plain numbers (`72`, `-1,000`, `0.5`, `3/4`, `\\frac{3}{4}`, `1e-3`): two
   integers must be equal (a relative tolerance would let 10000000 pass for 10000001), other
   numbers equal within `rel_tol` / `abs_tol` (`math.isclose` semantics, in exact rational
   arithmetic, so 0.333333 passes for 1/3 at rel_tol=1e-6); the numeric verdict is final;
2. the same text once whitespace is removed;
3. math-verify (`verify(parse(gold), parse(predicted))`): symbolic and numeric equivalence of
   LaTeX and plain expressions (`\\frac{1}{2}` = `0.5`, `2\\sqrt{3}` = `\\sqrt{12}`, sets,
   intervals, equations).

`math_answer(...)` is the reward factory: 1.0 for an equivalent answer, 0.0 for a different or
missing one, None (not applicable) when the ground truth itself is empty.

How math-verify is called, and why:
- Answers are wrapped as `$...$` before `parse`. Its default extraction looks for LaTeX inside
  math delimiters or `\\boxed`; a bare `\\sqrt{2}` or `\\frac12` is otherwise not found and
  `(1, 2)` or `2\\sqrt{3}` are read as their last number.
- `verify(gold, target)` is not symmetric (assignments like `x = 5` and equations follow the
  gold's form), so the ground truth always goes first.
- `verify(parse('$\\frac{1}{2}$'), parse('$0.5$'))` is True. A False seen for it comes from a
  Python string without the `r` prefix: `'\\f'` is a form feed, so math-verify reads `rac{1}{2}`.
- Timeouts. math-verify bounds `parse` and `verify` with `signal.alarm`, which exists only in the
  main thread (elsewhere it raises ValueError), and rubrics run rewards in worker threads. Its
  own timeouts are therefore turned off (`parsing_timeout=None`, `timeout_seconds=None`) and
  each comparison runs under `rewards.deadline.within`, a deadline that works in any thread: a timer raises an
  exception in the comparing thread (`PyThreadState_SetAsyncExc`). It reaches as far as the
  signal did (Python code, between bytecodes; one long C call finishes first). A comparison past
  its deadline counts as not equivalent (0.0, as math-verify scores its own timeouts) and is
  logged as a warning.

Compared with TRL's `accuracy_reward`: the same verdicts for one `\\boxed` answer; here several
boxes mean the last one (math-verify reads them all together as a set, which TRL then compares
with the gold), answers without LaTeX anchors ("The answer is 2") are found, the ground truth
is parsed inside `$...$` (TRL parses it bare, so `\\sqrt{12}` or `\\{1,2\\}` there are unparseable
and score None), plain numbers are compared with a tolerance, and the ground-truth column is
`answer` (TRL: `solution`).

Test: `pytest tests/test_rewards_math.py`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rewards.answer_extract import (  # noqa: F401 - extract_answer is re-exported
    DEFAULT_STRATEGIES,
    STRATEGIES,
    checked_strategies,
    clean_answer,
    extract_answer,
    extract_with,
)
from rewards.deadline import within
from rewards.text import completion_text
from rewards.types import Scored

logger = logging.getLogger(__name__)

RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")


# ---------------------------------------------------------------------------------------------
# Equivalence

_PLAIN_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_RATIO = re.compile(
    r"([+-]?)(?:(\d+)\s*/\s*(\d+)|\\[dt]?frac\{(\d+)\}\{(\d+)\}|\\[dt]?frac(\d)(\d))"
)


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact rational if it is a plain number, a ratio `a/b` or `\\frac{a}{b}`."""
    text = clean_answer(text).removeprefix("\\$").removeprefix("$")
    # LaTeX thousands separators and spaces: 1{,}000, 1\,000, 1\!000
    text = text.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace(" ", "")
    if _PLAIN_NUMBER.fullmatch(text):
        return Fraction(text.replace(",", ""))
    ratio = _RATIO.fullmatch(text)
    if ratio:
        sign, *parts = ratio.groups()
        numerator, denominator = (int(p) for p in parts if p is not None)
        if denominator:
            return Fraction(-numerator if sign == "-" else numerator, denominator)
    return None


def answers_match(
    predicted: str,
    gold: str,
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    use_math_verify: bool = True,
    timeout_s: float | None = 5.0,
) -> bool:
    """Whether `predicted` is equivalent to `gold` (see the module docstring for the order)."""
    return _compare(predicted, gold, rel_tol, abs_tol, use_math_verify, timeout_s)[0]


def _compare(
    predicted: str,
    gold: str,
    rel_tol: float,
    abs_tol: float,
    use_math_verify: bool,
    timeout_s: float | None,
) -> tuple[bool, str]:
    """(equivalent, how it was decided)."""
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        if a.denominator == 1 and b.denominator == 1:
            return a == b, "integers"
        # The tolerances as the decimals written (1e-6 is exactly 1/10**6, not the nearest float).
        rel, tol = Fraction(str(rel_tol)), Fraction(str(abs_tol))
        return abs(a - b) <= max(rel * max(abs(a), abs(b)), tol), "numbers"
    if re.sub(r"\s+", "", predicted) == re.sub(r"\s+", "", gold):
        return True, "same text"
    if not use_math_verify:
        return False, "different text (math-verify off)"
    _math_verify()  # import and warm up outside the deadline: an import must not be cut short
    finished, same = within(timeout_s, lambda: _math_verify_equal(predicted, gold))
    if not finished:
        logger.warning(
            "math_answer: math-verify took over %ss comparing %.80r with gold %.80r; "
            "scored as not equivalent",
            timeout_s,
            predicted,
            gold,
        )
        return False, f"math-verify timed out after {timeout_s}s"
    return bool(same), "math-verify"


def _math_verify_equal(predicted: str, gold: str) -> bool:
    _, verify = _math_verify()
    return verify(_parsed(gold), _parsed(predicted), timeout_seconds=None)


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str) -> list:
    parse, _ = _math_verify()
    return parse(f"${answer}$", parsing_timeout=None)


@functools.cache
def _math_verify() -> tuple[Callable, Callable]:
    """math-verify's parse and verify, imported on first use (it pulls in sympy)."""
    from math_verify import parse, verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_TimeoutsOffNotice())
    # One comparison loads what parse and verify import lazily (sympy, the LaTeX grammar).
    verify(
        parse("$1$", parsing_timeout=None), parse("$1$", parsing_timeout=None), timeout_seconds=None
    )
    return parse, verify


class _TimeoutsOffNotice(logging.Filter):
    """Drops math-verify's "Timeout is disabled" notice: `rewards.deadline.within` bounds every call instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


# ---------------------------------------------------------------------------------------------
# The reward


def math_answer(
    *,
    answer_column: str = "answer",
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    gold_strategies: Sequence[str] = ("whole",),
    after: str | None = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    use_math_verify: bool = True,
    timeout_s: float | None = 5.0,
    feedback: bool = False,
) -> MathAnswer:
    """1.0 when the completion's final answer is equivalent to the ground truth, else 0.0.

    - `answer_column`: the dataset column holding the ground truth.
    - `strategies`: how the completion's answer is found, tried in order (see `STRATEGIES`).
    - `gold_strategies`: how the ground truth is read from its column: `whole` (the default)
      takes the cell as it is; `boxed` reads MATH solutions, `gsm8k` GSM8K's "#### 72".
    - `after`: only the text after the last occurrence of this marker is searched (e.g.
      `</think>`); a completion without it scores 0.0 (its reasoning did not finish).
    - `rel_tol`, `abs_tol`: tolerance for plain numbers (`math.isclose` semantics).
    - `use_math_verify`: fall back on math-verify for non-numeric answers.
    - `timeout_s`: time allowed per comparison (None or 0: unbounded).
    - `feedback`: return `Scored(score, note)` with the extracted answer and how it was judged,
      for samples tables (plain floats otherwise, as TRL expects).

    A ground truth that is empty, or where `gold_strategies` find nothing, scores None.
    """
    if not (isinstance(answer_column, str) and answer_column.isidentifier()):
        raise _bad("answer_column", "a column name that is a Python identifier", answer_column)
    if answer_column in RESERVED_COLUMNS:
        raise _bad(
            "answer_column", f"a dataset column, not one of {RESERVED_COLUMNS}", answer_column
        )
    if after is not None and not (isinstance(after, str) and after):
        raise _bad("after", "a non-empty string or null", after)
    for name, value in [("rel_tol", rel_tol), ("abs_tol", abs_tol)]:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value >= 0):
            raise _bad(name, "a finite number >= 0", value)
    for name, value in [("use_math_verify", use_math_verify), ("feedback", feedback)]:
        if not isinstance(value, bool):
            raise _bad(name, "true or false", value)
    if timeout_s is not None and not (
        isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s >= 0
    ):
        raise _bad("timeout_s", "a number of seconds >= 0, or null", timeout_s)
    return MathAnswer(
        answer_column=answer_column,
        strategies=checked_strategies("math_answer", "strategies", strategies),
        gold_strategies=checked_strategies("math_answer", "gold_strategies", gold_strategies),
        after=after,
        rel_tol=float(rel_tol),
        abs_tol=float(abs_tol),
        use_math_verify=use_math_verify,
        timeout_s=timeout_s or None,
        feedback=feedback,
    )


@dataclass(frozen=True)
class MathAnswer:
    answer_column: str
    strategies: tuple[str, ...]
    gold_strategies: tuple[str, ...]
    after: str | None
    rel_tol: float
    abs_tol: float
    use_math_verify: bool
    timeout_s: float | None
    feedback: bool
    __name__ = "math_answer"

    def __post_init__(self) -> None:
        # The signature names the ground-truth column, so a rubric checks it when it is built.
        kind = inspect.Parameter
        signature = inspect.Signature(
            [
                kind("prompts", kind.POSITIONAL_OR_KEYWORD),
                kind("completions", kind.POSITIONAL_OR_KEYWORD),
                kind(self.answer_column, kind.KEYWORD_ONLY),
                kind("kwargs", kind.VAR_KEYWORD),
            ]
        )
        object.__setattr__(self, "__signature__", signature)

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list:
        if self.answer_column not in columns:
            raise ValueError(
                f"math_answer needs the ground-truth column {self.answer_column!r} "
                f"(option answer_column); got columns {sorted(columns)}"
            )
        golds = columns[self.answer_column]
        if len(golds) != len(completions):
            raise ValueError(
                f"math_answer: column {self.answer_column!r} has {len(golds)} values for "
                f"{len(completions)} completions"
            )
        results = [
            self.judge(completion_text(c), g) for c, g in zip(completions, golds, strict=True)
        ]
        return results if self.feedback else [r.score for r in results]

    def judge(self, text: str, gold: Any) -> Scored:
        """Score one completion against its ground truth, with a note on how."""
        gold_text = (
            "" if gold is None or (isinstance(gold, float) and math.isnan(gold)) else str(gold)
        )
        found_gold = extract_with(gold_text, self.gold_strategies)
        if found_gold is None:
            return Scored(None, f"no ground truth in {gold_text[:80]!r} ({self.answer_column})")
        if self.after is not None:
            if self.after not in text:
                return Scored(0.0, f"no {self.after!r} in the completion")
            text = text.rsplit(self.after, 1)[1]
        found = extract_with(text, self.strategies)
        if found is None:
            return Scored(0.0, f"no answer found ({', '.join(self.strategies)})")
        (answer, strategy), gold_answer = found, found_gold[0]
        same, how = _compare(
            answer, gold_answer, self.rel_tol, self.abs_tol, self.use_math_verify, self.timeout_s
        )
        verdict = "==" if same else "!="
        return Scored(
            1.0 if same else 0.0, f"{answer!r} ({strategy}) {verdict} {gold_answer!r} by {how}"
        )


def _bad(option: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"math_answer: option {option!r} must be {expected}, got {got!r}")
