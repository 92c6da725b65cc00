"""Rule rewards: format, length, repetition and keyword checks on a completion's text.

Every public function here is a factory: it takes a reward spec's options (the YAML `args:`
mapping) as keyword arguments, checks them (a bad option is a `ValueError` naming it), and
returns a reward with TRL's signature `fn(prompts, completions, completion_ids=None, **columns)`
giving one float per completion. Conversational completions are scored on the last message's
content. Lengths in tokens come from `completion_ids`, which trainers pass as TRL's do.

- `format_regex`: 1.0 when the completion matches a regular expression.
- `required_tags`: 1.0 when `<tag>...</tag>` blocks are present (once, in order), or partial credit.
- `length_band`: 1.0 inside a length band, decaying linearly to 0 over a slack outside it.
- `repetition_penalty`: n-gram repetition penalty of "Demystifying Long Chain-of-Thought
  Reasoning in LLMs" (Yeo et al. 2025, appendix C.2), as in open-r1 and TRL.
- `soft_overlong`: DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13).
- `keywords`: required words present, forbidden words absent.

The rewards are small frozen dataclasses (picklable, and their repr shows the options).

Test: `pytest tests/test_rewards_rules.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rewards.text import completion_text

UNITS = ("tokens", "chars", "words")
REGEX_FLAGS = {
    "a": re.ASCII,
    "i": re.IGNORECASE,
    "m": re.MULTILINE,
    "s": re.DOTALL,
    "x": re.VERBOSE,
}
TAG_NAME = re.compile(r"[A-Za-z_][\w.:-]*")


# ---------------------------------------------------------------------------------------------
# Format


def format_regex(*, pattern: str, flags: str = "", full_match: bool = True) -> FormatRegex:
    """1.0 when the completion (surrounding whitespace ignored) matches `pattern`, else 0.0.

    `flags` are letters of Python's inline flags: `i` ignore case, `m` multiline, `s` dot
    matches newline, `x` verbose, `a` ASCII. `full_match=False` searches anywhere instead.
    """
    if not isinstance(pattern, str) or not pattern:
        raise _bad("format_regex", "pattern", "a non-empty regular expression string", pattern)
    if not (isinstance(flags, str) and set(flags) <= set(REGEX_FLAGS)):
        raise _bad(
            "format_regex", "flags", f"a string of the letters {''.join(REGEX_FLAGS)!r}", flags
        )
    _require_bool("format_regex", "full_match", full_match)
    value = 0
    for letter in flags:
        value |= REGEX_FLAGS[letter]
    try:
        compiled = re.compile(pattern, value)
    except re.error as err:
        raise ValueError(f"format_regex: option 'pattern' {pattern!r} is not valid: {err}") from err
    return FormatRegex(compiled, full_match)


@dataclass(frozen=True)
class FormatRegex:
    regex: re.Pattern
    full_match: bool
    __name__ = "format_regex"

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        match = self.regex.fullmatch if self.full_match else self.regex.search
        return [1.0 if match(completion_text(c).strip()) else 0.0 for c in completions]


def required_tags(
    *,
    tags: Sequence[str] = ("think", "answer"),
    in_order: bool = True,
    exactly_once: bool = True,
    allow_text_outside: bool = True,
    partial: bool = False,
) -> RequiredTags:
    """Check that each tag appears as a `<tag>...</tag>` block (e.g. `<think>` then `<answer>`).

    Checks: one per tag (an opening tag followed later by its closing tag; with `exactly_once`,
    each of the two appears once); with `in_order` and several tags, one that every block is
    present and ends before the next tag's block starts; with `allow_text_outside=False`, one
    that only whitespace lies outside the blocks (DeepSeek-R1's `<think>..</think><answer>..
    </answer>` shape). Score 1.0 when all checks pass, else 0.0, or with `partial` the fraction
    of checks passed.
    """
    if not (_is_string_list(tags) and len(tags) > 0 and all(TAG_NAME.fullmatch(t) for t in tags)):
        raise _bad(
            "required_tags",
            "tags",
            "a non-empty list of tag names such as ['think', 'answer']",
            tags,
        )
    if len(set(tags)) != len(tags):
        raise _bad("required_tags", "tags", "distinct tag names", tags)
    for name, value in [
        ("in_order", in_order),
        ("exactly_once", exactly_once),
        ("allow_text_outside", allow_text_outside),
        ("partial", partial),
    ]:
        _require_bool("required_tags", name, value)
    return RequiredTags(tuple(tags), in_order, exactly_once, allow_text_outside, partial)


@dataclass(frozen=True)
class RequiredTags:
    tags: tuple[str, ...]
    in_order: bool
    exactly_once: bool
    allow_text_outside: bool
    partial: bool
    __name__ = "required_tags"

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return [self.score(completion_text(c)) for c in completions]

    def score(self, text: str) -> float:
        blocks = {tag: _block(text, tag) for tag in self.tags}
        checks = []
        for tag, span in blocks.items():
            ok = span is not None
            if ok and self.exactly_once:
                ok = text.count(f"<{tag}>") == 1 and text.count(f"</{tag}>") == 1
            checks.append(ok)
        if self.in_order and len(self.tags) > 1:
            spans = [blocks[t] for t in self.tags]
            checks.append(
                all(s is not None for s in spans)
                and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
            )
        if not self.allow_text_outside:
            outside, start = [], 0
            for span in sorted(s for s in blocks.values() if s is not None):
                outside.append(text[start : span[0]])
                start = max(start, span[1])
            outside.append(text[start:])
            checks.append("".join(outside).strip() == "")
        if self.partial:
            return sum(checks) / len(checks)
        return 1.0 if all(checks) else 0.0


def _block(text: str, tag: str) -> tuple[int, int] | None:
    """(start, end) of the first `<tag>` and the first `</tag>` after it, or None."""
    start = text.find(f"<{tag}>")
    if start < 0:
        return None
    close = text.find(f"</{tag}>", start + len(tag) + 2)
    return None if close < 0 else (start, close + len(tag) + 3)


# ---------------------------------------------------------------------------------------------
# Length


def length_band(
    *,
    min_length: int | None = None,
    max_length: int | None = None,
    unit: str = "tokens",
    slack: int = 0,
) -> LengthBand:
    """1.0 when `min_length <= length <= max_length`; outside, 1 - distance / slack, floored at 0.

    `slack=0` gives 0.0 anywhere outside the band. Either bound may be left out (open band).
    `unit` is `tokens` (the length of `completion_ids`), `chars` or `words` (whitespace split).
    """
    if unit not in UNITS:
        raise _bad("length_band", "unit", f"one of {list(UNITS)}", unit)
    if min_length is None and max_length is None:
        raise _bad("length_band", "min_length/max_length", "at least one of the two bounds", None)
    for name, value in [("min_length", min_length), ("max_length", max_length)]:
        if value is not None:
            _require_int("length_band", name, value, minimum=0)
    _require_int("length_band", "slack", slack, minimum=0)
    if min_length is not None and max_length is not None and min_length > max_length:
        raise ValueError(
            f"length_band: option 'min_length' ({min_length}) must not exceed 'max_length' "
            f"({max_length})"
        )
    return LengthBand(min_length, max_length, unit, slack)


@dataclass(frozen=True)
class LengthBand:
    min_length: int | None
    max_length: int | None
    unit: str
    slack: int
    __name__ = "length_band"

    def __call__(
        self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any
    ) -> list[float]:
        return [
            self.score(n) for n in _lengths(completions, completion_ids, self.unit, "length_band")
        ]

    def score(self, length: int) -> float:
        below = self.min_length - length if self.min_length is not None else 0
        above = length - self.max_length if self.max_length is not None else 0
        distance = max(below, above, 0)
        if distance == 0:
            return 1.0
        return max(0.0, 1.0 - distance / self.slack) if self.slack else 0.0


def soft_overlong(*, max_completion_len: int, cache_len: int) -> SoftOverlong:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", Eq. 13), lengths in tokens.

    With L = len(completion_ids), L_max = `max_completion_len`, L_cache = `cache_len`:
    0 when L <= L_max - L_cache; (L_max - L_cache - L) / L_cache when L_max - L_cache < L <=
    L_max (a linear ramp from 0 down to -1); -1 when L > L_max. `cache_len=0` is a hard cutoff.
    The same function as TRL's `get_soft_overlong_punishment(max_completion_len,
    soft_punish_cache)`. Use it with a generation limit above `max_completion_len` for the -1
    branch to ever apply.
    """
    _require_int("soft_overlong", "max_completion_len", max_completion_len, minimum=1)
    _require_int("soft_overlong", "cache_len", cache_len, minimum=0)
    if cache_len > max_completion_len:
        raise ValueError(
            f"soft_overlong: option 'cache_len' ({cache_len}) must not exceed "
            f"'max_completion_len' ({max_completion_len})"
        )
    return SoftOverlong(max_completion_len, cache_len)


@dataclass(frozen=True)
class SoftOverlong:
    max_completion_len: int
    cache_len: int
    __name__ = "soft_overlong"

    def __call__(
        self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any
    ) -> list[float]:
        return [
            self.score(n) for n in _lengths(completions, completion_ids, "tokens", "soft_overlong")
        ]

    def score(self, length: int) -> float:
        expected = self.max_completion_len - self.cache_len
        if length <= expected:
            return 0.0
        if length <= self.max_completion_len:
            return (expected - length) / self.cache_len
        return -1.0


def _lengths(completions: list, completion_ids: list | None, unit: str, reward: str) -> list[int]:
    if unit == "chars":
        return [len(completion_text(c)) for c in completions]
    if unit == "words":
        return [len(completion_text(c).split()) for c in completions]
    return [len(ids) for ids in _token_ids(completions, completion_ids, reward)]


def _token_ids(completions: list, completion_ids: list | None, reward: str) -> list:
    if completion_ids is None:
        raise ValueError(
            f"{reward}: lengths in tokens need `completion_ids` (the token ids of each "
            "completion, which the trainer passes); pass completion_ids=... when calling it "
            "directly, or count in 'chars' or 'words' where the reward has a `unit` option"
        )
    if len(completion_ids) != len(completions):
        raise ValueError(
            f"{reward}: got {len(completion_ids)} completion_ids for {len(completions)} completions"
        )
    return completion_ids


# ---------------------------------------------------------------------------------------------
# Repetition


def repetition_penalty(
    *, ngram: int = 3, max_penalty: float = -1.0, unit: str = "words"
) -> RepetitionPenalty:
    """(1 - unique n-grams / total n-grams) * `max_penalty`: 0 for no repeats, towards
    `max_penalty` for a completion that loops (Yeo et al. 2025, "Demystifying Long
    Chain-of-Thought Reasoning in LLMs", appendix C.2).

    `unit="words"` counts n-grams of lower-cased whitespace-separated words (as open-r1's
    `get_repetition_penalty_reward`); `unit="tokens"` counts n-grams of `completion_ids` (as
    TRL's). A completion with fewer than `ngram` units scores 0.
    """
    _require_int("repetition_penalty", "ngram", ngram, minimum=1)
    if not (_is_number(max_penalty) and max_penalty <= 0):
        raise _bad("repetition_penalty", "max_penalty", "a number <= 0 (a penalty)", max_penalty)
    if unit not in ("words", "tokens"):
        raise _bad("repetition_penalty", "unit", "'words' or 'tokens'", unit)
    return RepetitionPenalty(ngram, float(max_penalty), unit)


@dataclass(frozen=True)
class RepetitionPenalty:
    ngram: int
    max_penalty: float
    unit: str
    __name__ = "repetition_penalty"

    def __call__(
        self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any
    ) -> list[float]:
        if self.unit == "tokens":
            units = [list(ids) for ids in _token_ids(completions, completion_ids, self.__name__)]
        else:
            units = [completion_text(c).lower().split() for c in completions]
        return [self.score(u) for u in units]

    def score(self, units: Sequence) -> float:
        total = len(units) - self.ngram + 1
        if total <= 0:
            return 0.0
        unique = len({tuple(units[i : i + self.ngram]) for i in range(total)})
        repeated = 1.0 - unique / total
        return repeated * self.max_penalty if repeated else 0.0


# ---------------------------------------------------------------------------------------------
# Keywords


def keywords(
    *,
    required: Sequence[str] = (),
    forbidden: Sequence[str] = (),
    case_sensitive: bool = False,
    whole_words: bool = False,
    mode: str = "fraction",
) -> Keywords:
    """Score keyword presence: each `required` word should appear, each `forbidden` one not.

    `mode="fraction"`: the fraction of keywords that behave (required present, forbidden
    absent); `mode="all"`: 1.0 when all do, else 0.0. `whole_words` matches at word boundaries
    only ("cat" does not match "category").
    """
    for name, value in [("required", required), ("forbidden", forbidden)]:
        if not (_is_string_list(value) and all(value)):
            raise _bad("keywords", name, "a list of non-empty strings", value)
    if not required and not forbidden:
        raise _bad("keywords", "required/forbidden", "at least one keyword", None)
    _require_bool("keywords", "case_sensitive", case_sensitive)
    _require_bool("keywords", "whole_words", whole_words)
    if mode not in ("fraction", "all"):
        raise _bad("keywords", "mode", "'fraction' or 'all'", mode)
    flags = 0 if case_sensitive else re.IGNORECASE

    def compile_all(words: Sequence[str]) -> tuple[re.Pattern, ...]:
        edge = r"\b" if whole_words else ""
        return tuple(re.compile(edge + re.escape(w) + edge, flags) for w in words)

    return Keywords(compile_all(required), compile_all(forbidden), mode == "all")


@dataclass(frozen=True)
class Keywords:
    required: tuple[re.Pattern, ...]
    forbidden: tuple[re.Pattern, ...]
    all_or_nothing: bool
    __name__ = "keywords"

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return [self.score(completion_text(c)) for c in completions]

    def score(self, text: str) -> float:
        good = [bool(p.search(text)) for p in self.required]
        good += [not p.search(text) for p in self.forbidden]
        if self.all_or_nothing:
            return 1.0 if all(good) else 0.0
        return sum(good) / len(good)


# ---------------------------------------------------------------------------------------------
# Option checks


def _bad(reward: str, option: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"{reward}: option {option!r} must be {expected}, got {got!r}")


def _require_bool(reward: str, option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _bad(reward, option, "true or false", value)


def _require_int(reward: str, option: str, value: Any, minimum: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise _bad(reward, option, f"an integer >= {minimum}", value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_string_list(value: Any) -> bool:
    """A list or tuple of strings (a bare string is refused: it would be read letter by letter)."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
