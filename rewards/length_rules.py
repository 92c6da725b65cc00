"""Rule rewards on a completion's length and repetition: `length_band`, `soft_overlong` (DAPO) and
`repetition_penalty`.

Factories like those of `rewards/rules.py` (which re-exports them): options in, a reward with
TRL's signature `fn(prompts, completions, completion_ids=None, **columns)` out. Lengths in
tokens come from `completion_ids`, which trainers pass as TRL's do.

Test: `pytest tests/test_rewards_rules.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rewards.rule_options import bad, is_number, require_int
from rewards.text import completion_text

UNITS = ("tokens", "chars", "words")


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
        raise bad("length_band", "unit", f"one of {list(UNITS)}", unit)
    if min_length is None and max_length is None:
        raise bad("length_band", "min_length/max_length", "at least one of the two bounds", None)
    for name, value in [("min_length", min_length), ("max_length", max_length)]:
        if value is not None:
            require_int("length_band", name, value, minimum=0)
    require_int("length_band", "slack", slack, minimum=0)
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
    require_int("soft_overlong", "max_completion_len", max_completion_len, minimum=1)
    require_int("soft_overlong", "cache_len", cache_len, minimum=0)
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
    require_int("repetition_penalty", "ngram", ngram, minimum=1)
    if not (is_number(max_penalty) and max_penalty <= 0):
        raise bad("repetition_penalty", "max_penalty", "a number <= 0 (a penalty)", max_penalty)
    if unit not in ("words", "tokens"):
        raise bad("repetition_penalty", "unit", "'words' or 'tokens'", unit)
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
