"""`posttrain rewards list` and `posttrain rewards score` on real files.

Run: `pytest tests/test_rewards_cli.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.cli import main

ROWS = [
    {"prompt": "1+1=", "completion": "2", "answer": "2"},
    {"prompt": "2+2=", "completion": "5", "answer": "4"},
    {"prompt": "3+3=", "completion": "6", "answer": 6},
    {"prompt": "4+4=", "completion": "eight", "answer": "8"},
    {"prompt": "5+5=", "completion": "10", "answer": "10"},
]

REWARD_FILE = textwrap.dedent(
    """
    from rewards import Scored

    def digits(prompts, completions, **kwargs):
        return [Scored(1.0, "") if c.isdigit() else Scored(0.0, f"{c!r} is not a number")
                for c in completions]

    def bonus(prompts, completions, **kwargs):
        return [0.5 for _ in completions]
    """
)

REWARDS_YAML = textwrap.dedent(
    """
    rewards:
      - {name: exact_answer, weight: 1.0}
      - {name: ./my_rewards.py:digits, weight: 0.0}
      - {name: ./my_rewards.py:bonus, weight: 2.0, gate: exact_answer, label: judged}
    """
)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    (tmp_path / "rewards.yaml").write_text(REWARDS_YAML)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


def score(files: Path, *extra: str, config: str = "rewards.yaml") -> int:
    return main(
        [
            "rewards",
            "score",
            "--config",
            str(files / config),
            "--input",
            str(files / "in.jsonl"),
            "--output",
            str(files / "out" / "scored.jsonl"),
            *extra,
        ]
    )


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_writes_every_row_with_components_total_and_feedback(files, capsys):
    assert score(files, "--batch-size", "2") == 0
    out = read(files / "out" / "scored.jsonl")
    assert [r["prompt"] for r in out] == [r["prompt"] for r in ROWS]  # order and rows kept
    assert out[2]["answer"] == 6  # input columns come back unchanged
    assert [r["rewards"]["exact_answer"] for r in out] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert [r["rewards"]["digits"] for r in out] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert [r["rewards"]["judged"] for r in out] == [0.5, None, 0.5, None, 0.5]
    assert [r["reward"] for r in out] == [2.0, 0.0, 2.0, 0.0, 2.0]
    assert out[3]["feedback"] == {"digits": "'eight' is not a number"}
    assert "feedback" not in out[0]
    printed = capsys.readouterr().out
    assert "scored 5 rows" in printed
    lines = {line.split()[0]: line.split() for line in printed.splitlines() if line.strip()}
    assert lines["exact_answer"][1:4] == ["0.6000", "5", "0"]
    assert lines["judged"][1:4] == ["0.5000", "3", "2"]  # 2 gated out: not applicable
    assert lines["total"][2] == "1.2000"


def test_score_with_a_pipeline_config_and_stage(files):
    (files / "pipe.yaml").write_text(
        textwrap.dedent(
            """
            stages:
              - {name: warm, algo: sft, data: {source: builtin://arithmetic}}
              - name: rl
                algo: grpo
                data: {source: builtin://arithmetic}
                rewards: [{name: ./my_rewards.py:digits}]
            """
        )
    )
    assert score(files, "--stage", "rl", config="pipe.yaml") == 0
    assert [r["reward"] for r in read(files / "out" / "scored.jsonl")] == [1, 1, 1, 0, 1]
    assert score(files, config="pipe.yaml") == 0  # the first stage with rewards
    assert score(files, "--stage", "warm", config="pipe.yaml") == 2


def test_score_gives_completion_ids_from_a_tokenizer(files, tiny_path):
    (files / "len.yaml").write_text(
        "rewards: [{name: trl.rewards:get_soft_overlong_punishment, "
        "args: {max_completion_len: 4, soft_punish_cache: 2}}]\n"
    )
    assert score(files, "--tokenizer", tiny_path, config="len.yaml") == 0
    # digit strings are one token per digit in the tiny tokenizer; "eight" is 5 bytes
    out = read(files / "out" / "scored.jsonl")
    assert [r["reward"] for r in out] == [0.0, 0.0, 0.0, -1.0, 0.0]


@pytest.mark.parametrize(
    ("yaml_text", "rows", "message"),
    [
        ("rewards: [{name: exact_anser}]", ROWS, "did you mean 'exact_answer'"),
        ("rewards: [{name: exact_answer, wieght: 2}]", ROWS, "unknown key; did you mean 'weight'"),
        ("rewards: []", ROWS, "rewards: List should have at least 1 item"),
        ("rewards: [{name: exact_answer}]", [{"prompt": "p", "completion": "c"}], "['answer']"),
        ("rewards: [{name: exact_answer}]", [{"prompt": "p", "answer": "1"}], "row 0 has no"),
        (
            "rewards: [{name: ./my_rewards.py:bonus, gate: nope}]",
            ROWS,
            "gated on 'nope', which is not a reward",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_no_output(
    files, capsys, yaml_text, rows, message
):
    (files / "bad.yaml").write_text(yaml_text + "\n")
    (files / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score(files, config="bad.yaml") == 2
    assert message in capsys.readouterr().err
    assert not (files / "out" / "scored.jsonl").exists()
    assert not list((files / "out").glob("*.partial")) if (files / "out").exists() else True


def test_a_failing_reward_leaves_no_partial_output(files, capsys):
    (files / "my_rewards.py").write_text(
        REWARD_FILE + "\ndef boom(prompts, completions, **kwargs):\n    raise OSError('disk')\n"
    )
    (files / "boom.yaml").write_text("rewards: [{name: ./my_rewards.py:boom}]\n")
    assert score(files, config="boom.yaml") == 2
    assert "reward 'boom' raised OSError: disk" in capsys.readouterr().err
    assert list((files / "out").iterdir()) == []


def test_list_runs_as_a_console_command():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "posttrain"), "rewards", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in ("exact_answer", "math_answer", "length_band", "code_tests", "judge_score"):
        assert f"  {name} " in result.stdout
    assert "failed to load" not in result.stdout
