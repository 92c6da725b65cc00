"""LLM judge over any OpenAI-compatible endpoint: a pointwise reward and a pairwise judge.

    rewards: [{name: judge_score, weight: 0.5, args: {base_url: "http://127.0.0.1:8000/v1",
               model: Qwen/Qwen2.5-7B-Instruct, api_key_env: JUDGE_API_KEY,
               criteria: "correctness and clarity", scale: [1, 10],
               reference_column: answer, cache_dir: runs/x/judge_cache}}]

- `judge_score` (a reward factory): the judge rates each completion on `scale` with a short
  rationale, rationale first (CodeUltraFeedback's criteria with scores and feedback; MT-Bench's
  single-answer grading); the reward is the score mapped to [0, 1] with the rationale as
  feedback. Reference-based when `reference_column` names a dataset column (rows where it is
  None are not scored), reference-free otherwise.
- `PairwiseJudge` / `pairwise_judge` (in `rewards.judge_pairwise`, re-exported here): A/B in
  both orders with a position-consistency flag, for evaluation win rates and online DPO pairs.

Pieces: `rewards.judge_client` (endpoint, API key from a named variable, concurrency, retries,
timeouts), `rewards.judge_cache` (verdicts on disk), `rewards.judge_prompts` (prompts, output
schemas, answer checks). A judge used as a reward should not be the only metric of that run:
judges can be gamed ("Dissecting Human and LLM Preferences", Li et al. 2024).

Test: `pytest tests/test_judge.py` (the `vllm` tests start a vLLM server of the tiny model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards import judge_prompts as jp
from rewards.judge_client import (
    JudgeClient,
    JudgeConfigError,
    JudgeEndpoint,
    JudgeError,
    JudgeRequest,
    check_reachable,
    open_endpoint,
    raise_first,
)
from rewards.judge_pairwise import (
    PairVerdict,
    PairwiseJudge,
    pair_metrics,
    pairwise_judge,
    position_consistency,
    win_rate,
)
from rewards.text import completion_text, prompt_text
from rewards.types import Failed, Scored

__all__ = [
    "JudgeConfigError",
    "JudgeEndpoint",
    "JudgeError",
    "PairVerdict",
    "PairwiseJudge",
    "PointVerdict",
    "PointwiseJudge",
    "judge_score",
    "pair_metrics",
    "pairwise_judge",
    "position_consistency",
    "win_rate",
]

_RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")


@dataclass(frozen=True)
class PointVerdict:
    """One pointwise judgement: the integer `score`, it mapped to [0, 1], and why."""

    score: int
    normalised: float
    rationale: str


class PointwiseJudge:
    """Rates each (prompt, completion) on an integer scale, with a rationale."""

    def __init__(
        self,
        endpoint: JudgeEndpoint,
        *,
        criteria: str = jp.DEFAULT_CRITERIA,
        scale: Sequence[int] = (1, 10),
        rationale_max_chars: int | None = 400,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.criteria = jp.check_criteria(criteria)
        self.scale = jp.check_scale(scale)
        self.rationale_max_chars = jp.check_max_chars(rationale_max_chars)
        self.client = JudgeClient(endpoint, cache_dir)
        self._schema = jp.pointwise_schema(self.scale, self.rationale_max_chars)
        self._check = jp.pointwise_check(self.scale)

    def __repr__(self) -> str:
        return f"PointwiseJudge({self.client!r}, criteria={self.criteria!r}, scale={self.scale})"

    @property
    def stats(self) -> dict[str, int]:
        """The client's counts: requests, cache_hits, retries, invalid_answers."""
        return self.client.stats

    def score(
        self, prompts: Sequence, completions: Sequence, references: Sequence | None = None
    ) -> list[PointVerdict]:
        """One verdict per completion; raises JudgeError naming the first that failed."""
        return raise_first(self.score_each(prompts, completions, references))

    def score_each(
        self, prompts: Sequence, completions: Sequence, references: Sequence | None = None
    ) -> list[PointVerdict | JudgeError]:
        """Like `score`, with a failed request's error in its place instead of raised."""
        references = jp.aligned_references(prompts, completions, references)
        requests = [
            JudgeRequest(
                jp.pointwise_messages(
                    self.criteria, self.scale, prompt_text(p), completion_text(c), r
                ),
                "pointwise_verdict",
                self._schema,
                self._check,
                jp.answer_tokens(self.rationale_max_chars),
            )
            for p, c, r in zip(prompts, completions, references, strict=True)
        ]
        low, high = self.scale
        return [
            v
            if isinstance(v, JudgeError)
            else PointVerdict(v["score"], (v["score"] - low) / (high - low), v["rationale"])
            for v in self.client.ask_all(requests)
        ]

    def close(self) -> None:
        self.client.close()


def judge_score(
    *,
    base_url: str,
    model: str,
    api_key_env: str | None = None,
    criteria: str = jp.DEFAULT_CRITERIA,
    scale: Sequence[int] = (1, 10),
    reference_column: str | None = None,
    rationale_max_chars: int | None = 400,
    cache_dir: str | None = None,
    max_concurrent: int = 8,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    extra_body: Mapping[str, Any] | None = None,
    check_endpoint: bool = True,
) -> Callable:
    """A reward: the judge's score of each completion mapped to [0, 1], rationale as feedback.

    A request that still fails after its retries gives `Failed` for that completion (the
    rubric counts it); an unset key variable or an HTTP 401/403/404 raises, since every
    request would fail alike. The key variable is checked here, at start-up, and so is the
    endpoint (`GET {base_url}/models` must answer and, when it lists models, list `model`)
    unless `check_endpoint` is false (e.g. scoring from a warm cache).
    """
    if reference_column is not None and (
        not isinstance(reference_column, str)
        or not reference_column.isidentifier()
        or reference_column in _RESERVED_COLUMNS
    ):
        raise ValueError(
            f"reference_column must name a dataset column (an identifier other than "
            f"{', '.join(_RESERVED_COLUMNS)}), got {reference_column!r}"
        )
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
        check=False,  # reachability is checked once the options are known to be valid
    )
    judge = PointwiseJudge(
        endpoint,
        criteria=criteria,
        scale=scale,
        rationale_max_chars=rationale_max_chars,
        cache_dir=cache_dir,
    )
    if check_endpoint:
        check_reachable(endpoint)

    def reward(prompts: list, completions: list, **columns: Any) -> list[Scored | Failed | None]:
        references = None
        if reference_column is not None:
            if reference_column not in columns:
                raise ValueError(
                    f"judge_score: reference_column {reference_column!r} is not among the "
                    f"columns passed: {sorted(columns)}"
                )
            references = columns[reference_column]
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        applies = [references is None or r is not None for r in references or completions]
        rows = [i for i, yes in enumerate(applies) if yes]
        verdicts = iter(
            judge.score_each(
                [prompts[i] for i in rows],
                [completions[i] for i in rows],
                None if references is None else [references[i] for i in rows],
            )
        )
        out: list[Scored | Failed | None] = []
        for yes in applies:
            v = next(verdicts) if yes else None
            if v is None:
                out.append(None)  # no reference for this row: the judge does not apply
            elif isinstance(v, JudgeError):
                out.append(Failed(str(v)))
            else:
                out.append(Scored(v.normalised, v.rationale))
        return out

    reward.__name__ = reward.__qualname__ = "judge_score"
    reward.judge = judge  # type: ignore[attr-defined]
    if reference_column is not None:  # lets the rubric check the column at start-up
        P = inspect.Parameter
        reward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                P("prompts", P.POSITIONAL_OR_KEYWORD),
                P("completions", P.POSITIONAL_OR_KEYWORD),
                P(reference_column, P.KEYWORD_ONLY),
                P("columns", P.VAR_KEYWORD),
            ]
        )
    return reward
