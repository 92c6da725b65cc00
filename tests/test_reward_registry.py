"""Reward lookup (`rewards.resolve_reward`) and rubric building from config (`build_rubric`).

User rewards are real modules and files written to `tmp_path`; TRL's own reward functions are
used unchanged by dotted path. Run: `pytest tests/test_reward_registry.py`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from posttrain.config.schema import RewardSpec
from posttrain.reward_setup import build_rubric, reward_columns, reward_inputs
from rewards import (
    BUILTIN,
    RewardError,
    RewardLookupError,
    RewardTerm,
    Rubric,
    exact_answer,
    resolve_reward,
)

USER_MODULE = "posttrain_test_user_rewards"
USER_PACKAGE = "posttrain_test_user_pkg"

USER_SOURCE = textwrap.dedent(
    """
    from trl.rewards import get_soft_overlong_punishment

    THRESHOLD = 3

    def brevity(prompts, completions, **kwargs):
        return [1.0 if len(c) <= THRESHOLD else 0.0 for c in completions]

    def needs_answer(prompts, completions, answer):
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    def wants_prompt(prompts, completions, prompt):
        return [0.0 for _ in completions]

    # A TRL length reward, configured: it takes `completion_ids`, which TRL always passes.
    overlong = get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable module `posttrain_test_user_rewards` and package `posttrain_test_user_pkg`."""
    root = tmp_path / "site"
    root.mkdir()
    (root / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    pkg = root / USER_PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text(USER_SOURCE)
    for name in (USER_MODULE, USER_PACKAGE, f"{USER_PACKAGE}.scoring"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(root))
    yield USER_MODULE
    for name in (USER_MODULE, USER_PACKAGE, f"{USER_PACKAGE}.scoring"):
        sys.modules.pop(name, None)


def write_reward_file(folder: Path, name: str = "r.py", value: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(
        textwrap.dedent(
            f"""
            LIMIT = 10

            def brevity(prompts, completions, **kwargs):
                return [{value} if len(c) <= LIMIT else 0.0 for c in completions]
            """
        )
    )
    return path


# ---------------------------------------------------------------------------------------------
# Built-in names


def test_builtin_name_resolves_to_the_function():
    assert resolve_reward("exact_answer") is exact_answer
    assert BUILTIN["exact_answer"] is exact_answer


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("exact_anwser", "did you mean 'exact_answer'?"),
        ("exact_answers", "did you mean 'exact_answer'?"),
        ("Exact_Answer", "did you mean 'exact_answer'?"),
    ],
)
def test_unknown_name_suggests_the_closest_builtin(name, hint):
    with pytest.raises(RewardLookupError, match=re.escape(hint)) as info:
        resolve_reward(name)
    message = str(info.value)
    assert repr(name) in message
    assert "exact_answer" in message and "./file.py:function" in message


def test_unknown_name_without_close_match_lists_builtins():
    with pytest.raises(RewardLookupError) as info:
        resolve_reward("zzz")
    assert "did you mean" not in str(info.value)
    assert "Built-in rewards: code_tests, exact_answer, format_regex" in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------
# Dotted paths


@pytest.mark.parametrize(
    "name",
    [
        f"{USER_MODULE}:brevity",
        f"{USER_MODULE}.brevity",
        f"{USER_PACKAGE}.scoring:brevity",
        f"{USER_PACKAGE}.scoring.brevity",
    ],
)
def test_dotted_path_resolves(user_module, name):
    fn = resolve_reward(name)
    assert fn.__name__ == "brevity"
    assert fn(prompts=["p", "p"], completions=["abc", "abcd"]) == [1.0, 0.0]


def test_both_dotted_forms_give_the_same_function(user_module):
    assert resolve_reward(f"{USER_MODULE}:brevity") is resolve_reward(f"{USER_MODULE}.brevity")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (f"{USER_MODULE}:brevty", "has no 'brevty'; did you mean 'brevity'?"),
        (f"{USER_MODULE}.need_answer", "has no 'need_answer'; did you mean 'needs_answer'?"),
        (f"{USER_MODULE}:THRESHOLD", "'THRESHOLD' is not callable"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("no_such_pkg_xyz.mod.fn", "cannot import module 'no_such_pkg_xyz.mod'"),
    ],
)
def test_dotted_path_errors(user_module, name, message):
    with pytest.raises(RewardLookupError, match=re.escape(message)) as info:
        resolve_reward(name)
    assert repr(name) in str(info.value)


# ---------------------------------------------------------------------------------------------
# File paths


def test_file_path_relative_to_cwd(tmp_path, monkeypatch):
    write_reward_file(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    fn = resolve_reward("./r.py:brevity")
    assert fn(prompts=["p", "p"], completions=["short", "x" * 11]) == [1.0, 0.0]


def test_file_path_relative_to_base_dir(tmp_path, monkeypatch):
    write_reward_file(tmp_path / "config" / "rewards")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    fn = resolve_reward("./rewards/r.py:brevity", base_dir=tmp_path / "config")
    assert fn(prompts=["p"], completions=["ok"]) == [1.0]
    fn = resolve_reward("rewards/r.py:brevity", base_dir=str(tmp_path / "config"))
    assert fn(prompts=["p"], completions=["ok"]) == [1.0]


def test_file_in_cwd_wins_over_base_dir(tmp_path, monkeypatch):
    write_reward_file(tmp_path / "work", value=1.0)
    write_reward_file(tmp_path / "config", value=2.0)
    monkeypatch.chdir(tmp_path / "work")
    fn = resolve_reward("./r.py:brevity", base_dir=tmp_path / "config")
    assert fn(prompts=["p"], completions=["ok"]) == [1.0]


def test_absolute_file_path(tmp_path):
    path = write_reward_file(tmp_path / "abs", value=3.0)
    fn = resolve_reward(f"{path}:brevity", base_dir=tmp_path / "unused")
    assert fn(prompts=["p"], completions=["ok"]) == [3.0]


def test_missing_file_lists_the_tried_paths(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "config").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(RewardLookupError, match="file not found") as info:
        resolve_reward("./nope.py:fn", base_dir=tmp_path / "config")
    message = str(info.value)
    assert str((tmp_path / "work" / "nope.py").resolve()) in message
    assert str((tmp_path / "config" / "nope.py").resolve()) in message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./r.py:brevty", "has no 'brevty'; did you mean 'brevity'?"),
        ("./r.py:LIMIT", "'LIMIT' is not callable"),
        ("./r.py", "name the function, as in './file.py:function'"),
    ],
)
def test_file_path_errors(tmp_path, monkeypatch, name, message):
    write_reward_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardLookupError, match=re.escape(message)) as info:
        resolve_reward(name)
    assert repr(name) in str(info.value)


# ---------------------------------------------------------------------------------------------
# TRL's own reward functions, unchanged, by dotted path


def conversation(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    "name", ["trl.rewards:think_format_reward", "trl.rewards.think_format_reward"]
)
def test_trl_reward_resolves_by_dotted_path(name):
    from trl.rewards import think_format_reward

    assert resolve_reward(name) is think_format_reward


# think_format_reward: re.match(r"^<think>(?!.*<think>)(.*?)</think>.*$", content, DOTALL)
THINK_TABLE = [
    ("<think>\nThis is my reasoning.\n</think>\nThis is my answer.", "4", 1.0),
    ("<think>\nThis is my reasoning.\nThis is my answer.", "4", 0.0),  # never closed
    ("<think></think>4", "4", 1.0),  # empty reasoning still matches
    ("The answer <think>x</think>", "4", 0.0),  # must start with <think>
    (" <think>x</think>", "4", 0.0),  # not even after a space
    ("<think>a</think><think>b</think>", "4", 0.0),  # a second <think> is refused
    ("4", "4", 0.0),
]


def test_trl_think_format_reward_in_a_rubric():
    fmt = resolve_reward("trl.rewards:think_format_reward")
    rubric = Rubric(
        [RewardTerm("think_format", fmt, 0.5), RewardTerm("exact", exact_answer, 1.0)],
        columns=["answer"],
    )
    completions = [conversation(text) for text, _, _ in THINK_TABLE]
    answers = [answer for _, answer, _ in THINK_TABLE]
    scores = rubric.score(["q"] * len(THINK_TABLE), completions, {"answer": answers})
    expected_format = [expected for _, _, expected in THINK_TABLE]
    expected_exact = [1.0 if text == "4" else 0.0 for text, _, _ in THINK_TABLE]
    assert scores.components == {"think_format": expected_format, "exact": expected_exact}
    assert scores.total == pytest.approx(
        [0.5 * f + e for f, e in zip(expected_format, expected_exact, strict=True)]
    )
    assert scores.metrics()["reward/think_format"] == pytest.approx(2 / 7)


def test_trl_accuracy_reward_signature_is_checked():
    # accuracy_reward(completions, solution, log_extra=None, **kwargs) needs a `solution` column
    fn = resolve_reward("trl.rewards:accuracy_reward")
    with pytest.raises(TypeError, match=r"reward 'accuracy'.*\['solution'\]"):
        Rubric([RewardTerm("accuracy", fn)], columns=["answer"])
    Rubric([RewardTerm("accuracy", fn)], columns=["solution"])


def test_trl_factory_needs_its_options():
    # get_soft_overlong_punishment(max_completion_len, soft_punish_cache) builds a reward
    with pytest.raises(RewardLookupError, match=r"needs option\(s\) \['max_completion_len', "):
        resolve_reward("trl.rewards:get_soft_overlong_punishment")


def test_trl_factory_is_built_with_its_options():
    fn = resolve_reward(
        "trl.rewards:get_soft_overlong_punishment",
        args={"max_completion_len": 4, "soft_punish_cache": 2},
    )
    scores = Rubric([RewardTerm("overlong", fn)]).score(
        ["p"] * 3, ["a", "b", "c"], completion_ids=[[1], [1, 2, 3], [1] * 5]
    )
    assert scores.components["overlong"] == [0.0, -0.5, -1.0]


@pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None,
    reason="trl's accuracy_reward needs math_verify",
)
def test_trl_accuracy_reward_table():
    fn = resolve_reward("trl.rewards:accuracy_reward")
    table = [
        (r"My answer is \boxed{\frac{1}{3}}", r"\frac{1}{3}", 1.0),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}", 0.0),
        ("The answer is 4", "$4$", 0.0),  # no anchor (boxed / latex): not extracted
        (r"\boxed{5}", "$5$", 1.0),
    ]
    rubric = Rubric([RewardTerm("accuracy", fn)], columns=["solution"])
    scores = rubric.score(
        ["q"] * len(table),
        [conversation(c) for c, _, _ in table],
        {"solution": [s for _, s, _ in table]},
    )
    assert scores.components["accuracy"] == [e for _, _, e in table]


@pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is not None, reason="math_verify is installed"
)
def test_trl_accuracy_reward_without_its_dependency_is_an_error_not_zero():
    fn = resolve_reward("trl.rewards:accuracy_reward")
    rubric = Rubric([RewardTerm("accuracy", fn)], columns=["solution"])
    with pytest.raises(RewardError, match="reward 'accuracy' raised ImportError.*math_verify"):
        rubric.score(["q"], [conversation(r"\boxed{1}")], {"solution": ["1"]})


# ---------------------------------------------------------------------------------------------
# build_rubric and reward_columns (posttrain.reward_setup)


def test_build_rubric_names_weights_and_functions(tmp_path, monkeypatch, user_module):
    from trl.rewards import think_format_reward

    write_reward_file(tmp_path / "config")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    specs = [
        RewardSpec(name="exact_answer"),
        RewardSpec(name="trl.rewards:think_format_reward", weight=0.5),
        RewardSpec(name="./r.py:brevity", weight=0.0),  # resolved against base_dir
        RewardSpec(name=f"{USER_PACKAGE}.scoring.needs_answer", weight=-1.0),
    ]
    rubric = build_rubric(specs, ["prompt", "answer"], base_dir=tmp_path / "config")
    assert [(t.name, t.weight) for t in rubric.terms] == [
        ("exact_answer", 1.0),
        ("think_format_reward", 0.5),
        ("brevity", 0.0),
        ("needs_answer", -1.0),
    ]
    assert rubric.terms[0].fn is exact_answer
    assert rubric.terms[1].fn is think_format_reward
    assert rubric.terms[2].fn(prompts=["p"], completions=["ok"]) == [1.0]


def test_build_rubric_scores_rows_end_to_end(tmp_path, monkeypatch):
    write_reward_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    rows = [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2=", "answer": 4},
        {"prompt": "3+3=", "answer": "6"},
    ]
    specs = [RewardSpec(name="exact_answer"), RewardSpec(name="./r.py:brevity", weight=0.25)]
    rubric = build_rubric(specs, list(rows[0]), base_dir=None)
    completions = ["2", " 4 ", "x" * 11]
    scores = rubric.score([r["prompt"] for r in rows], completions, reward_columns(rows))
    assert scores.components == {"exact_answer": [1.0, 1.0, 0.0], "brevity": [1.0, 1.0, 0.0]}
    assert scores.total == [1.25, 1.25, 0.0]
    assert scores.metrics(prefix="train/reward") == pytest.approx(
        {
            "train/reward/total": 2.5 / 3,
            "train/reward/exact_answer": 2 / 3,
            "train/reward/brevity": 2 / 3,
        }
    )


def test_build_rubric_checks_columns_without_prompt_and_completion(user_module):
    # `prompt` and `completion` are data columns but, as in TRL, never reward keywords
    spec = RewardSpec(name=f"{USER_MODULE}:wants_prompt")
    with pytest.raises(TypeError, match=r"'wants_prompt' needs column\(s\) \['prompt'\]"):
        build_rubric([spec], ["prompt", "completion", "answer"], base_dir=None)


def test_build_rubric_missing_column_fails_at_build(user_module):
    spec = RewardSpec(name=f"{USER_MODULE}:needs_answer")
    with pytest.raises(
        TypeError, match=r"'needs_answer' needs column\(s\) \['answer'\].*\['level'\]"
    ):
        build_rubric([spec], ["prompt", "level"], base_dir=None)


def test_build_rubric_unknown_reward_fails_at_build():
    with pytest.raises(RewardLookupError, match="did you mean 'exact_answer'"):
        build_rubric([RewardSpec(name="exact_anser")], ["prompt", "answer"], base_dir=None)


def test_build_rubric_rejects_two_rewards_with_the_same_short_name(user_module):
    specs = [
        RewardSpec(name=f"{USER_MODULE}:brevity"),
        RewardSpec(name=f"{USER_PACKAGE}.scoring:brevity"),
    ]
    with pytest.raises(ValueError, match="'brevity'"):
        build_rubric(specs, ["prompt"], base_dir=None)


def test_build_rubric_accepts_trl_reward_taking_completion_ids(user_module):
    build_rubric([RewardSpec(name=f"{USER_MODULE}:overlong")], ["prompt", "answer"], None)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"prompt": "p", "answer": "a"}], {"answer": ["a"]}),
        (
            [
                {"prompt": "p0", "completion": "c0", "answer": 1, "level": "easy"},
                {"prompt": "p1", "completion": "c1", "answer": 2, "level": "hard"},
            ],
            {"answer": [1, 2], "level": ["easy", "hard"]},
        ),
        ([{"prompt": "p0", "answer": 1}, {"prompt": "p1"}], {"answer": [1, None]}),
        ([{"prompt": "p0"}, {"prompt": "p1"}], {}),
        ([{"question": "q", "solution": "s"}], {"question": ["q"], "solution": ["s"]}),
    ],
)
def test_reward_columns_table(rows, expected):
    columns = reward_columns(rows)
    assert columns == expected
    assert list(columns) == list(expected)  # column order follows the first row


def test_trl_length_reward_receives_completion_ids():
    from trl.rewards import get_soft_overlong_punishment

    fn = get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)
    rubric = build_rubric([RewardSpec(name="exact_answer")], ["prompt", "answer"], None)
    rubric = Rubric([*rubric.terms, RewardTerm("overlong", fn)], columns=["answer"])
    scores = rubric.score(
        ["p", "p"], ["1", "12345"], {"answer": ["1", "2"]}, [[1], [1, 2, 3, 4, 5]]
    )
    # TRL: 0 up to max_len - cache (2 tokens), linear to -1 at max_len, -1 beyond.
    assert scores.components["overlong"] == [0.0, -1.0]


# ---------------------------------------------------------------------------------------------
# reward_inputs: TRL's text and conversational formats


def test_reward_inputs_text_rows_pass_text():
    rows = [{"prompt": "1+1=", "answer": "2"}]
    assert reward_inputs(rows, ["1+1="], ["2"]) == (["1+1="], ["2"])


def test_reward_inputs_chat_rows_pass_messages_as_trl_does():
    user = [{"role": "user", "content": "1+1="}]
    rows = [
        {"prompt": user},
        {"messages": [*user, {"role": "assistant", "content": "2"}]},
        {"messages": user},
    ]
    prompts, completions = reward_inputs(rows, ["<templated>"] * 3, ["2", "3", "4"])
    assert prompts == [user, user, user]
    assert completions == [[{"role": "assistant", "content": c}] for c in ("2", "3", "4")]


def test_trl_conversational_reward_scores_chat_samples_through_the_rubric():
    # think_format_reward reads completion[0]["content"]: TRL's conversational format
    rubric = build_rubric([RewardSpec(name="trl.rewards:think_format_reward")], ["prompt"], None)
    user = [{"role": "user", "content": "q"}]
    prompts, completions = reward_inputs(
        [{"prompt": user}] * 2, ["t"] * 2, ["<think>x</think>4", "4"]
    )
    assert rubric.score(prompts, completions).total == [1.0, 0.0]


# -- learned rewards trained on without a gate --------------------------------------------------


def test_ungated_learned_reward_beside_a_verifier_is_warned_about():
    from posttrain.config.schema import RewardSpec
    from posttrain.reward_setup import ungated_learned_rewards

    specs = [
        RewardSpec(name="math_answer", label="correct"),
        RewardSpec(name="reward_model", label="rm", weight=0.5),
        RewardSpec(name="judge_score", weight=0.2, gate="correct"),  # gated: fine
        RewardSpec(name="judge_score", label="monitor", weight=0.0),  # logged only: fine
    ]
    (warning,) = ungated_learned_rewards(specs)
    assert "'rm'" in warning and "reward_model" in warning and "weight 0.5" in warning
    assert "`gate: correct`" in warning


def test_learned_reward_alone_or_gated_is_not_warned_about():
    from posttrain.config.load import load_config
    from posttrain.config.schema import RewardSpec
    from posttrain.reward_setup import ungated_learned_rewards

    assert ungated_learned_rewards([RewardSpec(name="reward_model")]) == []  # plain RLHF
    rm_config = load_config(Path(__file__).parent.parent / "configs" / "rm.yaml")
    grpo = next(s for s in rm_config.stages if s.name == "grpo")
    assert [s.name for s in grpo.rewards].count("reward_model") == 2  # gated, and weight 0
    assert ungated_learned_rewards(grpo.rewards) == []
