"""Pairwise LLM judge with swap-debiasing: the pair labeller of online DPO and an evaluator.

Each pair is judged twice, as (A=a, B=b) and as (A=b, B=a). The verdict stands when both
orders agree; otherwise it is a tie and the pair is marked inconsistent. This is swap
augmentation against position bias (JudgeLM, Zhu et al. 2023, sec. 4) and MT-Bench's rule of
counting an inconsistent pair as a tie (Zheng et al. 2023, sec. 3.4). A judge that always
prefers the first answer thus yields only ties, with position consistency 0.

    judge = pairwise_judge(base_url="http://127.0.0.1:8000/v1", model="judge")
    verdicts = judge.compare(prompts, policy_answers, baseline_answers)
    pair_metrics(verdicts)  # {"judge/win_rate": ..., "judge/tie_rate": ..., ...}

Test: `pytest tests/test_judge.py -k pair`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rewards import judge_prompts as jp
from rewards.judge_client import (
    JudgeClient,
    JudgeEndpoint,
    JudgeRequest,
    open_endpoint,
    raise_first,
)
from rewards.text import completion_text, prompt_text


@dataclass(frozen=True)
class PairVerdict:
    """One pair judged in both orders. `raw_*` are the judge's own letters in each order."""

    winner: Literal["a", "b", "tie"]
    """After swap-debiasing: the completion both orders preferred, else "tie"."""
    consistent: bool
    """Both orders named the same completion (or both a tie)."""
    raw_ab: str
    """"A", "B" or "tie" with completion a shown first."""
    raw_ba: str
    """"A", "B" or "tie" with completion b shown first ("A" then means b)."""
    rationale_ab: str
    rationale_ba: str


class PairwiseJudge:
    """Picks the better of two completions of a prompt, asking in both orders."""

    def __init__(
        self,
        endpoint: JudgeEndpoint,
        *,
        criteria: str = jp.DEFAULT_CRITERIA,
        allow_tie: bool = True,
        rationale_max_chars: int | None = 400,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.criteria = jp.check_criteria(criteria)
        self.allow_tie = bool(allow_tie)
        self.rationale_max_chars = jp.check_max_chars(rationale_max_chars)
        self.client = JudgeClient(endpoint, cache_dir)
        self._schema = jp.pairwise_schema(self.rationale_max_chars, self.allow_tie)
        self._check = jp.pairwise_check(self.allow_tie)

    def __repr__(self) -> str:
        return f"PairwiseJudge({self.client!r}, criteria={self.criteria!r})"

    @property
    def stats(self) -> dict[str, int]:
        """The client's counts: requests, cache_hits, retries, invalid_answers."""
        return self.client.stats

    def compare(
        self,
        prompts: Sequence,
        completions_a: Sequence,
        completions_b: Sequence,
        references: Sequence | None = None,
    ) -> list[PairVerdict]:
        """One debiased verdict per pair (two requests each); raises JudgeError on a failure."""
        references = jp.aligned_references(prompts, completions_a, references)
        if len(completions_b) != len(completions_a):
            raise ValueError(
                f"got {len(completions_a)} completions_a but {len(completions_b)} completions_b"
            )
        requests = []
        for p, a, b, r in zip(prompts, completions_a, completions_b, references, strict=True):
            p, a, b = prompt_text(p), completion_text(a), completion_text(b)
            for first, second in ((a, b), (b, a)):
                messages = jp.pairwise_messages(self.criteria, p, first, second, r, self.allow_tie)
                requests.append(
                    JudgeRequest(
                        messages,
                        "pairwise_verdict",
                        self._schema,
                        self._check,
                        jp.answer_tokens(self.rationale_max_chars),
                    )
                )
        answers = raise_first(self.client.ask_all(requests), per_sample=2)
        return [debias(ab, ba) for ab, ba in zip(answers[::2], answers[1::2], strict=True)]

    def close(self) -> None:
        self.client.close()


def debias(ab: Mapping[str, str], ba: Mapping[str, str]) -> PairVerdict:
    """Combine the verdict with a shown first (`ab`) and the one with b shown first (`ba`)."""
    first = {"A": "a", "B": "b", "tie": "tie"}[ab["winner"]]
    second = {"A": "b", "B": "a", "tie": "tie"}[ba["winner"]]
    consistent = first == second
    return PairVerdict(
        winner=first if consistent else "tie",  # type: ignore[arg-type]
        consistent=consistent,
        raw_ab=ab["winner"],
        raw_ba=ba["winner"],
        rationale_ab=ab["rationale"],
        rationale_ba=ba["rationale"],
    )


def position_consistency(verdicts: Sequence[PairVerdict]) -> float:
    """Fraction of pairs whose two orders agree (1.0: no sign of position bias)."""
    if not verdicts:
        raise ValueError("position_consistency needs at least one verdict")
    return sum(v.consistent for v in verdicts) / len(verdicts)


def win_rate(verdicts: Sequence[PairVerdict]) -> float:
    """Share of pairs won by completion a, a tie counting one half (AlpacaEval's convention)."""
    if not verdicts:
        raise ValueError("win_rate needs at least one verdict")
    return sum({"a": 1.0, "tie": 0.5, "b": 0.0}[v.winner] for v in verdicts) / len(verdicts)


def pair_metrics(verdicts: Sequence[PairVerdict], prefix: str = "judge") -> dict[str, float]:
    """`{prefix}/win_rate`, `/tie_rate` and `/position_consistency`, for a tracker."""
    return {
        f"{prefix}/win_rate": win_rate(verdicts),
        f"{prefix}/tie_rate": sum(v.winner == "tie" for v in verdicts) / len(verdicts),
        f"{prefix}/position_consistency": position_consistency(verdicts),
    }


def pairwise_judge(
    *,
    base_url: str,
    model: str,
    api_key_env: str | None = None,
    criteria: str = jp.DEFAULT_CRITERIA,
    allow_tie: bool = True,
    rationale_max_chars: int | None = 400,
    cache_dir: str | None = None,
    max_concurrent: int = 8,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    extra_body: Mapping[str, Any] | None = None,
) -> PairwiseJudge:
    """A `PairwiseJudge` from config options; an unset key variable or an unreachable server
    fails here, at start-up."""
    endpoint = open_endpoint(
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_concurrent=max_concurrent,
        temperature=temperature,
        max_tokens=max_tokens,
        extra_body=extra_body,
    )
    return PairwiseJudge(
        endpoint,
        criteria=criteria,
        allow_tie=allow_tie,
        rationale_max_chars=rationale_max_chars,
        cache_dir=cache_dir,
    )
