"""Reward tables: `exact_answer` and `Rubric` composition, against scores worked out by hand.

Every reward here is a real function with TRL's signature; nothing is mocked.
Run: `pytest tests/test_rubric.py`.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from rewards import RewardError, RewardTerm, Rubric, Scores, exact_answer

# ---------------------------------------------------------------------------------------------
# Small reward functions used to build rubrics (plain functions, TRL signature).


def correct(prompts, completions, answer, **kwargs):
    """1.0 when the completion is the answer."""
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def length(prompts, completions, **kwargs):
    """The completion's length in characters."""
    return [float(len(c)) for c in completions]


def digits_only(prompts, completions, **kwargs):
    """1.0 for all-digit completions; None (not applicable) for empty ones."""
    return [None if not c else float(c.isdigit()) for c in completions]


def never_applies(prompts, completions, **kwargs):
    return [None for _ in completions]


# ---------------------------------------------------------------------------------------------
# exact_answer


def msg(content: str, role: str = "assistant") -> dict:
    return {"role": role, "content": content}


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("42", "42", 1.0),
        ("  42\n", "42", 1.0),  # surrounding whitespace in the completion is ignored
        ("42", " 42 ", 1.0),  # ... and in the answer
        ("4 2", "42", 0.0),  # inner whitespace is not
        ("42", 42, 1.0),  # numeric answer column
        ("3.5", 3.5, 1.0),
        ("42.0", 42, 0.0),  # compared as text: str(42) == "42"
        ("-7", -7, 1.0),
        ("41", "42", 0.0),
        ("", "42", 0.0),
        ("The answer is 42", "42", 0.0),  # exact, not contained
        ("Paris", "paris", 0.0),  # case matters
        ([msg(" 42 ")], "42", 1.0),  # conversational: last message's content
        ([msg("41")], "42", 0.0),
        ([msg("let me think"), msg("42")], "42", 1.0),
        ([msg("42"), msg("no")], "42", 0.0),  # only the last message counts
        ([], "42", 0.0),  # empty conversation
    ],
)
def test_exact_answer_table(completion, answer, expected):
    scores = exact_answer(prompts=["q"], completions=[completion], answer=[answer])
    assert scores == [expected]
    assert type(scores[0]) is float


def test_exact_answer_scores_a_batch_in_order_and_ignores_other_columns():
    scores = exact_answer(
        prompts=["1+1", "2+2", "3+3"],
        completions=["2", "5", " 6"],
        answer=[2, "4", 6],
        question=["a", "b", "c"],
    )
    assert scores == [1.0, 0.0, 1.0]


def test_exact_answer_rejects_a_short_answer_column():
    with pytest.raises(ValueError):
        exact_answer(prompts=["a", "b"], completions=["1", "2"], answer=["1"])


# ---------------------------------------------------------------------------------------------
# Rubric: weighted totals


PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["12", "abc", "7"]
ANSWERS = ["12", "13", "8"]
# correct:     [1, 0, 0]
# length:      [2, 3, 1]
# digits_only: [1, 0, 1]


@pytest.mark.parametrize(
    ("weights", "expected_total"),
    [
        # (correct, length, digits_only)
        ((1.0, 0.0, 0.0), [1.0, 0.0, 0.0]),
        ((1.0, -0.1, 0.0), [1.0 - 0.2, -0.3, -0.1]),
        ((2.0, 0.5, 1.0), [2.0 + 1.0 + 1.0, 1.5 + 0.0, 0.5 + 1.0]),
        ((0.0, 0.0, 3.0), [3.0, 0.0, 3.0]),
        ((-1.0, 1.0, -1.0), [-1.0 + 2.0 - 1.0, 3.0, 1.0 - 1.0]),
    ],
)
def test_weighted_total_by_hand(weights, expected_total):
    w_correct, w_length, w_digits = weights
    rubric = Rubric(
        [
            RewardTerm("correct", correct, w_correct),
            RewardTerm("length", length, w_length),
            RewardTerm("digits", digits_only, w_digits),
        ],
        columns=["answer"],
    )
    scores = rubric.score(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert scores.total == pytest.approx(expected_total)
    # components are the raw (unweighted) scores, whatever the weights
    assert scores.components == {
        "correct": [1.0, 0.0, 0.0],
        "length": [2.0, 3.0, 1.0],
        "digits": [1.0, 0.0, 1.0],
    }
    assert list(scores.components) == ["correct", "length", "digits"]


def test_default_weight_is_one():
    rubric = Rubric([RewardTerm("length", length)])
    assert rubric.score(PROMPTS, COMPLETIONS).total == [2.0, 3.0, 1.0]


def test_weight_zero_is_logged_but_not_in_total():
    rubric = Rubric(
        [RewardTerm("correct", correct, 1.0), RewardTerm("length", length, 0.0)],
        columns=["answer"],
    )
    scores = rubric.score(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert scores.total == [1.0, 0.0, 0.0]
    assert scores.components["length"] == [2.0, 3.0, 1.0]
    assert scores.metrics() == {
        "reward/total": pytest.approx(1 / 3),
        "reward/correct": pytest.approx(1 / 3),
        "reward/length": pytest.approx(2.0),
    }


def test_weight_zero_component_may_be_not_applicable():
    rubric = Rubric([RewardTerm("length", length), RewardTerm("digits", digits_only, 0.0)])
    scores = rubric.score(["a", "b", "c"], ["1", "", "x"])
    assert scores.total == [1.0, 0.0, 1.0]
    assert scores.components["digits"] == [1.0, None, 0.0]
    assert scores.metrics()["reward/digits"] == pytest.approx(0.5)  # mean of [1, 0]


@pytest.mark.parametrize(
    ("completions", "expected_total", "expected_digits_mean"),
    [
        # length (w=1) + 2 * digits_only; digits_only is None for the empty completion
        (["12", "", "x"], [2.0 + 2.0, 0.0, 1.0 + 0.0], 0.5),
        (["", ""], [0.0, 0.0], None),  # never applies: absent from the metrics
    ],
)
def test_none_is_skipped_in_total_and_component_mean(
    completions, expected_total, expected_digits_mean
):
    rubric = Rubric([RewardTerm("length", length, 1.0), RewardTerm("digits", digits_only, 2.0)])
    scores = rubric.score(["q"] * len(completions), completions)
    assert scores.total == pytest.approx(expected_total)
    assert None in scores.components["digits"]
    metrics = scores.metrics()
    if expected_digits_mean is None:
        assert "reward/digits" not in metrics
    else:
        assert metrics["reward/digits"] == pytest.approx(expected_digits_mean)


# ---------------------------------------------------------------------------------------------
# Scores.metrics


@pytest.mark.parametrize(
    ("scores", "prefix", "expected"),
    [
        (
            Scores(total=[1.0, 3.0], components={"a": [1.0, 3.0]}),
            "reward",
            {"reward/total": 2.0, "reward/a": 2.0},
        ),
        (
            Scores(total=[0.5, 1.5, 1.0], components={"a": [1.0, None, 0.0], "b": [None] * 3}),
            "train/reward",
            # a: mean over the two samples where it applies; b never applies: no key
            {"train/reward/total": 1.0, "train/reward/a": 0.5},
        ),
        (
            Scores(total=[2.0], components={"x": [-4.0], "y": [0.25]}),
            "eval/reward",
            {"eval/reward/total": 2.0, "eval/reward/x": -4.0, "eval/reward/y": 0.25},
        ),
        (Scores(total=[], components={"a": []}), "r", {"r/total": 0.0}),
    ],
)
def test_scores_metrics_table(scores, prefix, expected):
    assert scores.metrics(prefix=prefix) == pytest.approx(expected)
    assert set(scores.metrics(prefix=prefix)) == set(expected)


def test_metrics_default_prefix_is_reward():
    scores = Rubric([RewardTerm("length", length)]).score(PROMPTS, COMPLETIONS)
    assert scores.metrics() == {"reward/total": 2.0, "reward/length": 2.0}


# ---------------------------------------------------------------------------------------------
# Construction checks


def test_needs_at_least_one_reward():
    with pytest.raises(ValueError, match="at least one"):
        Rubric([])


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="unique.*'length'"):
        Rubric([RewardTerm("length", length), RewardTerm("length", correct, 0.5)])


def no_prompts(completions):
    return [0.0 for _ in completions]


def no_completions(prompts):
    return [0.0 for _ in prompts]


def positional_only(prompts, completions, /):
    return [0.0 for _ in completions]


@pytest.mark.parametrize(
    ("fn", "missing"),
    [
        (no_prompts, "['prompts']"),
        (no_completions, "['completions']"),
        (positional_only, "['prompts', 'completions']"),  # called by keyword, as TRL does
    ],
)
def test_reward_without_trl_signature_fails_at_construction(fn, missing):
    with pytest.raises(TypeError, match=rf"reward 'my_reward'.*lacks {re.escape(missing)}"):
        Rubric([RewardTerm("my_reward", fn)])


def completions_and_kwargs(completions, **kwargs):
    """TRL's own format rewards leave out `prompts` and take **kwargs."""
    return [1.0 for _ in completions]


def test_reward_with_kwargs_needs_no_prompts_parameter():
    rubric = Rubric([RewardTerm("fmt", completions_and_kwargs)], columns=["answer"])
    assert rubric.score(["a"], ["b"], {"answer": ["c"]}).components == {"fmt": [1.0]}


def needs_keyword_only(prompts, completions, *, solution):
    return [float(c == s) for c, s in zip(completions, solution, strict=True)]


@pytest.mark.parametrize(
    ("fn", "column"),
    [(correct, "answer"), (needs_keyword_only, "solution")],
)
def test_reward_needing_a_missing_column_fails_at_construction(fn, column):
    with pytest.raises(TypeError, match=f"reward 'r'.*\\['{column}'\\].*\\['question'\\]"):
        Rubric([RewardTerm("r", fn)], columns=["question"])


def optional_answer(prompts, completions, answer=None):
    return [1.0 if answer is None else 2.0 for _ in completions]


def test_optional_column_may_be_absent():
    rubric = Rubric([RewardTerm("opt", optional_answer)], columns=["question"])
    scores = rubric.score(["p"], ["c"], {"question": ["q"]})
    assert scores.components == {"opt": [1.0]}


def test_columns_unknown_at_construction_are_not_checked():
    # Without `columns` the rubric cannot check; the missing column surfaces when scoring.
    rubric = Rubric([RewardTerm("correct", correct)])
    with pytest.raises(RewardError, match="'correct'.*answer"):
        rubric.score(["p"], ["c"])


# ---------------------------------------------------------------------------------------------
# Which columns a reward receives


def make_recorder(seen: list):
    def with_kwargs(prompts, completions, **kwargs):
        seen.append({"prompts": prompts, "completions": completions, **kwargs})
        return [0.0 for _ in completions]

    return with_kwargs


def test_reward_with_kwargs_receives_every_column():
    seen: list[dict] = []
    rubric = Rubric([RewardTerm("rec", make_recorder(seen))], columns=["answer", "level"])
    rubric.score(["p0", "p1"], ["c0", "c1"], {"answer": ["a0", "a1"], "level": [1, 2]})
    assert seen == [
        {
            "prompts": ["p0", "p1"],
            "completions": ["c0", "c1"],
            "answer": ["a0", "a1"],
            "level": [1, 2],
        }
    ]


def test_reward_without_kwargs_receives_only_the_columns_it_names():
    seen: list[dict] = []

    def named(prompts, completions, answer, hint=None):
        seen.append({"answer": answer, "hint": hint})
        return [0.0 for _ in completions]

    rubric = Rubric([RewardTerm("named", named)], columns=["answer", "level", "source"])
    rubric.score(["p"], ["c"], {"answer": ["a"], "level": [3], "source": ["s"]})
    assert seen == [{"answer": ["a"], "hint": None}]


def test_column_length_mismatch_is_an_error_naming_the_column():
    rubric = Rubric([RewardTerm("correct", correct)], columns=["answer"])
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 completions"):
        rubric.score(PROMPTS, COMPLETIONS, {"answer": ["12", "13"]})


def test_prompt_count_mismatch_is_an_error():
    rubric = Rubric([RewardTerm("length", length)])
    with pytest.raises(ValueError, match="prompts"):
        rubric.score(["p0", "p1"], ["c0", "c1", "c2"])


# ---------------------------------------------------------------------------------------------
# Error policy: a failing reward is an error naming it, never a silent 0.0


def raises_key_error(prompts, completions, **kwargs):
    return [{"x": 1}["missing"] for _ in completions]


def returns_too_few(prompts, completions, **kwargs):
    return [1.0]


def returns_a_float(prompts, completions, **kwargs):
    return 1.0


def returns_a_generator(prompts, completions, **kwargs):
    return (1.0 for _ in completions)


def returns_text(prompts, completions, **kwargs):
    return ["1.0" for _ in completions]


def returns_bool(prompts, completions, **kwargs):
    return [True for _ in completions]


def returns_dict(prompts, completions, **kwargs):
    return [{"score": 1.0} for _ in completions]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (raises_key_error, r"reward 'bad' raised KeyError: 'missing'"),
        (returns_too_few, r"reward 'bad' must return one score per completion \(3\), got 1"),
        (returns_a_float, r"reward 'bad' must return one score per completion \(3\), got float"),
        (returns_a_generator, r"reward 'bad' must return one score per completion"),
        (returns_text, r"reward 'bad' returned '1.0' for completion 0"),
        (returns_bool, r"reward 'bad' returned True for completion 0"),
        (returns_dict, r"reward 'bad' returned \{'score': 1.0\} for completion 0"),
    ],
)
def test_bad_reward_raises_reward_error_naming_it(fn, message):
    rubric = Rubric([RewardTerm("length", length), RewardTerm("bad", fn, 0.0)])
    with pytest.raises(RewardError, match=message):
        rubric.score(PROMPTS, COMPLETIONS)


def test_reward_error_keeps_the_original_exception():
    rubric = Rubric([RewardTerm("bad", raises_key_error)])
    with pytest.raises(RewardError) as info:
        rubric.score(["p"], ["c"])
    assert isinstance(info.value.__cause__, KeyError)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, 2, 3], [1.0, 2.0, 3.0]),  # ints become floats
        ((0.5, None, -1.0), [0.5, None, -1.0]),  # a tuple is fine
        ([np.float32(0.5), np.int64(2), np.float64(1.5)], [0.5, 2.0, 1.5]),  # numpy scalars
    ],
)
def test_numeric_returns_become_floats(values, expected):
    def fixed(prompts, completions, **kwargs):
        return values

    scores = Rubric([RewardTerm("fixed", fixed, 0.0)]).score(PROMPTS, COMPLETIONS)
    assert scores.components["fixed"] == expected
    assert all(v is None or type(v) is float for v in scores.components["fixed"])


def test_nan_score_is_kept_in_components_but_left_out_of_total():
    def with_nan(prompts, completions, **kwargs):
        return [1.0, math.nan]

    scores = Rubric([RewardTerm("n", with_nan)]).score(["a", "b"], ["c", "d"])
    assert scores.total == [1.0, 0.0]
    assert scores.components["n"][0] == 1.0
    assert math.isnan(scores.components["n"][1])


# ---------------------------------------------------------------------------------------------
# Async rewards


async def async_correct(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


async def async_raises(prompts, completions, **kwargs):
    raise RuntimeError("judge unreachable")


def test_async_reward_is_awaited_and_weighted():
    rubric = Rubric(
        [RewardTerm("async_correct", async_correct, 2.0), RewardTerm("length", length, 0.5)],
        columns=["answer"],
    )
    scores = rubric.score(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert scores.components["async_correct"] == [1.0, 0.0, 0.0]
    assert scores.total == pytest.approx([2.0 + 1.0, 1.5, 0.5])


def test_async_reward_signature_is_checked():
    with pytest.raises(TypeError, match="'async_correct'.*answer"):
        Rubric([RewardTerm("async_correct", async_correct)], columns=[])


def test_async_reward_error_names_the_reward():
    rubric = Rubric([RewardTerm("judge", async_raises)])
    with pytest.raises(RewardError, match="reward 'judge' raised RuntimeError: judge unreachable"):
        rubric.score(["p"], ["c"])


# ---------------------------------------------------------------------------------------------
# Callable objects are rewards too


class Threshold:
    """A configured reward: 1.0 when the completion is at most `limit` characters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, prompts, completions, **kwargs):
        return [1.0 if len(c) <= self.limit else 0.0 for c in completions]


@pytest.mark.parametrize(("limit", "expected"), [(0, [0, 0, 0]), (1, [0, 0, 1]), (2, [1, 0, 1])])
def test_callable_object_reward(limit, expected):
    scores = Rubric([RewardTerm("short", Threshold(limit))]).score(PROMPTS, COMPLETIONS)
    assert scores.total == [float(x) for x in expected]
