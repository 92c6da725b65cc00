"""Rule rewards (`rewards/rules.py`): tables of completions, options and the scores worked out by
hand; option errors; conversational completions; TRL's own rewards on the same inputs.

Run: `pytest tests/test_rewards_rules.py`.
"""

from __future__ import annotations

import pickle
import random

import pytest
from trl.rewards import (
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
    think_format_reward,
)

from rewards import RewardTerm, Rubric, resolve_reward
from rewards.rules import (
    format_regex,
    keywords,
    length_band,
    repetition_penalty,
    required_tags,
    soft_overlong,
)


def score(reward, completion, completion_ids=None) -> float:
    """One completion through the reward's batch signature."""
    ids = None if completion_ids is None else [completion_ids]
    return reward(prompts=["p"], completions=[completion], completion_ids=ids)[0]


def chat(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


# ---------------------------------------------------------------------------------------------
# format_regex

ANSWER = r"<answer>\d+</answer>"


@pytest.mark.parametrize(
    ("options", "completion", "expected"),
    [
        ({"pattern": ANSWER}, "<answer>42</answer>", 1.0),
        ({"pattern": ANSWER}, "  <answer>42</answer>\n", 1.0),  # surrounding whitespace ignored
        ({"pattern": ANSWER}, "so <answer>42</answer>", 0.0),  # full match by default
        ({"pattern": ANSWER, "full_match": False}, "so <answer>42</answer>", 1.0),
        ({"pattern": ANSWER, "full_match": False}, "so <answer>4x</answer>", 0.0),
        ({"pattern": ANSWER}, "<ANSWER>42</ANSWER>", 0.0),
        ({"pattern": ANSWER, "flags": "i"}, "<ANSWER>42</ANSWER>", 1.0),
        ({"pattern": r"<think>.*</think>"}, "<think>a\nb</think>", 0.0),  # `.` stops at \n
        ({"pattern": r"<think>.*</think>", "flags": "s"}, "<think>a\nb</think>", 1.0),
        ({"pattern": r"^\d+$", "flags": "m", "full_match": False}, "x\n42\ny", 1.0),
        ({"pattern": r"^\d+$", "full_match": False}, "x\n42\ny", 0.0),
        ({"pattern": ANSWER}, chat("<answer>7</answer>"), 1.0),
        ({"pattern": ANSWER}, "", 0.0),
    ],
)
def test_format_regex(options, completion, expected):
    assert score(format_regex(**options), completion) == expected


# ---------------------------------------------------------------------------------------------
# required_tags

GOOD = "<think>a</think><answer>b</answer>"


@pytest.mark.parametrize(
    ("options", "completion", "expected"),
    [
        ({}, GOOD, 1.0),
        ({}, "<think>\na\n</think>\nso\n<answer>b</answer>", 1.0),  # text between is allowed
        ({}, "<answer>b</answer><think>a</think>", 0.0),  # wrong order
        ({"in_order": False}, "<answer>b</answer><think>a</think>", 1.0),
        ({}, "<think>a<answer>b</answer></think>", 0.0),  # answer inside think: not in order
        ({}, "<think>a</think>", 0.0),
        ({}, "<think>a<answer>b</answer>", 0.0),  # think never closed
        ({}, "</think>a<think><answer>b</answer>", 0.0),  # closed before opened
        ({}, "<think>a</think><think>c</think><answer>b</answer>", 0.0),  # think twice
        ({"exactly_once": False}, "<think>a</think><think>c</think><answer>b</answer>", 1.0),
        ({}, "<think></think><answer></answer>", 1.0),  # empty blocks count
        ({}, chat(GOOD), 1.0),
        ({"tags": ["answer"]}, "text <answer>b</answer>", 1.0),
        # only whitespace outside the blocks (DeepSeek-R1 shape)
        ({"allow_text_outside": False}, "<think>a</think>\n<answer>b</answer>\n", 1.0),
        ({"allow_text_outside": False}, "hi <think>a</think><answer>b</answer>", 0.0),
        ({"allow_text_outside": False}, "<think>a</think>x<answer>b</answer>", 0.0),
        ({"allow_text_outside": False}, "<think>a</think><answer>b</answer> bye", 0.0),
        # partial credit: checks are think, answer, order (+ outside)
        ({"partial": True}, GOOD, 1.0),
        ({"partial": True}, "<think>a</think>", 1 / 3),
        ({"partial": True}, "<answer>b</answer><think>a</think>", 2 / 3),
        ({"partial": True}, "nothing", 0.0),
        ({"partial": True, "allow_text_outside": False}, "hi " + GOOD, 3 / 4),
        ({"partial": True, "allow_text_outside": False}, "<think>a</think>", 2 / 4),
        ({"partial": True, "in_order": False}, "<think>a</think>", 1 / 2),
    ],
)
def test_required_tags(options, completion, expected):
    assert score(required_tags(**options), completion) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>\nreasoning\n</think>\nanswer", 1.0),
        ("<think>\nreasoning\nanswer", 0.0),
        ("<think>a</think><think>b</think>", 0.0),
        ("no tags", 0.0),
        ("</think>answer", 0.0),
    ],
)
def test_required_tags_agrees_with_trl_think_format(completion, expected):
    ours = required_tags(tags=["think"])(prompts=["p"], completions=[chat(completion)])
    assert ours == think_format_reward([chat(completion)]) == [expected]


def test_required_tags_differs_from_trl_on_text_before_think():
    """TRL's think_format_reward requires `<think>` at the very start; required_tags checks the
    block and, with allow_text_outside=False, the text both before and after it."""
    completion = [chat("Sure. <think>a</think> 4")]
    assert think_format_reward(completion) == [0.0]
    assert required_tags(tags=["think"])(prompts=["p"], completions=completion) == [1.0]
    strict = required_tags(tags=["think"], allow_text_outside=False)
    assert strict(prompts=["p"], completions=completion) == [0.0]


# ---------------------------------------------------------------------------------------------
# length_band


@pytest.mark.parametrize(
    ("options", "completion", "ids", "expected"),
    [
        ({"min_length": 2, "max_length": 4, "unit": "words"}, "a", None, 0.0),
        ({"min_length": 2, "max_length": 4, "unit": "words"}, "a b", None, 1.0),
        ({"min_length": 2, "max_length": 4, "unit": "words"}, " a  b\nc d ", None, 1.0),
        ({"min_length": 2, "max_length": 4, "unit": "words"}, "a b c d e", None, 0.0),
        # slack 2: one unit outside -> 0.5, two -> 0, further stays 0
        ({"min_length": 2, "max_length": 4, "unit": "words", "slack": 2}, "a", None, 0.5),
        ({"min_length": 2, "max_length": 4, "unit": "words", "slack": 2}, "", None, 0.0),
        ({"min_length": 2, "max_length": 4, "unit": "words", "slack": 2}, "a b c d e", None, 0.5),
        ({"min_length": 2, "max_length": 4, "unit": "words", "slack": 2}, "a b c d e f", None, 0.0),
        ({"min_length": 2, "max_length": 4, "unit": "words", "slack": 2}, "a " * 9, None, 0.0),
        ({"max_length": 3, "unit": "chars"}, "abc", None, 1.0),
        ({"max_length": 3, "unit": "chars"}, "", None, 1.0),  # open band below
        ({"max_length": 3, "unit": "chars"}, "abcd", None, 0.0),
        ({"max_length": 3, "unit": "chars", "slack": 4}, "abcde", None, 0.5),
        ({"min_length": 3, "unit": "tokens", "slack": 3}, "whatever", [1], 1 / 3),
        ({"min_length": 3, "unit": "tokens", "slack": 3}, "whatever", [1, 2, 3], 1.0),
        ({"min_length": 3, "unit": "tokens"}, "", list(range(1000)), 1.0),  # open band above
        ({"min_length": 1, "max_length": 1, "unit": "tokens"}, "x", [5], 1.0),
        ({"max_length": 2, "unit": "chars"}, chat("abc"), None, 0.0),
    ],
)
def test_length_band(options, completion, ids, expected):
    assert score(length_band(**options), completion, ids) == pytest.approx(expected)


def test_token_lengths_need_completion_ids():
    for reward in [length_band(max_length=3), soft_overlong(max_completion_len=8, cache_len=2)]:
        with pytest.raises(ValueError, match="completion_ids"):
            reward(prompts=["p"], completions=["abc"])
        with pytest.raises(ValueError, match="2 completion_ids for 1 completions"):
            reward(prompts=["p"], completions=["abc"], completion_ids=[[1], [2]])
    with pytest.raises(ValueError, match="completion_ids"):
        repetition_penalty(unit="tokens")(prompts=["p"], completions=["a b"])


# ---------------------------------------------------------------------------------------------
# soft_overlong: DAPO Eq. 13 with L_max = 100, L_cache = 20 -> ramp from 80 (0) to 100 (-1)


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (50, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0)]
    + [(101, -1.0), (500, -1.0)],
)
def test_soft_overlong(length, expected):
    reward = soft_overlong(max_completion_len=100, cache_len=20)
    assert score(reward, "text", [7] * length) == pytest.approx(expected)


@pytest.mark.parametrize(("max_len", "cache"), [(100, 20), (100, 0), (50, 50), (16, 1)])
def test_soft_overlong_equals_trl(max_len, cache):
    ids = [[3] * n for n in range(0, 2 * max_len + 2)]
    ours = soft_overlong(max_completion_len=max_len, cache_len=cache)
    trl = get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)
    got = ours(prompts=["p"] * len(ids), completions=["x"] * len(ids), completion_ids=ids)
    assert got == pytest.approx(trl(completion_ids=ids))


# ---------------------------------------------------------------------------------------------
# repetition_penalty: (1 - unique / total n-grams) * max_penalty


@pytest.mark.parametrize(
    ("options", "completion", "expected"),
    [
        ({"ngram": 2}, "a b c d", 0.0),
        ({"ngram": 2}, "a a a a a", -0.75),  # 4 bigrams, 1 unique
        ({"ngram": 2}, "A a a A a", -0.75),  # words are lower-cased
        ({"ngram": 2, "max_penalty": -0.5}, "a a a a a", -0.375),
        ({"ngram": 2}, "a a", 0.0),  # one bigram: nothing repeats
        ({"ngram": 2}, "x", 0.0),  # shorter than n
        ({"ngram": 2}, "", 0.0),
        ({}, "the cat sat the cat sat", -0.25),  # 4 trigrams, 3 unique
        ({}, "the cat sat on the mat", 0.0),
        ({"ngram": 1}, "a b a b", -0.5),
        ({"ngram": 1, "max_penalty": 0.0}, "a a a a", 0.0),
        ({"ngram": 2}, chat("a a a a a"), -0.75),
    ],
)
def test_repetition_penalty_words(options, completion, expected):
    assert score(repetition_penalty(**options), completion) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ngram", "ids", "expected"),
    [(2, [1, 2, 3, 4], 0.0), (2, [5, 5, 5, 5, 5], -0.75), (3, [1, 2], 0.0), (1, [1, 1], -0.5)],
)
def test_repetition_penalty_tokens(ngram, ids, expected):
    reward = repetition_penalty(ngram=ngram, unit="tokens")
    assert score(reward, "ignored", ids) == pytest.approx(expected)


@pytest.mark.parametrize(("ngram", "max_penalty"), [(1, -1.0), (2, -1.0), (3, -0.5), (4, -2.0)])
def test_repetition_penalty_tokens_equals_trl(ngram, max_penalty):
    rng = random.Random(ngram)
    ids = [[rng.randrange(4) for _ in range(rng.randrange(12))] for _ in range(60)]
    ours = repetition_penalty(ngram=ngram, max_penalty=max_penalty, unit="tokens")
    trl = get_repetition_penalty_reward(ngram_size=ngram, max_penalty=max_penalty)
    got = ours(prompts=["p"] * len(ids), completions=["x"] * len(ids), completion_ids=ids)
    assert got == pytest.approx(trl(completion_ids=ids))


# ---------------------------------------------------------------------------------------------
# keywords


@pytest.mark.parametrize(
    ("options", "completion", "expected"),
    [
        ({"required": ["foo", "bar"]}, "foo and bar", 1.0),
        ({"required": ["foo", "bar"]}, "foo only", 0.5),
        ({"required": ["foo", "bar"]}, "FOO BAR", 1.0),  # case-insensitive by default
        ({"required": ["foo", "bar"], "case_sensitive": True}, "FOO bar", 0.5),
        ({"required": ["foo", "bar"], "mode": "all"}, "foo only", 0.0),
        ({"forbidden": ["sorry"]}, "Sorry, I cannot", 0.0),
        ({"forbidden": ["sorry"]}, "Here it is", 1.0),
        ({"required": ["x"], "forbidden": ["y"]}, "x and y", 0.5),
        ({"required": ["x"], "forbidden": ["y"], "mode": "all"}, "x and y", 0.0),
        ({"required": ["x"], "forbidden": ["y"], "mode": "all"}, "x", 1.0),
        ({"required": ["cat"]}, "category", 1.0),
        ({"required": ["cat"], "whole_words": True}, "category", 0.0),
        ({"required": ["cat"], "whole_words": True}, "a cat.", 1.0),
        ({"required": ["a+b"]}, "so a+b=c", 1.0),  # keywords are literal, not regexes
        ({"required": ["a+b"]}, "so aab", 0.0),
        ({"required": ["42"]}, chat("it is 42"), 1.0),
    ],
)
def test_keywords(options, completion, expected):
    assert score(keywords(**options), completion) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Option errors name the reward and the option


@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [
        (format_regex, {"pattern": ""}, "format_regex: option 'pattern'"),
        (format_regex, {"pattern": "(unclosed"}, "'pattern' '\\(unclosed' is not valid"),
        (format_regex, {"pattern": "x", "flags": "q"}, "'flags' must be a string of the letters"),
        (format_regex, {"pattern": "x", "full_match": "yes"}, "'full_match' must be true or false"),
        (required_tags, {"tags": "think"}, "'tags' must be a non-empty list"),
        (required_tags, {"tags": []}, "'tags' must be a non-empty list"),
        (required_tags, {"tags": ["<think>"]}, "'tags' must be a non-empty list of tag names"),
        (required_tags, {"tags": ["a", "a"]}, "distinct"),
        (required_tags, {"partial": 1}, "'partial' must be true or false"),
        (length_band, {}, "at least one of the two bounds"),
        (length_band, {"max_length": 5, "unit": "bytes"}, "'unit' must be one of"),
        (length_band, {"max_length": -1}, "'max_length' must be an integer >= 0"),
        (length_band, {"max_length": 2.5}, "'max_length' must be an integer"),
        (length_band, {"min_length": 5, "max_length": 4}, "'min_length' \\(5\\) must not exceed"),
        (length_band, {"max_length": 5, "slack": -1}, "'slack' must be an integer >= 0"),
        (soft_overlong, {"max_completion_len": 0, "cache_len": 0}, "'max_completion_len'"),
        (soft_overlong, {"max_completion_len": 10, "cache_len": 11}, "'cache_len' \\(11\\)"),
        (soft_overlong, {"max_completion_len": 10, "cache_len": True}, "'cache_len' must be"),
        (repetition_penalty, {"ngram": 0}, "'ngram' must be an integer >= 1"),
        (repetition_penalty, {"max_penalty": 0.5}, "'max_penalty' must be a number <= 0"),
        (repetition_penalty, {"unit": "chars"}, "'unit' must be 'words' or 'tokens'"),
        (keywords, {}, "at least one keyword"),
        (keywords, {"required": "foo"}, "'required' must be a list of non-empty strings"),
        (keywords, {"forbidden": [""]}, "'forbidden' must be a list of non-empty strings"),
        (keywords, {"required": ["x"], "mode": "any"}, "'mode' must be 'fraction' or 'all'"),
    ],
)
def test_option_errors(factory, options, message):
    with pytest.raises(ValueError, match=message):
        factory(**options)


# ---------------------------------------------------------------------------------------------
# As the suite uses them: built from a config's options, in a rubric, pickled

BUILT = [
    ("format_regex", {"pattern": "<answer>.*</answer>"}),
    ("required_tags", {}),
    ("length_band", {"max_length": 4, "unit": "words"}),
    ("repetition_penalty", {}),
    ("soft_overlong", {"max_completion_len": 4, "cache_len": 2}),
    ("keywords", {"required": ["answer"]}),
]


@pytest.mark.parametrize(("name", "options"), BUILT)
def test_built_from_options_and_picklable(name, options):
    reward = resolve_reward(f"rewards.rules:{name}", None, options)
    assert reward.__name__ == name
    copy = pickle.loads(pickle.dumps(reward))
    kwargs = {"prompts": ["p"], "completions": ["<answer>x</answer>"], "completion_ids": [[1, 2]]}
    assert copy(**kwargs) == reward(**kwargs)


def test_in_rubric_with_completion_ids():
    rubric = Rubric(
        [
            RewardTerm("band", length_band(max_length=3, slack=2)),
            RewardTerm("overlong", soft_overlong(max_completion_len=4, cache_len=2), weight=0.5),
            RewardTerm("tags", required_tags(tags=["answer"])),
        ],
        columns=[],
    )
    ids = [[1, 2], [1, 2, 3, 4], [1] * 6]
    scores = rubric.score(["p"] * 3, ["<answer>1</answer>", "x", "y"], {}, completion_ids=ids)
    assert scores.components == {
        "band": [1.0, 0.5, 0.0],
        "overlong": [0.0, -1.0, -1.0],
        "tags": [1.0, 0.0, 0.0],
    }
    assert scores.total == pytest.approx([2.0, 0.0, -0.5])
