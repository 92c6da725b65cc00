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

The length and repetition rules live in `rewards/length_rules.py` and are re-exported here.

Test: `pytest tests/test_rewards_rules.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rewards.length_rules import length_band, repetition_penalty, soft_overlong
from rewards.rule_options import bad, is_string_list, require_bool
from rewards.text import completion_text

__all__ = [
    "format_regex",
    "required_tags",
    "keywords",
    "length_band",
    "soft_overlong",
    "repetition_penalty",
]

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
        raise bad("format_regex", "pattern", "a non-empty regular expression string", pattern)
    if not (isinstance(flags, str) and set(flags) <= set(REGEX_FLAGS)):
        raise bad(
            "format_regex", "flags", f"a string of the letters {''.join(REGEX_FLAGS)!r}", flags
        )
    require_bool("format_regex", "full_match", full_match)
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
    if not (is_string_list(tags) and len(tags) > 0 and all(TAG_NAME.fullmatch(t) for t in tags)):
        raise bad(
            "required_tags",
            "tags",
            "a non-empty list of tag names such as ['think', 'answer']",
            tags,
        )
    if len(set(tags)) != len(tags):
        raise bad("required_tags", "tags", "distinct tag names", tags)
    for name, value in [
        ("in_order", in_order),
        ("exactly_once", exactly_once),
        ("allow_text_outside", allow_text_outside),
        ("partial", partial),
    ]:
        require_bool("required_tags", name, value)
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
        if not (is_string_list(value) and all(value)):
            raise bad("keywords", name, "a list of non-empty strings", value)
    if not required and not forbidden:
        raise bad("keywords", "required/forbidden", "at least one keyword", None)
    require_bool("keywords", "case_sensitive", case_sensitive)
    require_bool("keywords", "whole_words", whole_words)
    if mode not in ("fraction", "all"):
        raise bad("keywords", "mode", "'fraction' or 'all'", mode)
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
