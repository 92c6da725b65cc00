"""Code-execution reward: the fraction of a row's test cases that the completion's code passes.

`code_tests(...)` builds a reward with TRL's signature. For each completion it takes the code
(the last ```python fenced block, or the whole text when there is none), and for each test
of the row (a string: an `assert` statement or a small script) runs `code`, `test` and an
end marker as one program in its own bubblewrap sandbox (`rewards.sandbox`). A test passes
when its program prints the marker (a random token per run) last and exits with status 0
inside the limits. The marker defeats the cheap reward hacks that end the program before the
test runs (`sys.exit(0)`, `os._exit(0)`, an exit-0 `sys.excepthook`, re-running under `-O`
to strip asserts); code that digs the token out of its own source or frames is not stopped,
and neither are objects whose `__eq__` is always true. One run per test keeps tests independent:
a test that crashes, loops or exits cannot hide the others, and code that crashes on its own
fails every test (score 0). The score is passed / total; the feedback is the stderr of the
failing tests (interpreter error text as feedback, as in LeTI), cut to `feedback_chars`.
Rows whose tests are missing or empty score None (not applicable).

Programs run as `__main__` with empty stdin, so code whose `if __name__ == "__main__":` block
reads input fails the tests; prompts should ask for functions. A test that ends the program
itself (even `sys.exit(0)`) fails. Only Python is supported.
Test: `pytest -q tests/test_code_exec.py`.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Sequence
from typing import Any

from rewards.sandbox import Limits, RunResult, Sandbox
from rewards.text import completion_text
from rewards.types import Reward, Scored

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_LANGUAGE_TAGS = {"python": {"python", "py", "python3", ""}}
# Appended after the test: written straight to fd 1 (a replaced sys.stdout cannot swallow it),
# withheld when asserts were stripped (-O / PYTHONOPTIMIZE).
_END = "import os as _os, sys as _sys\nif not _sys.flags.optimize: _os.write(1, b'\\n{token}\\n')\n"


def extract_code(text: str, language: str = "python") -> str:
    """The last fenced block tagged `language` (or untagged), else the whole text.

    A block left open at the end of the text (a completion cut at max tokens) counts up to
    the end of the text.
    """
    tags = _LANGUAGE_TAGS[language]
    blocks = [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in tags]
    return blocks[-1] if blocks else text


def code_tests(
    *,
    tests_column: str = "tests",
    language: str = "python",
    timeout: float = 5.0,
    memory_mb: int = 512,
    processes: int = 16,
    max_concurrent: int = 4,
    feedback_chars: int = 2000,
) -> Reward:
    """A reward scoring each completion by the fraction of its row's tests that pass.

    Args:
        tests_column: dataset column holding, per row, a list of test strings.
        language: language of the code; only "python".
        timeout: wall-clock seconds per test run (sandbox start-up included); the CPU-time
            limit is the same, rounded up.
        memory_mb: address-space limit per process, MiB.
        processes: processes and threads per sandbox.
        max_concurrent: sandboxes running at once.
        feedback_chars: at most this many characters of failing tests' stderr are kept.
    """
    if not isinstance(tests_column, str) or not tests_column:
        raise ValueError(f"code_tests: tests_column must be a column name, got {tests_column!r}")
    if language not in _LANGUAGE_TAGS:
        raise ValueError(
            f"code_tests: language must be one of {sorted(_LANGUAGE_TAGS)}, got {language!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"code_tests: timeout must be a number of seconds > 0, got {timeout!r}")
    for name, value, least in [
        ("memory_mb", memory_mb, 32),
        ("processes", processes, 2),
        ("max_concurrent", max_concurrent, 1),
        ("feedback_chars", feedback_chars, 0),
    ]:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"code_tests: {name} must be an integer >= {least}, got {value!r}")
    limits = Limits(
        cpu_seconds=math.ceil(timeout),
        memory_mb=memory_mb,
        processes=processes,
        wall_seconds=float(timeout),
    )
    sandbox = Sandbox(limits, max_concurrent=max_concurrent)  # fails now if bwrap cannot run

    def reward(prompts: list, completions: list, **columns: Any) -> list[Scored | None]:
        if tests_column not in columns:
            raise KeyError(
                f"code_tests needs the dataset column {tests_column!r} (a list of test strings "
                f"per row); columns given: {sorted(columns)}. Set tests_column= to rename it"
            )
        rows = columns[tests_column]
        if len(rows) != len(completions):
            raise ValueError(
                f"code_tests: {len(completions)} completions but {len(rows)} rows of "
                f"{tests_column!r}"
            )
        tests = [_row_tests(row, i, tests_column) for i, row in enumerate(rows)]
        programs, owners, tokens = [], [], []
        for i, (completion, row_tests) in enumerate(zip(completions, tests, strict=True)):
            code = extract_code(completion_text(completion), language)
            for test in row_tests:
                tokens.append(secrets.token_hex(16))
                programs.append(f"{code}\n\n{test}\n\n{_END.format(token=tokens[-1])}")
                owners.append(i)
        outcomes: list[list[tuple[bool, RunResult]]] = [[] for _ in completions]
        for i, token, result in zip(owners, tokens, sandbox.run_many(programs), strict=True):
            outcomes[i].append((result.ok and result.stdout.endswith(f"\n{token}\n"), result))
        return [
            _scored(row, feedback_chars) if row_tests else None
            for row, row_tests in zip(outcomes, tests, strict=True)
        ]

    reward.__name__ = "code_tests"
    reward.__qualname__ = "code_tests"
    return reward


def _row_tests(row: Any, index: int, column: str) -> list[str]:
    """The row's tests as a list of strings; None or [] -> [] (the reward does not apply)."""
    if row is None:
        return []
    if isinstance(row, str) or not isinstance(row, Sequence):
        raise ValueError(
            f"code_tests: column {column!r}, row {index}: expected a list of test strings "
            f"(e.g. ['assert add(1, 2) == 3']), got {type(row).__name__}: {str(row)[:80]!r}"
        )
    for j, test in enumerate(row):
        if not isinstance(test, str):
            raise ValueError(
                f"code_tests: column {column!r}, row {index}, test {j}: expected a string, "
                f"got {type(test).__name__}: {str(test)[:80]!r}"
            )
    return list(row)


def _scored(outcomes: list[tuple[bool, RunResult]], feedback_chars: int) -> Scored:
    failed = [(j, result) for j, (passed, result) in enumerate(outcomes) if not passed]
    score = (len(outcomes) - len(failed)) / len(outcomes)
    return Scored(score, _feedback(failed, len(outcomes), feedback_chars))


def _feedback(failed: list[tuple[int, RunResult]], total: int, limit: int) -> str:
    """Each failing test's status and the end of its stderr (where the error is), within
    `limit` characters shared between the failing tests; tests past the limit are counted."""
    if not failed or limit == 0:
        return ""
    share = min(max(limit // len(failed), 300), limit)
    parts: list[str] = []
    used = 0
    for k, (j, result) in enumerate(failed):
        status = "ended before the test finished" if result.ok else result.status
        head = f"test {j + 1}/{total} failed ({status})"
        stderr, room = result.stderr.strip(), share - len(head) - 2
        if len(stderr) > room:
            stderr = "..." + stderr[len(stderr) - room + 3 :] if room > 3 else ""
        part = f"{head}:\n{stderr}" if stderr else head
        if used + len(part) > limit:
            parts.append(f"({len(failed) - k} more failing tests)")
            break
        parts.append(part)
        used += len(part) + 2
    return "\n\n".join(parts)[:limit]
