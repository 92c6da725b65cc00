"""The code-execution reward: tables of completions and tests -> fraction of tests passed.

Runs real bubblewrap sandboxes (no mocks). Run: `pytest -q tests/test_code_exec.py`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from rewards.code_exec import code_tests, extract_code
from rewards.types import Scored

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap missing: apt-get install bubblewrap"
)

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


@pytest.fixture(scope="module")
def reward():
    return code_tests(timeout=2.0, memory_mb=256, max_concurrent=2)


def score_one(reward, completion, tests) -> Scored | None:
    (result,) = reward(prompts=["Write add."], completions=[completion], tests=[tests])
    return result


@pytest.mark.parametrize(
    ("completion", "tests", "expected"),
    [
        (f"```python\n{ADD}```", ADD_TESTS, 1.0),
        (ADD, ADD_TESTS, 1.0),  # no fence: the whole text is the code
        ("def add(a, b): return a * b", ["assert add(2, 2) == 4", "assert add(1, 2) == 3"], 0.5),
        ("```python\ndef add(a, b)\n    return a + b\n```", ADD_TESTS, 0.0),  # syntax error
        ("raise RuntimeError('crash on import')\n" + ADD, ADD_TESTS, 0.0),
        ("def add(a, b):\n    while True: pass", ADD_TESTS, 0.0),  # loops: killed, 0
        ("def add(a, b):\n    return add(a, b)", ADD_TESTS, 0.0),  # RecursionError
        # a failing, exiting or looping test does not hide the others
        (ADD, ["assert add(1, 2) == 3", "assert add(1, 2) == 4", "assert add(0, 0) == 0"], 2 / 3),
        (ADD, ["import sys; sys.exit(1)", "while True: pass", "assert add(2, 3) == 5"], 1 / 3),
        # the last python block counts; an untagged fence counts; other languages do not
        (
            f"Wrong:\n```python\ndef add(a, b): return 0\n```\nFixed:\n```py\n{ADD}```",
            ADD_TESTS,
            1.0,
        ),
        (f"```\n{ADD}```", ADD_TESTS, 1.0),
        (f"```python\n{ADD}```\nRun it:\n```bash\npython add.py\n```", ADD_TESTS, 1.0),
        (f"```bash\necho {ADD}```", ADD_TESTS, 0.0),
        (f"```python\n{ADD}", ADD_TESTS, 1.0),  # cut at max tokens: open fence to the end
        ([{"role": "assistant", "content": f"Sure:\n```python\n{ADD}```"}], ADD_TESTS, 1.0),
        ("print('no add here')", ADD_TESTS, 0.0),
    ],
)
def test_fraction_of_tests_passed(reward, completion, tests, expected):
    result = score_one(reward, completion, tests)
    assert isinstance(result, Scored)
    assert result.score == pytest.approx(expected), result.feedback
    assert (result.feedback == "") == (expected == 1.0)


@pytest.mark.parametrize(
    "hack",
    [
        "import sys; sys.exit(0)",
        "import os; os._exit(0)",
        "exit()",
        "import os, sys\nsys.excepthook = lambda *args: os._exit(0)",
        "import sys\nsys.stdout = open('/dev/null', 'w')\nimport atexit, os\natexit.register(os._exit, 0)",
        # re-run with asserts stripped
        "import os, sys\nif not sys.flags.optimize:\n    os.execv(sys.executable, [sys.executable, '-O', *sys.argv])",
    ],
)
def test_ending_the_program_early_scores_zero(reward, hack):
    result = score_one(reward, f"{ADD}\n{hack}\n", ["assert add(1, 2) == 4"])
    assert result.score == 0.0
    assert "failed" in result.feedback


@pytest.mark.parametrize("tests", [None, []])
def test_rows_without_tests_do_not_apply(reward, tests):
    assert score_one(reward, ADD, tests) is None


def test_rows_are_scored_independently(reward):
    completions = [ADD, "def add(a, b): return 0", "syntax error (", ADD]
    tests = [ADD_TESTS, ["assert add(0, 0) == 0", "assert add(1, 1) == 2"], ["assert True"], None]
    results = reward(prompts=[""] * 4, completions=completions, tests=tests)
    assert [r.score if r else None for r in results] == [1.0, 0.5, 0.0, None]


def test_feedback_holds_the_error_text(reward):
    result = score_one(
        reward, ADD, ["assert add(1, 2) == 3", "assert add(1, 2) == 4, 'add(1, 2) should be 4'"]
    )
    assert result.score == 0.5
    assert result.feedback.startswith("test 2/2 failed (exit status 1):")
    assert "AssertionError: add(1, 2) should be 4" in result.feedback


def test_feedback_is_bounded():
    reward = code_tests(timeout=2.0, feedback_chars=400)
    noisy = "import sys\nsys.stderr.write('noise ' * 5000)\n" + ADD
    tests = [f"assert add({i}, 0) == -1, 'wrong {i}'" for i in range(4)]
    result = score_one(reward, noisy, tests)
    assert result.score == 0.0 and len(result.feedback) <= 400
    assert "AssertionError: wrong 0" in result.feedback  # the end of stderr is kept
    timed_out = score_one(reward, "import time; time.sleep(9)", ["pass"])
    assert timed_out.feedback.startswith("test 1/1 failed (timed out")


def test_escape_attempts_score_zero(reward, tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    (tmp_path / "secret").write_text(secret)
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", secret)
    escaped = f"/work/escape-{secret}"
    sentinel = subprocess.Popen(["sleep", "30"])
    attempts = [
        (f"value = open({str(tmp_path / 'secret')!r}).read()", f"assert value == {secret!r}"),
        (
            "import os\nvalue = os.environ.get('POSTTRAIN_TEST_SECRET')",
            f"assert value == {secret!r}",
        ),
        (f"open({escaped!r}, 'w').write('x')", "pass"),
        ("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", "pass"),
        (f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", "pass"),
        (f"import os, signal\nos.kill({sentinel.pid}, signal.SIGKILL)", "pass"),
        ("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", "pass"),
        ("x = bytearray(1 << 32)", "pass"),
        ("while True: print('spam' * 1000)", "pass"),
        ("import time; time.sleep(60)", "pass"),
    ]
    try:
        results = reward(
            prompts=[""] * len(attempts),
            completions=[code for code, _ in attempts],
            tests=[[test] for _, test in attempts],
        )
        assert sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()
    assert [r.score for r in results] == [0.0] * len(attempts), [r.feedback for r in results]
    assert not os.path.exists(escaped)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"language": "rust"}, "language"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"memory_mb": 8}, "memory_mb"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"processes": 1}, "processes"),
        ({"feedback_chars": -1}, "feedback_chars"),
        ({"tests_column": ""}, "tests_column"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        code_tests(**options)


def test_bad_columns_are_reported(reward):
    with pytest.raises(KeyError, match="'tests'"):
        reward(prompts=[""], completions=[ADD], test_cases=[ADD_TESTS])
    with pytest.raises(ValueError, match="row 1: expected a list of test strings"):
        reward(prompts=["", ""], completions=[ADD, ADD], tests=[ADD_TESTS, "assert True"])
    with pytest.raises(ValueError, match="row 0, test 1: expected a string"):
        reward(prompts=[""], completions=[ADD], tests=[["assert True", 3]])
    other = code_tests(tests_column="test_cases", timeout=2.0)
    assert other(prompts=[""], completions=[ADD], test_cases=[ADD_TESTS])[0].score == 1.0
    assert other.__name__ == "code_tests"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("x = 1", "x = 1"),
        ("```python\na\n```\n```python\nb\n```", "b\n"),
        ("```Python3 title='x'\na\n```", "a\n"),
        ("```js\na\n```", "```js\na\n```"),
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code
