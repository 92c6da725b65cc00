"""Rubric composition: gates, timeouts, concurrency, feedback, the error policy, `@per_sample`.

Run: `pytest tests/test_rubric_composition.py`.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from rewards import Failed, RewardError, RewardTerm, Rubric, Scored, per_sample

PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
COMPLETIONS = ["2", "5", "6", "x"]
ANSWERS = ["2", "4", "6", "8"]


def correct(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


class Recorder:
    """A reward that records which completions it was asked to score."""

    def __init__(self, value: float = 0.5) -> None:
        self.seen: list[list[str]] = []
        self.value = value

    def __call__(self, prompts, completions, **kwargs):
        self.seen.append(list(completions))
        return [self.value] * len(completions)


# ---------------------------------------------------------------------------------------------
# Gates


def test_gated_term_is_scored_only_where_the_gate_passes():
    judge = Recorder(0.5)
    rubric = Rubric(
        [RewardTerm("correct", correct), RewardTerm("judge", judge, 2.0, gate="correct")],
        columns=["answer"],
    )
    scores = rubric.score(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert judge.seen == [["2", "6"]]  # only the verified completions reach the judge
    assert scores.components["judge"] == [0.5, None, 0.5, None]
    assert scores.total == [1.0 + 2 * 0.5, 0.0, 1.0 + 2 * 0.5, 0.0]


def test_gate_min_threshold():
    def graded(prompts, completions, **kwargs):
        return [0.2, 0.5, 0.9, None]

    judge = Recorder(1.0)
    rubric = Rubric(
        [
            RewardTerm("graded", graded, 0.0),
            RewardTerm("judge", judge, gate="graded", gate_min=0.5),
        ]
    )
    scores = rubric.score(PROMPTS, COMPLETIONS)
    assert scores.components["judge"] == [None, 1.0, 1.0, None]  # None never passes a gate
    assert scores.total == [0.0, 1.0, 1.0, 0.0]


def test_gate_nobody_passes_means_the_gated_reward_is_not_called():
    judge = Recorder()
    rubric = Rubric(
        [RewardTerm("correct", correct), RewardTerm("judge", judge, gate="correct")],
        columns=["answer"],
    )
    scores = rubric.score(["p"], ["wrong"], {"answer": ["right"]})
    assert judge.seen == [] and scores.components["judge"] == [None]


def test_chained_gates_run_in_order():
    order: list[str] = []

    def step(name, value):
        def fn(prompts, completions, **kwargs):
            order.append(name)
            return [value] * len(completions)

        return fn

    rubric = Rubric(
        [
            RewardTerm("c", step("c", 1.0), gate="b"),
            RewardTerm("b", step("b", 1.0), gate="a"),
            RewardTerm("a", step("a", 1.0)),
        ]
    )
    assert rubric.score(["p"], ["x"]).total == [3.0]
    assert order == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        ([RewardTerm("j", Recorder(), gate="verifier")], "gated on 'verifier', which is not"),
        (
            [RewardTerm("a", Recorder(), gate="b"), RewardTerm("b", Recorder(), gate="a")],
            "reward gates form a cycle: a -> b -> a",
        ),
        ([RewardTerm("a", Recorder(), gate="a")], "cycle: a -> a"),
    ],
)
def test_bad_gates_fail_when_the_rubric_is_built(terms, message):
    with pytest.raises(ValueError, match=message):
        Rubric(terms)


# ---------------------------------------------------------------------------------------------
# Concurrency and timeouts


def test_async_rewards_run_concurrently():
    # Each waits for the other to start: run one after the other, they would time out.
    started: dict[str, asyncio.Event] = {}

    def waiting_for(me: str, other: str):
        async def fn(prompts, completions, **kwargs):
            started.setdefault(me, asyncio.Event()).set()
            other_event = started.setdefault(other, asyncio.Event())
            await asyncio.wait_for(other_event.wait(), 5)
            return [1.0] * len(completions)

        return fn

    rubric = Rubric(
        [RewardTerm("a", waiting_for("a", "b")), RewardTerm("b", waiting_for("b", "a"))]
    )
    assert rubric.score(["p"], ["c"]).total == [2.0]


def test_plain_rewards_run_in_the_calling_thread():
    # Libraries such as math-verify install signal handlers, which only the main thread may do.
    def uses_signals(prompts, completions, **kwargs):
        previous = signal.signal(signal.SIGALRM, signal.SIG_IGN)
        signal.signal(signal.SIGALRM, previous)
        return [float(threading.current_thread() is threading.main_thread())] * len(completions)

    assert Rubric([RewardTerm("s", uses_signals)]).score(["p"], ["c"]).total == [1.0]


def test_slow_reward_times_out_and_names_itself():
    blocker = threading.Event()

    def slow(prompts, completions, **kwargs):
        blocker.wait(10)
        return [1.0] * len(completions)

    async def slow_async(prompts, completions, **kwargs):
        await asyncio.sleep(10)
        return [1.0] * len(completions)

    try:
        for fn in (slow, slow_async):
            rubric = Rubric([RewardTerm("slow", fn, timeout=0.2)])
            with pytest.raises(RewardError, match=r"reward 'slow' timed out after 0.2 s"):
                rubric.score(["p"], ["c"])
    finally:
        blocker.set()


def test_timed_reward_within_its_limit_scores_normally():
    rubric = Rubric([RewardTerm("fast", Recorder(0.25), timeout=5.0)])
    assert rubric.score(["p", "q"], ["a", "b"]).components["fast"] == [0.25, 0.25]


# ---------------------------------------------------------------------------------------------
# Feedback


def test_scored_values_carry_feedback():
    def with_notes(prompts, completions, **kwargs):
        return [Scored(1.0, "all tests passed"), Scored(0.0, "AssertionError: 1 != 2"), 0.5, None]

    scores = Rubric([RewardTerm("tests", with_notes)]).score(PROMPTS, COMPLETIONS)
    assert scores.components["tests"] == [1.0, 0.0, 0.5, None]
    assert scores.feedback == {"tests": ["all tests passed", "AssertionError: 1 != 2", None, None]}
    assert scores.total == [1.0, 0.0, 0.5, 0.0]


def test_no_feedback_means_no_feedback_entry():
    scores = Rubric([RewardTerm("r", Recorder())]).score(["p"], ["c"])
    assert scores.feedback == {}


# ---------------------------------------------------------------------------------------------
# Error policy


@per_sample
def picky(prompt, completion):
    if completion == "x":
        raise ValueError("cannot read 'x'")
    return float(len(completion))


def test_per_sample_failure_raises_by_default():
    with pytest.raises(RewardError, match=r"'picky' failed on completion 3: ValueError: cannot"):
        Rubric([RewardTerm("picky", picky)]).score(PROMPTS, COMPLETIONS)


def test_count_policy_keeps_the_other_samples_and_counts_the_failure():
    rubric = Rubric(
        [RewardTerm("picky", picky), RewardTerm("r", Recorder(1.0))],
        on_error="count",
        max_error_rate=0.5,
    )
    scores = rubric.score(PROMPTS, COMPLETIONS)
    assert scores.components["picky"] == [1.0, 1.0, 1.0, None]
    assert scores.total == [2.0, 2.0, 2.0, 1.0]  # the failed sample keeps its other rewards
    assert scores.errors == {"picky": 1, "r": 0}
    metrics = scores.metrics()
    assert metrics["reward/picky/errors"] == 1.0 and metrics["reward/r/errors"] == 0.0


def test_count_policy_stops_past_the_error_rate_over_all_samples_seen():
    rubric = Rubric([RewardTerm("picky", picky)], on_error="count", max_error_rate=0.2)
    rubric.score(PROMPTS[:3], COMPLETIONS[:3])  # 0 of 3
    rubric.score(PROMPTS[:3], COMPLETIONS[:3])  # 0 of 6
    rubric.score(PROMPTS, COMPLETIONS)  # 1 of 10: 10% <= 20%
    with pytest.raises(RewardError, match=r"failed on 3 of 14 samples so far \(21.4%\), above"):
        rubric.score(["p"] * 4, ["x", "x", "ok", "ok"])  # 3 of 14


def test_a_whole_call_failure_counts_every_sample():
    def broken(prompts, completions, **kwargs):
        raise ConnectionError("judge down")

    rubric = Rubric(
        [RewardTerm("judge", broken), RewardTerm("r", Recorder(1.0))],
        on_error="count",
        max_error_rate=1.0,
    )
    scores = rubric.score(PROMPTS, COMPLETIONS)
    assert scores.components["judge"] == [None] * 4
    assert scores.errors["judge"] == 4 and scores.total == [1.0] * 4
    rubric = Rubric([RewardTerm("judge", broken)], on_error="count", max_error_rate=0.5)
    with pytest.raises(RewardError, match="last error: raised ConnectionError: judge down"):
        rubric.score(PROMPTS, COMPLETIONS)


def test_failed_marker_can_be_returned_directly():
    def partial(prompts, completions, **kwargs):
        return [1.0, Failed("endpoint returned 503")]

    with pytest.raises(RewardError, match="failed on completion 1: endpoint returned 503"):
        Rubric([RewardTerm("p", partial)]).score(["a", "b"], ["c", "d"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_error": "ignore"}, "on_error must be 'raise' or 'count'"),
        ({"max_error_rate": 1.5}, r"max_error_rate must be in \[0, 1\]"),
    ],
)
def test_bad_policy_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rubric([RewardTerm("r", Recorder())], **kwargs)


# ---------------------------------------------------------------------------------------------
# @per_sample


@per_sample
def matches(prompt, completion, answer):
    return 1.0 if completion.strip() == str(answer) else 0.0


def test_per_sample_gets_one_row_at_a_time_and_conversation_text():
    scores = Rubric([RewardTerm("m", matches)], columns=["answer"]).score(
        PROMPTS,
        ["2", [{"role": "assistant", "content": " 4 "}], "7", "8"],
        {"answer": ANSWERS},
    )
    assert scores.components["m"] == [1.0, 1.0, 0.0, 1.0]


def test_per_sample_signature_is_checked_against_columns():
    with pytest.raises(TypeError, match=r"'m' needs column\(s\) \['answer'\]"):
        Rubric([RewardTerm("m", matches)], columns=["level"])


def test_per_sample_raw_keeps_conversations():
    @per_sample(raw=True)
    def turns(prompt, completion):
        return float(len(completion))

    conversation = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert turns(prompts=["p"], completions=[conversation]) == [2.0]
