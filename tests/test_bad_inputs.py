"""A catalogue of bad inputs and configs, each with the exact error `posttrain run` must give.

Every case runs the real command line (`posttrain.cli.main`) in a scratch folder and checks
the exit code 2 and the message on stderr: it names the file, row, column or key, and what
was expected. Run: `pytest tests/test_bad_inputs.py`.
"""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main

SFT = "{name: sft, algo: sft, data: {source: DATA}, train: {max_steps: 1, batch_size: 2, max_length: 16}}"
GRPO = (
    "{name: rl, algo: grpo, iterations: 1, data: {source: DATA}, "
    "rollout: {engine: hf, n: 2, max_new_tokens: 2}, grpo: {prompts_per_iteration: 1}, "
    "rewards: [REWARD]}"
)
DPO = "{name: d, algo: dpo, data: {source: DATA}, train: {max_steps: 1, batch_size: 1}}"

ROWS = [{"prompt": "1+1=", "completion": "2", "answer": "2"}] * 4


def pipeline(stage: str, data: str = "rows.jsonl", reward: str = "{name: exact_answer}",
             top: str = "") -> str:  # fmt: skip
    stage = stage.replace("DATA", data).replace("REWARD", reward)
    return f"run: {{name: bad, output_dir: out}}\ntracking: {{backend: jsonl}}\n{top}stages: [{stage}]\n"


def write_rows(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


CASES = [
    # --- configuration -----------------------------------------------------------------------
    ("unknown_top_key", pipeline(SFT, top="trainning: {}\n"), ROWS,
     "trainning: unknown key; did you mean 'tracking'?"),
    ("unknown_algo", pipeline(SFT.replace("algo: sft", "algo: sftt")), ROWS,
     "stages.0.algo: unknown algorithm 'sftt'; did you mean 'sft'?"),
    ("wrong_type", pipeline(SFT.replace("max_steps: 1", "max_steps: many")), ROWS,
     "stages.0.train.max_steps: Input should be a valid integer"),
    ("missing_stages", "run: {name: bad}\n", ROWS, "stages: Field required"),
    ("empty_stages", "stages: []\n", ROWS, "`stages` is empty; a pipeline needs at least one stage"),
    ("duplicate_stage", "stages: [" + SFT.replace("DATA", "rows.jsonl") + ", "
     + SFT.replace("DATA", "rows.jsonl") + "]\n", ROWS, "stage names must be unique; repeated: ['sft']"),
    ("grpo_without_rewards", pipeline(GRPO.replace("rewards: [REWARD]", "rewards: []")), ROWS,
     "a grpo stage needs at least one reward in `rewards`"),
    ("simpo_with_reference", pipeline(DPO.replace("algo: dpo,", "algo: dpo, dpo: {loss_type: simpo},")),
     ROWS, "loss_type simpo is reference-free: set reference: none"),
    ("negative_lr_schedule", pipeline(SFT.replace("max_steps: 1", "schedule: cosin")), ROWS,
     "stages.0.train.schedule: Input should be 'constant', 'linear' or 'cosine'"),
    ("not_yaml", "stages: [ {name: x\n", ROWS, "not valid YAML"),
    # --- data ---------------------------------------------------------------------------------
    ("missing_file", pipeline(SFT, data="nope.jsonl"), ROWS, "data file not found: nope.jsonl"),
    ("bad_json_line", pipeline(SFT), [ROWS[0], "{not json"], "rows.jsonl: line 2 is not valid JSON"),
    ("missing_prompt", pipeline(SFT), [ROWS[0], {"question": "1+1=", "completion": "2"}],
     "rows.jsonl: row 1 has no 'prompt' or 'messages' column (or it is empty)"),
    ("wrong_prompt_type", pipeline(SFT), [{"prompt": 12, "completion": "2"}],
     "rows.jsonl: row 0 column 'prompt' must be text, got int"),
    ("empty_completion", pipeline(SFT), [{"prompt": "1+1=", "completion": ""}] + ROWS,
     "rows.jsonl: row 0 column 'completion' is missing or empty"),
    ("prompt_too_long", pipeline(SFT), ROWS + [{"prompt": "1+" * 20 + "=", "completion": "2"}],
     "rows.jsonl: row 4 has 43 tokens, over train.max_length=16"),
    ("invalid_messages", pipeline(SFT), [{"messages": [{"role": "user"}]}],
     "rows.jsonl: row 0 column 'messages' must be a non-empty list of {'role': str, 'content': str}"),
    ("last_message_not_assistant", pipeline(SFT), [{"messages": [{"role": "user", "content": "hi"}]}],
     "rows.jsonl: row 0: the last message must be the assistant's answer to train on, got role 'user'"),
    ("pair_without_rejected", pipeline(DPO), [{"prompt": "1+1=", "chosen": "2"}],
     "rows.jsonl: row 0 has no 'rejected' column (or it is empty)"),
    ("mapping_from_missing_column",
     pipeline(SFT.replace("source: DATA", "source: DATA, columns: {prompt: question}")), ROWS,
     "rows.jsonl: data.columns maps from ['question'], which the data lacks"),
    ("unknown_builtin_data", pipeline(SFT, data="builtin://arithmetics"), ROWS,
     "unknown built-in data 'builtin://arithmetics' (have: arithmetic, arithmetic_pairs)"),
    # --- rewards ------------------------------------------------------------------------------
    ("unknown_reward", pipeline(GRPO, reward="{name: exact_answr}"), ROWS,
     "unknown reward 'exact_answr'; did you mean 'exact_answer'?"),
    ("reward_needs_column", pipeline(GRPO, reward="{name: trl.rewards:accuracy_reward}"), ROWS,
     "reward 'accuracy_reward' needs column(s) ['solution'], but the data has ['answer']"),
    ("unknown_reward_option", pipeline(GRPO, reward="{name: length_band, args: {max_len: 3}}"),
     ROWS, "reward 'length_band' has no option(s) ['max_len']; did you mean 'max_length' for 'max_len'?"),
    ("missing_reward_option", pipeline(GRPO, reward="{name: soft_overlong}"), ROWS,
     "reward 'soft_overlong' needs option(s) ['max_completion_len', 'cache_len'] under `args:`"),
    ("gate_on_unknown", pipeline(GRPO, reward="{name: exact_answer, gate: verifier}"), ROWS,
     "reward 'exact_answer' is gated on 'verifier', which is not a reward of this rubric"),
    ("unreachable_judge",
     pipeline(GRPO, reward="{name: judge_score, args: {base_url: 'http://127.0.0.1:9/v1', model: j}}"),
     ROWS, "judge endpoint http://127.0.0.1:9/v1 is unreachable"),
    # --- models and folders -------------------------------------------------------------------
    ("missing_model_folder", pipeline(SFT, top="model: {path: ./no-model}\n"), ROWS,
     "model.path './no-model': no such folder"),
    ("late_stage_error_found_at_start",
     pipeline(SFT + ", " + GRPO.replace("REWARD", "{name: no_such_reward}")), ROWS,
     "unknown reward 'no_such_reward'"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "rows", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_gives_its_exact_error(
    tmp_path, monkeypatch, capsys, tiny_cache, config, rows, message
):
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "rows.jsonl", rows)
    (tmp_path / "p.yaml").write_text(config)
    assert main(["run", "p.yaml"]) == 2
    stderr = capsys.readouterr().err
    assert "\nerror: " in "\n" + stderr, stderr
    err = stderr[stderr.rindex("error: ") :]  # after any progress bars
    assert message in err, err
    assert not (tmp_path / "out" / "sft" / "DONE").exists()


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_skip_policy_leaves_bad_rows_out_and_counts_them(tmp_path, monkeypatch, capsys, tiny_cache):
    monkeypatch.chdir(tmp_path)
    rows = [
        *ROWS,
        {"prompt": 12, "completion": "2"},
        {"prompt": "1+" * 20 + "=", "completion": "2"},
    ]
    write_rows(tmp_path / "rows.jsonl", rows)
    stage = SFT.replace("source: DATA", "source: DATA, on_bad_row: skip")
    (tmp_path / "p.yaml").write_text(pipeline(stage))
    assert main(["run", "p.yaml"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad row(s) of rows.jsonl (data.on_bad_row: skip):" in out
    assert "row 4 column 'prompt' must be text, got int" in out
    assert "row 5 has 43 tokens, over train.max_length=16" in out  # source row numbers kept
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/skipped_rows"] == 2.0


def test_changed_stage_in_an_existing_run_is_refused(tmp_path, monkeypatch, capsys, tiny_cache):
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "p.yaml").write_text(pipeline(SFT))
    assert main(["run", "p.yaml"]) == 0
    (tmp_path / "p.yaml").write_text(pipeline(SFT.replace("batch_size: 2", "batch_size: 4")))
    assert main(["run", "p.yaml"]) == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            "error: stage 'sft' finished in this run folder with another config (changed: "
            "train.batch_size); pass --restart-from sft"
        )
    )
    assert main(["run", "p.yaml", "--restart-from", "sft"]) == 0
