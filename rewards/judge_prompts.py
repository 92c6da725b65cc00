"""What the LLM judge is asked: prompts, output schemas and answer checks.

Pointwise: the judge rates one response on an integer scale, rationale first (so the score
follows the reasoning, as in CodeUltraFeedback's criteria-with-feedback and MT-Bench's single
answer grading). Pairwise: the judge names the better of two responses, A or B, or a tie
(MT-Bench / JudgeLM pairwise format); `rewards.judge` asks in both orders to cancel position
bias. Either may be given a reference answer known to be correct (reference-based grading) or
none (reference-free).

Schemas use only `type`, `enum`, `required`, `additionalProperties` and, when asked for,
`maxLength` on the rationale: the subset OpenAI's strict mode and vLLM's grammar backends both
take (set `rationale_max_chars: null` for a provider that rejects `maxLength`). Answers are
checked here too, since an endpoint may ignore the schema.

Test: `pytest tests/test_judge.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_CRITERIA = "helpfulness, correctness and clarity"
POINTWISE_SYSTEM = (
    "You are an impartial judge. Rate the response to the user's question for: {criteria}. "
    "{reference_note}Write a brief rationale first, then the score: an integer from {low} "
    "(worst) to {high} (best). Answer with a JSON object with the keys "
    '"rationale" and "score".'
)
PAIRWISE_SYSTEM = (
    "You are an impartial judge. Compare two responses, A and B, to the user's question for: "
    "{criteria}. {reference_note}Do not let the order of the responses or their length sway "
    'you. Write a brief rationale first, then the winner: "A", "B" or "tie". Answer with a '
    'JSON object with the keys "rationale" and "winner".'
)
PAIRWISE_SYSTEM_NO_TIE = PAIRWISE_SYSTEM.replace('"A", "B" or "tie"', '"A" or "B"')
REFERENCE_NOTE = "A reference answer, known to be correct, is given: compare with it. "

TOKENS_PER_CHAR = 4
"""Worst case of a byte-level BPE tokenizer (a 4-byte character as 4 tokens)."""
VERDICT_TOKENS = 64
"""Tokens for the JSON around the rationale and the verdict itself."""


def section(title: str, text: str) -> str:
    """`[Title]`, the text, `[End of title]`: unambiguous bounds around free text."""
    return f"[{title}]\n{text}\n[End of {title.lower()}]"


def pointwise_messages(
    criteria: str, scale: tuple[int, int], prompt: str, completion: str, reference: str | None
) -> list[dict[str, str]]:
    note = REFERENCE_NOTE if reference is not None else ""
    system = POINTWISE_SYSTEM.format(
        criteria=criteria, reference_note=note, low=scale[0], high=scale[1]
    )
    parts = [section("Question", prompt)]
    if reference is not None:
        parts.append(section("Reference answer", reference))
    parts.append(section("Response", completion))
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def pairwise_messages(
    criteria: str, prompt: str, first: str, second: str, reference: str | None, allow_tie: bool
) -> list[dict[str, str]]:
    """The judge sees `first` as response A and `second` as response B."""
    note = REFERENCE_NOTE if reference is not None else ""
    template = PAIRWISE_SYSTEM if allow_tie else PAIRWISE_SYSTEM_NO_TIE
    system = template.format(criteria=criteria, reference_note=note)
    parts = [section("Question", prompt)]
    if reference is not None:
        parts.append(section("Reference answer", reference))
    parts += [section("Response A", first), section("Response B", second)]
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def _rationale(max_chars: int | None) -> dict[str, Any]:
    return {"type": "string"} if max_chars is None else {"type": "string", "maxLength": max_chars}


def pointwise_schema(scale: tuple[int, int], max_chars: int | None) -> dict[str, Any]:
    """`{"rationale": str, "score": int in [low, high]}`, rationale first."""
    return {
        "type": "object",
        "properties": {
            "rationale": _rationale(max_chars),
            "score": {"type": "integer", "enum": list(range(scale[0], scale[1] + 1))},
        },
        "required": ["rationale", "score"],
        "additionalProperties": False,
    }


def pairwise_schema(max_chars: int | None, allow_tie: bool) -> dict[str, Any]:
    """`{"rationale": str, "winner": "A" | "B" | "tie"}`, rationale first."""
    winners = ["A", "B", "tie"] if allow_tie else ["A", "B"]
    return {
        "type": "object",
        "properties": {
            "rationale": _rationale(max_chars),
            "winner": {"type": "string", "enum": winners},
        },
        "required": ["rationale", "winner"],
        "additionalProperties": False,
    }


def answer_tokens(max_chars: int | None) -> int:
    """max_tokens that always fits a rationale of `max_chars` characters and the verdict."""
    return 1024 if max_chars is None else TOKENS_PER_CHAR * max_chars + VERDICT_TOKENS


def pointwise_check(scale: tuple[int, int]) -> Callable[[Any], dict[str, Any]]:
    """Parsed answer -> `{"score": int, "rationale": str}`; ValueError naming the bad key."""
    low, high = scale

    def check(answer: Any) -> dict[str, Any]:
        rationale = _object_with_rationale(answer)
        score = answer.get("score")
        if isinstance(score, float) and score.is_integer():
            score = int(score)
        if isinstance(score, bool) or not isinstance(score, int) or not low <= score <= high:
            raise ValueError(f"'score' must be an integer from {low} to {high}, got {score!r}")
        return {"score": score, "rationale": rationale}

    return check


def pairwise_check(allow_tie: bool) -> Callable[[Any], dict[str, Any]]:
    """Parsed answer -> `{"winner": "A" | "B" | "tie", "rationale": str}`."""
    winners = ("A", "B", "tie") if allow_tie else ("A", "B")

    def check(answer: Any) -> dict[str, Any]:
        rationale = _object_with_rationale(answer)
        winner = answer.get("winner")
        if winner not in winners:
            raise ValueError(f"'winner' must be one of {list(winners)}, got {winner!r}")
        return {"winner": winner, "rationale": rationale}

    return check


def _object_with_rationale(answer: Any) -> str:
    if not isinstance(answer, dict):
        raise ValueError(f"expected a JSON object, got {type(answer).__name__}: {answer!r:.80}")
    rationale = answer.get("rationale")
    if not isinstance(rationale, str):
        raise ValueError(f"'rationale' must be a string, got {rationale!r:.80}")
    return rationale


# -- option and input checks shared by the judges ---------------------------------------------


def check_criteria(criteria: str) -> str:
    if not isinstance(criteria, str) or not criteria.strip():
        raise ValueError(f"criteria must be a non-empty string, got {criteria!r}")
    return criteria.strip()


def check_scale(scale: Sequence[int]) -> tuple[int, int]:
    ok = (
        isinstance(scale, (list, tuple))
        and len(scale) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in scale)
        and scale[0] < scale[1]
    )
    if not ok:
        raise ValueError(f"scale must be two integers [low, high] with low < high, got {scale!r}")
    return int(scale[0]), int(scale[1])


def check_max_chars(max_chars: int | None) -> int | None:
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1
    ):
        raise ValueError(
            f"rationale_max_chars must be a positive integer or null, got {max_chars!r}"
        )
    return max_chars


def aligned_references(
    prompts: Sequence, completions: Sequence, references: Sequence | None
) -> list[str | None]:
    """One reference (text or None) per prompt; ValueError when the lengths differ."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
    if references is None:
        return [None] * len(prompts)
    if len(references) != len(prompts):
        raise ValueError(f"got {len(references)} references for {len(prompts)} prompts")
    return [None if r is None else str(r) for r in references]
