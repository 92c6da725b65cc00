"""Math answers (`rewards/math_answer.py`): extraction, number parsing and equivalence tables,
the `math_answer` reward with its options, worker threads and deadlines, and TRL's
`accuracy_reward` on the same inputs.

Run: `pytest tests/test_rewards_math.py`.
"""

from __future__ import annotations

import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
from trl.rewards import accuracy_reward

from rewards import RewardTerm, Rubric, Scored, resolve_reward
from rewards.deadline import within
from rewards.math_answer import (
    answers_match,
    extract_answer,
    math_answer,
    parse_number,
)


def chat(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


# ---------------------------------------------------------------------------------------------
# extract_answer

ALL = ("boxed", "answer_is", "gsm8k", "last_number", "whole")


@pytest.mark.parametrize(
    ("text", "strategies", "expected"),
    [
        # boxed: the last box, nested and escaped braces, \fbox, `\boxed 5`, math delimiters
        (r"So \boxed{42}.", ("boxed",), "42"),
        (r"So $\boxed{\frac{1}{2}}$.", ("boxed",), r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", ("boxed",), r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", ("boxed",), r"\{1, 2\}"),
        (r"\boxed{\left\{ x \right\}}", ("boxed",), r"\left\{ x \right\}"),
        (r"first \boxed{1} then \boxed{2}", ("boxed",), "2"),
        (r"first \boxed{1} then \fbox{3}", ("boxed",), "3"),
        (r"\boxed 5$ and more", ("boxed",), "5"),
        (r"\boxed{ $7$ }", ("boxed",), "7"),
        (r"cut short \boxed{\frac{1}{", ("boxed",), None),  # unclosed: no boxed answer
        (r"cut short \boxed{\frac{1}{", ("boxed", "last_number"), "1"),  # ... then the fallback
        ("no box here 5", ("boxed",), None),
        (r"\boxedx{5}", ("boxed",), None),
        # answer_is: the last "answer is" / "Answer:", to the end of its sentence or math span
        ("The answer is 42.", ("answer_is",), "42"),
        ("The answer is 3.5. Done", ("answer_is",), "3.5"),
        ("the answer is: -7", ("answer_is",), "-7"),
        (
            "Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.",
            ("answer_is",),
            r"\frac{3}{4}",
        ),  # fmt: skip
        ("**Answer:** 12", ("answer_is",), "12"),
        ("**Answer**: 12", ("answer_is",), "12"),
        ("Answer:\n  9", ("answer_is",), "9"),
        ("The answer is \\(x^2\\) since", ("answer_is",), "x^2"),
        (r"The answer is \boxed{8} obviously", ("answer_is",), "8"),
        ("An answer is 1. The answer is 2.", ("answer_is",), "2"),
        ("The answer is x = 5, so we are done", ("answer_is",), "x = 5"),
        ("The answer is (1, 2), an interval", ("answer_is",), "(1, 2)"),
        (r"The answer is \{a, b\}", ("answer_is",), r"\{a, b\}"),
        ("My answers are 3", ("answer_is",), None),
        ("The answer isn't 3", ("answer_is",), None),
        ("The answer is", ("answer_is",), None),
        # gsm8k: the last "#### X" line
        ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", ("gsm8k",), "18"),
        ("#### 1,000\n", ("gsm8k",), "1,000"),
        ("x #### 5", ("gsm8k",), None),  # must start its line
        # last_number: signs, thousands commas, decimals, fractions, scientific notation
        ("I have 3 apples and 5 pears", ("last_number",), "5"),
        ("it costs -1,234.5 dollars", ("last_number",), "-1,234.5"),
        ("so 3/4 of them", ("last_number",), "3/4"),
        ("list 1,2,3", ("last_number",), "3"),
        ("x-5", ("last_number",), "5"),  # a minus after a word is an operator
        ("(-5)", ("last_number",), "-5"),
        ("about .5 left", ("last_number",), ".5"),
        ("speed 3e8 m/s", ("last_number",), "3e8"),
        ("H2O and step1", ("last_number",), None),  # digits inside words are not numbers
        ("total: 42.", ("last_number",), "42"),
        # whole: the text itself, delimiters stripped
        ("  $x^2$  ", ("whole",), "x^2"),
        ("", ("whole",), None),
        # order: first strategy that finds something
        (r"The answer is 7. Check: \boxed{8}", ("boxed", "answer_is"), "8"),
        (r"The answer is 7. Check: \boxed{8}", ("answer_is", "boxed"), "7"),
        ("2 + 2 = 4", ("boxed", "answer_is", "last_number"), "4"),
        ("nothing at all", ALL[:-1], None),
    ],
)
def test_extract_answer(text, strategies, expected):
    assert extract_answer(text, strategies=strategies) == expected


def test_extract_answer_default_strategies():
    assert extract_answer(r"The answer is 3 \boxed{4}, total 5") == "4"
    assert extract_answer("The answer is 3, total 5") == "3"
    assert extract_answer("total 5 and 6") == "6"


@pytest.mark.parametrize("strategies", [(), ["boxed", "boxxed"], "boxed"])
def test_extract_answer_rejects_unknown_strategies(strategies):
    with pytest.raises(ValueError, match="'strategies' must be a non-empty list of"):
        extract_answer("x", strategies=strategies)


# ---------------------------------------------------------------------------------------------
# parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", Fraction(72)),
        (" -1,000 ", Fraction(-1000)),
        ("1,234,567.25", Fraction(123456725, 100)),
        ("0.5", Fraction(1, 2)),
        (".5", Fraction(1, 2)),
        ("3.", Fraction(3)),
        ("+3", Fraction(3)),
        ("1e-3", Fraction(1, 1000)),
        ("3/4", Fraction(3, 4)),
        ("-3 / 4", Fraction(-3, 4)),
        (r"\frac{3}{4}", Fraction(3, 4)),
        (r"-\dfrac{1}{2}", Fraction(-1, 2)),
        (r"\frac12", Fraction(1, 2)),
        ("$5$", Fraction(5)),
        (r"\$5", Fraction(5)),
        ("1{,}000", Fraction(1000)),
        (r"1\,000", Fraction(1000)),
        ("1,2", None),  # not a thousands grouping
        ("1,0000", None),
        ("3/0", None),
        (r"\frac{x}{2}", None),
        ("x", None),
        ("", None),
        ("10%", None),  # percentages are left to math-verify
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# ---------------------------------------------------------------------------------------------
# answers_match


@pytest.mark.parametrize(
    ("predicted", "gold", "options", "expected"),
    [
        # numbers: integers exactly, others within rel_tol / abs_tol
        ("72", "72", {}, True),
        ("72.0", "72", {}, True),
        ("1,000", "1000", {}, True),
        ("10000001", "10000000", {}, False),  # no tolerance between integers
        ("0.5", "1/2", {}, True),
        ("0.333333", "1/3", {}, True),  # |d| = 1e-6 * 1/3 exactly: on the edge, inside
        ("0.33333", "1/3", {}, False),
        ("0.33333", "1/3", {"rel_tol": 1e-4}, True),
        ("3.1416", "3.14159", {}, False),
        ("3.1416", "3.14159", {"rel_tol": 1e-4}, True),
        ("1e-12", "0.0", {}, True),  # abs_tol 1e-9
        ("1e-12", "0.0", {"abs_tol": 0.0}, False),
        ("-7", "7", {}, False),
        (r"\frac{3}{4}", "0.75", {"use_math_verify": False}, True),
        # same text, whitespace aside
        ("x + 1", "x+1", {"use_math_verify": False}, True),
        ("yes", "yes", {}, True),
        # math-verify
        (r"2\sqrt{3}", r"\sqrt{12}", {}, True),
        (r"2\sqrt{3}", r"\sqrt{12}", {"use_math_verify": False}, False),
        (r"\frac{x^2-1}{x-1}", "x+1", {}, True),
        ("0.5", r"\frac{1}{2}", {}, True),
        (r"\dfrac{1}{2}", "0.5", {}, True),
        (r"\{2, 1\}", r"\{1,2\}", {}, True),
        ("[1,2)", "[1, 2)", {}, True),
        ("(1,2)", "[1,2)", {}, False),
        ("x = 5", "5", {}, True),  # the gold's form decides: a bare number
        (r"\pi", "3.14159", {}, False),
        (r"10\%", "10", {}, True),
        (r"5 \text{ cm}", "5", {}, True),
        (r"\text{(B)}", "B", {}, True),
        ("no", "yes", {}, False),
    ],
)
def test_answers_match(predicted, gold, options, expected):
    assert answers_match(predicted, gold, **options) is expected


# ---------------------------------------------------------------------------------------------
# math_answer


@pytest.mark.parametrize(
    ("options", "completion", "gold", "expected"),
    [
        ({}, r"So the result is \boxed{\frac{1}{2}}.", "0.5", 1.0),
        ({}, r"So the result is \boxed{\frac{1}{3}}.", "0.5", 0.0),
        ({}, "The answer is 1,000.", 1000, 1.0),  # numeric ground truth
        ({}, "The answer is 2.5", 2.5, 1.0),
        ({}, "I think 4 + 5 = 9", "9", 1.0),
        ({}, "I think 4 + 5 = 9", "10", 0.0),
        ({}, "no idea", "9", 0.0),  # nothing extracted
        ({}, "", "9", 0.0),
        ({}, chat(r"\boxed{2\sqrt{3}}"), r"\sqrt{12}", 1.0),
        ({}, "9", None, None),  # no ground truth: not applicable
        ({}, "9", "  ", None),
        ({}, "9", float("nan"), None),
        ({"strategies": ["boxed"]}, "The answer is 9", "9", 0.0),
        ({"strategies": ["whole"]}, " x^2+1 ", "1+x^2", 1.0),
        ({"gold_strategies": ["gsm8k"]}, "so 18", "16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n#### 18", 1.0),
        ({"gold_strategies": ["gsm8k"]}, "so 18", "no marker", None),
        ({"gold_strategies": ["boxed"]}, "= 3/4", r"hence $\boxed{\frac34}$", 1.0),
        ({"after": "</think>"}, "<think>maybe 3</think> so 4", "4", 1.0),
        ({"after": "</think>"}, "<think>maybe 3</think> so 4", "3", 0.0),
        ({"after": "</think>"}, "<think>maybe 4, still thinking", "4", 0.0),
        ({"rel_tol": 0.01}, "about 3.14", "3.1416", 1.0),
        ({"use_math_verify": False}, r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 0.0),
    ],
)
def test_math_answer(options, completion, gold, expected):
    reward = math_answer(**options)
    assert reward(prompts=["p"], completions=[completion], answer=[gold]) == [expected]


def test_math_answer_column_and_batch():
    reward = math_answer(answer_column="solution")
    completions = [chat(r"\boxed{4}"), chat("The answer is 5"), chat("?")]
    scores = reward(
        prompts=["p"] * 3, completions=completions, solution=["4", "4", "4"], id=[1, 2, 3]
    )
    assert scores == [1.0, 0.0, 0.0]
    with pytest.raises(
        ValueError, match="needs the ground-truth column 'solution'.*\\['answer'\\]"
    ):
        reward(prompts=["p"], completions=["4"], answer=["4"])
    with pytest.raises(ValueError, match="'solution' has 2 values for 1 completions"):
        reward(prompts=["p"], completions=["4"], solution=["4", "5"])


def test_math_answer_feedback():
    reward = math_answer(feedback=True)
    completions = [r"\boxed{0.5}", r"\boxed{\sqrt{12}}", "The answer is 3", "none", "1"]
    golds = ["1/2", r"2\sqrt{3}", "4", "4", ""]
    assert reward(prompts=["p"] * 5, completions=completions, answer=golds) == [
        Scored(1.0, "'0.5' (boxed) == '1/2' by numbers"),
        Scored(1.0, "'\\\\sqrt{12}' (boxed) == '2\\\\sqrt{3}' by math-verify"),
        Scored(0.0, "'3' (answer_is) != '4' by integers"),
        Scored(0.0, "no answer found (boxed, answer_is, last_number)"),
        Scored(None, "no ground truth in '' (answer)"),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"answer_column": "my answer"}, "'answer_column' must be a column name"),
        ({"answer_column": "completions"}, "'answer_column' must be a dataset column"),
        ({"strategies": ["boxed", "last"]}, "'strategies' must be a non-empty list of"),
        ({"strategies": "boxed"}, "'strategies' must be a non-empty list of"),
        ({"gold_strategies": []}, "'gold_strategies' must be a non-empty list of"),
        ({"after": ""}, "'after' must be a non-empty string or null"),
        ({"rel_tol": -1e-6}, "'rel_tol' must be a finite number >= 0"),
        ({"abs_tol": float("inf")}, "'abs_tol' must be a finite number >= 0"),
        ({"use_math_verify": "no"}, "'use_math_verify' must be true or false"),
        ({"timeout_s": -1}, "'timeout_s' must be a number of seconds >= 0, or null"),
        ({"feedback": 1}, "'feedback' must be true or false"),
    ],
)
def test_math_answer_option_errors(options, message):
    with pytest.raises(ValueError, match=f"math_answer: option {message}"):
        math_answer(**options)


def test_math_answer_in_rubric_checks_its_column():
    reward = resolve_reward("rewards.math_answer:math_answer", None, {"answer_column": "solution"})
    assert reward.__name__ == "math_answer"
    with pytest.raises(TypeError, match="needs column\\(s\\) \\['solution'\\]"):
        Rubric([RewardTerm("math", reward)], columns=["answer"])
    rubric = Rubric([RewardTerm("math", reward)], columns=["solution"])
    scores = rubric.score(["p", "p"], [r"\boxed{1/2}", "7"], {"solution": ["0.5", "8"]})
    assert scores.components["math"] == [1.0, 0.0]


def test_math_answer_is_picklable():
    reward = math_answer(answer_column="solution", strategies=["boxed"], timeout_s=None)
    copy = pickle.loads(pickle.dumps(reward))
    assert copy == reward
    assert copy(prompts=["p"], completions=[r"\boxed{0.5}"], solution=[r"\frac12"]) == [1.0]


# ---------------------------------------------------------------------------------------------
# Threads and deadlines

THREAD_CASES = (
    [r"\boxed{0.5}", r"\boxed{\sqrt{12}}", r"\boxed{\{1,2\}}", "The answer is x=3", "7"],
    [r"\frac{1}{2}", r"2\sqrt{3}", r"\{2,1\}", "3", "8"],
)


def test_math_answer_in_worker_threads_matches_main_thread():
    """math-verify's own timeouts use signal.alarm, which fails outside the main thread."""
    reward = math_answer(timeout_s=30)
    completions, golds = THREAD_CASES
    main = reward(prompts=["p"] * 5, completions=completions, answer=golds)
    assert main == [1.0, 1.0, 1.0, 1.0, 0.0]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(reward, prompts=["p"] * 5, completions=completions, answer=golds)
            for _ in range(4)
        ]
        assert [f.result() for f in futures] == [main] * 4


def test_math_answer_in_rubric_worker_thread():
    """A rubric term with a timeout runs in a worker thread."""
    completions, golds = THREAD_CASES
    rubric = Rubric([RewardTerm("math", math_answer(), timeout=60)], columns=["answer"])
    scores = rubric.score(["p"] * 5, completions, {"answer": golds})
    assert scores.components["math"] == [1.0, 1.0, 1.0, 1.0, 0.0]


def spin() -> None:
    while True:
        pass


@pytest.mark.parametrize("in_worker", [False, True])
def test_within_stops_a_runaway_call(in_worker):
    def run():
        start = time.monotonic()
        return within(0.2, spin), time.monotonic() - start

    if in_worker:
        with ThreadPoolExecutor(max_workers=1) as pool:
            (finished, value), took = pool.submit(run).result()
    else:
        (finished, value), took = run()
    assert (finished, value) == (False, None)
    assert took < 5.0
    assert within(5.0, lambda: 41 + 1) == (True, 42)
    assert within(None, lambda: "no limit") == (True, "no limit")


def test_within_never_fires_after_returning():
    """Calls that end around their deadline either return or time out, nothing leaks after."""
    outcomes = set()
    for i in range(300):
        deadline = 0.0002 * (i % 10 + 1)
        outcomes.add(within(deadline, lambda d=deadline: time.sleep(d) or "done"))
        time.sleep(0.0005)  # a stray exception would land here and fail the test
    assert outcomes <= {(True, "done"), (False, None)}


def test_math_answer_times_out_to_zero(caplog):
    """A comparison past `timeout_s` scores 0.0 with a warning; the same one unbounded passes."""
    completion, gold = r"\boxed{\int_0^1 t^3 \, dt}", r"\frac{1}{4}"
    slow = math_answer(timeout_s=0.001, feedback=True)
    [result] = slow(prompts=["p"], completions=[completion], answer=[gold])
    assert result.score == 0.0
    assert result.feedback.endswith("by math-verify timed out after 0.001s")
    assert "math-verify took over 0.001s" in caplog.text
    assert math_answer(timeout_s=None)(prompts=["p"], completions=[completion], answer=[gold]) == [
        1.0
    ]
    assert threading.active_count() < 10  # deadline timers do not pile up


# ---------------------------------------------------------------------------------------------
# TRL's accuracy_reward on the same inputs (gold column `solution`, one boxed answer)


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        (r"My answer is \boxed{\frac{1}{3}}", r"\frac{1}{3}", 1.0),
        (r"My answer is \boxed{\frac{1}{2}}", r"\frac{1}{3}", 0.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{x=5}", "5", 1.0),
        (r"\boxed{-7}", "-7.0", 1.0),
        (r"\boxed{1/3}", "0.333333", 1.0),
        (r"\boxed{10\%}", "10", 1.0),
        (r"\boxed{5 \text{ cm}}", "5", 1.0),
        (r"\boxed{\pi}", "3.14159", 0.0),
        ("The final answer is $2$", "2", 1.0),
    ],
)
def test_agrees_with_trl_accuracy_reward(completion, solution, expected):
    ours = math_answer(answer_column="solution")
    got = ours(prompts=["p"], completions=[chat(completion)], solution=[solution])
    assert got == accuracy_reward([chat(completion)], [solution]) == [expected]


@pytest.mark.parametrize(
    ("completion", "solution", "trl", "ours", "why"),
    [
        (r"\boxed{1} then \boxed{2}", "2", 0.0, 1.0, "several boxes: the last one is the answer"),
        ("The answer is 2", "2", 0.0, 1.0, "answers without LaTeX anchors are found"),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", None, 1.0, "the gold is parsed inside $...$"),
        (r"\boxed{\{1,2\}}", r"\{2,1\}", None, 1.0, "the gold is parsed inside $...$"),
        (r"\boxed{2}", "hello", None, 0.0, "a text gold is an answer, compared as text"),
    ],
)
def test_intended_differences_from_trl(completion, solution, trl, ours, why):
    reward = math_answer(answer_column="solution")
    assert accuracy_reward([chat(completion)], [solution]) == [trl], why
    assert reward(prompts=["p"], completions=[chat(completion)], solution=[solution]) == [ours], why
