"""Final-answer extraction: `\\boxed{...}`, "the answer is X", GSM8K's `#### X`, the last
number, or the whole text, tried in a configurable order.

Used by `rewards.math_answer`. Test: `pytest tests/test_rewards_math.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

STRATEGIES = ("boxed", "answer_is", "gsm8k", "last_number", "whole")
DEFAULT_STRATEGIES = ("boxed", "answer_is", "last_number")


# ---------------------------------------------------------------------------------------------
# Extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS = re.compile(r"\banswer\b(?:\s*\*\*)?\s*(?:is(?![\w'’])\s*:?|:)(?:\s*\*\*)?", re.I)
_GSM8K = re.compile(r"^[ \t]*####[ \t]*(.+)$", re.M)
_NUMBER_IN_TEXT = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+|[eE][-+]?\d+)?"
    r"|(?<![\w.])-?\.\d+"
)
_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def extract_answer(text: str, *, strategies: Sequence[str] = DEFAULT_STRATEGIES) -> str | None:
    """The final answer in `text` by the first strategy that finds one, or None."""
    found = extract_with(text, checked_strategies("extract_answer", "strategies", strategies))
    return found[0] if found else None


def extract_with(text: str, strategies: Sequence[str]) -> tuple[str, str] | None:
    """(answer, strategy that found it) or None."""
    for name in strategies:
        answer = clean_answer(_EXTRACTORS[name](text) or "")
        if answer:
            return answer, name
    return None


def _boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`); None if unclosed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    rest = text[starts[-1] :]
    body = rest.lstrip()
    if body.startswith("{"):
        return _braced(body)
    short = re.match(r"\s+([^\s$]+)", rest)  # `\boxed 5`, as in some MATH solutions
    return short.group(1) if short else None


def _braced(text: str) -> str | None:
    """Content of the brace group opening `text`, skipping escaped `\\{` and `\\}`."""
    depth, i = 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[1:i]
        i += 1
    return None


def _answer_is(text: str) -> str | None:
    """What follows the last "the answer is" / "Answer:", up to the end of its sentence."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    line = text[matches[-1].end() :].lstrip().split("\n", 1)[0]
    # Up to the end of the sentence or a clause ("5, which is ..."); "(1, 2)" stays whole.
    answer = re.split(r"\.(?:\s|$)|,\s+(?=[A-Za-z]{2})", line, maxsplit=1)[0]
    for left, right in _MATH_WRAPPERS:  # ... or of the math span it starts with
        end = line.find(right, len(left)) if line.startswith(left) else -1
        if end > 0:
            answer = line[len(left) : end]
            break
    if _BOXED.search(answer):
        return _boxed(answer)
    return answer.strip().rstrip(",;:").removesuffix("**")


def _gsm8k(text: str) -> str | None:
    lines = _GSM8K.findall(text)
    return lines[-1] if lines else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_IN_TEXT.findall(text)
    return numbers[-1] if numbers else None


_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": _boxed,
    "answer_is": _answer_is,
    "gsm8k": _gsm8k,
    "last_number": _last_number,
    "whole": lambda text: text,
}


def clean_answer(answer: str) -> str:
    """Strip whitespace, a trailing period and one pair of math delimiters (`$..$`, `\\(..\\)`)."""
    answer = answer.strip()
    for left, right in _MATH_WRAPPERS:
        if len(answer) > len(left) + len(right) and answer.startswith(left):
            if answer.endswith(right):
                answer = answer[len(left) : -len(right)].strip()
            break
    return answer.removesuffix(".").strip()


def checked_strategies(reward: str, option: str, strategies: Any) -> tuple[str, ...]:
    ok = isinstance(strategies, (list, tuple)) and len(strategies) > 0
    if not ok or any(s not in STRATEGIES for s in strategies):
        raise ValueError(
            f"{reward}: option {option!r} must be a non-empty list of {list(STRATEGIES)}, "
            f"got {strategies!r}"
        )
    return tuple(strategies)
