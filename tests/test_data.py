"""Data: the built-in arithmetic task, file loading with column mapping, and token encoding.

Bad data is a `DataError` naming the file and the row (or line); these tests pin those parts.
The tokenizer is the embedded tiny model's, built once per session in a temporary folder.

Run: `pytest tests/test_data.py`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from posttrain.config.schema import DataConfig
from posttrain.data.arithmetic import arithmetic_rows
from posttrain.data.format import encode_example, prompt_text
from posttrain.data.load import DataError, load_rows


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from posttrain.models.tiny import build_tiny

    path = build_tiny("arithmetic", seed=0, cache_dir=tmp_path_factory.mktemp("tiny"))
    return AutoTokenizer.from_pretrained(path)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_error(cfg: DataConfig, need: tuple[str, ...] = ("prompt",)) -> str:
    with pytest.raises(DataError) as info:
        load_rows(cfg, need=need)
    return str(info.value)


# --- builtin://arithmetic -----------------------------------------------------------------------


def test_arithmetic_split_sizes():
    assert len(arithmetic_rows("train")) == 9000
    assert len(arithmetic_rows("test")) == 1000


def test_arithmetic_splits_are_deterministic():
    assert arithmetic_rows("train") == arithmetic_rows("train")
    assert arithmetic_rows("test") == arithmetic_rows("test")
    # Pinned, so a change of seed or order (which silently changes every eval) is noticed.
    assert [r["prompt"] for r in arithmetic_rows("test")[:3]] == ["13+54=", "26+16=", "86+57="]
    assert [r["prompt"] for r in arithmetic_rows("train")[:2]] == ["52+48=", "89+40="]


def test_arithmetic_splits_are_disjoint_and_cover_every_problem():
    train = {r["prompt"] for r in arithmetic_rows("train")}
    test = {r["prompt"] for r in arithmetic_rows("test")}
    assert len(train) == 9000 and len(test) == 1000
    assert not train & test
    assert train | test == {f"{a}+{b}=" for a in range(100) for b in range(100)}


@pytest.mark.parametrize("split", ["train", "test"])
def test_arithmetic_answer_is_the_completion_and_the_true_sum(split):
    for row in arithmetic_rows(split):
        assert set(row) == {"prompt", "completion", "answer"}
        a, b = row["prompt"].removesuffix("=").split("+")
        assert row["prompt"].endswith("=")
        assert row["answer"] == row["completion"] == str(int(a) + int(b))


def test_arithmetic_unknown_split():
    with pytest.raises(ValueError, match="has splits 'train' and 'test', not 'validation'"):
        arithmetic_rows("validation")


def test_builtin_through_load_rows():
    rows = load_rows(DataConfig(source="builtin://arithmetic", split="test", limit=5))
    assert rows == arithmetic_rows("test")[:5]


def test_unknown_builtin():
    message = load_error(DataConfig(source="builtin://arithmatic"))
    assert message == (
        "unknown built-in data 'builtin://arithmatic' (have: arithmetic, arithmetic_pairs)"
    )


# --- files --------------------------------------------------------------------------------------

SOURCE_ROWS = [
    {"question": "1+1=", "solution": "2", "id": "a"},
    {"question": "2+2=", "solution": "4", "id": "b"},
    {"question": "3+3=", "solution": "6", "id": "c"},
]
MAPPED_ROWS = [
    {"prompt": "1+1=", "completion": "2", "id": "a"},
    {"prompt": "2+2=", "completion": "4", "id": "b"},
    {"prompt": "3+3=", "completion": "6", "id": "c"},
]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` in the format named by `path`'s suffix."""
    if path.suffix == ".jsonl":
        write_jsonl(path, rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_file_formats_with_column_mapping(tmp_path, suffix):
    path = write_rows(tmp_path / f"data{suffix}", SOURCE_ROWS)
    cfg = DataConfig(source=str(path), columns={"prompt": "question", "completion": "solution"})
    rows = load_rows(cfg, need=("prompt", "completion"))
    assert rows == MAPPED_ROWS


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_file_formats_without_mapping_keep_the_columns(tmp_path, suffix):
    path = write_rows(tmp_path / f"data{suffix}", MAPPED_ROWS)
    assert load_rows(DataConfig(source=str(path))) == MAPPED_ROWS


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_limit_keeps_the_first_rows(tmp_path, suffix):
    path = write_rows(tmp_path / f"data{suffix}", MAPPED_ROWS)
    assert load_rows(DataConfig(source=str(path), limit=2)) == MAPPED_ROWS[:2]


def test_limit_hides_bad_rows_after_it(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    assert load_rows(DataConfig(source=str(path), limit=1)) == [{"prompt": "ok"}]


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n')
    assert load_rows(DataConfig(source=str(path))) == [{"prompt": "a"}, {"prompt": "b"}]


def test_chat_rows_keep_messages(tmp_path):
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": messages}])
    rows = load_rows(
        DataConfig(source=str(path), columns={"messages": "conversation"}),
        need=("prompt|messages",),
    )
    assert rows == [{"messages": messages}]


def test_mapped_column_wins_over_a_column_with_our_name(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "prompt": "P"}])
    rows = load_rows(DataConfig(source=str(path), columns={"prompt": "question"}))
    assert rows[0]["prompt"] == "Q"


def test_two_names_mapped_from_one_source_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1=", "solution": "2"}])
    cfg = DataConfig(
        source=str(path), columns={"prompt": "q", "completion": "solution", "answer": "solution"}
    )
    rows = load_rows(cfg, need=("prompt", "completion", "answer"))
    assert rows == [{"prompt": "1+1=", "completion": "2", "answer": "2"}]


# --- file errors --------------------------------------------------------------------------------


def test_data_file_not_found(tmp_path):
    path = tmp_path / "missing.jsonl"
    assert load_error(DataConfig(source=str(path))) == f"data file not found: {path}"


def test_empty_file_has_no_rows(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert load_error(DataConfig(source=str(path))) == f"{path}: no rows"


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n{"prompt": "c"}\n')
    message = load_error(DataConfig(source=str(path)))
    assert message.startswith(f"{path}: line 3 is not valid JSON: ")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a"}\n["b"]\n')
    assert load_error(DataConfig(source=str(path))) == f"{path}: line 2 is not a JSON object"


@pytest.mark.parametrize("content", ['{"prompt": "a"}', '["a", "b"]', '[{"prompt": "a"}, 3]'])
def test_json_file_must_be_a_list_of_objects(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_text(content)
    assert load_error(DataConfig(source=str(path))) == f"{path}: expected a JSON list of objects"


def test_invalid_json_file_names_the_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a"},')
    message = load_error(DataConfig(source=str(path)))
    assert message.startswith(f"{path}: ")


# --- row errors ---------------------------------------------------------------------------------


def test_missing_required_column_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}])
    message = load_error(DataConfig(source=str(path)))
    assert message == (
        f"{path}: row 2 has no 'prompt' column (or it is empty); row columns: ['text']; "
        "map yours with data.columns"
    )


def test_missing_alternatives_are_all_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "c"}])
    message = load_error(DataConfig(source=str(path)), need=("prompt|messages",))
    assert message.startswith(f"{path}: row 0 has no 'prompt' or 'messages' column")


def test_missing_completion_for_sft(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "x"}, {"prompt": "b"}])
    message = load_error(DataConfig(source=str(path)), need=("prompt", "completion"))
    assert message.startswith(f"{path}: row 1 has no 'completion' column (or it is empty)")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_empty_prompt_names_the_row(tmp_path, suffix):
    rows = [{"prompt": "a", "id": "1"}, {"prompt": "", "id": "2"}]
    path = write_rows(tmp_path / f"d{suffix}", rows)
    message = load_error(DataConfig(source=str(path)))
    assert message.startswith(f"{path}: row 1 has no 'prompt' column (or it is empty)")


def test_mapping_from_a_column_the_data_lacks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}])
    cfg = DataConfig(source=str(path), columns={"prompt": "question", "completion": "solution"})
    assert load_error(cfg) == (
        f"{path}: data.columns maps from ['question', 'solution'], which the data lacks "
        "(columns: ['answer', 'prompt'])"
    )


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": 5}, "row 1 column 'prompt' must be text, got int"),
        ({"prompt": "a", "completion": 7.5}, "row 1 column 'completion' must be text, got float"),
        (
            {"prompt": "a", "completion": {"x": 1}},
            "row 1 column 'completion' must be text, got dict",
        ),
    ],
)
def test_wrong_type_names_row_and_column(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, row])
    assert load_error(DataConfig(source=str(path))) == f"{path}: {expected}"


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        [{"role": "user"}],
        [{"role": 1, "content": "x"}],
        [{"role": "user", "content": ["x"]}],
        ["user: hello"],
    ],
)
def test_bad_messages_name_the_row(tmp_path, messages):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": good}, {"messages": messages}])
    message = load_error(DataConfig(source=str(path)), need=("prompt|messages",))
    assert message == (
        f"{path}: row 1 column 'messages' must be a non-empty list of "
        "{'role': str, 'content': str}"
    )


# --- encoding -----------------------------------------------------------------------------------


def test_encode_prompt_completion(tokenizer):
    prompt_ids, completion_ids = encode_example(
        {"prompt": "12+30=", "completion": "42"}, tokenizer, "data.jsonl", 0
    )
    assert prompt_ids == tokenizer("12+30=", add_special_tokens=False).input_ids
    assert completion_ids[:-1] == tokenizer("42", add_special_tokens=False).input_ids
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in prompt_ids
    assert tokenizer.decode(prompt_ids) == "12+30="
    assert tokenizer.decode(completion_ids) == "42" + tokenizer.eos_token


def test_encode_prompt_completion_keeps_extra_columns_out(tokenizer):
    row = {"prompt": "1+2=", "completion": "3", "answer": "3", "id": "x"}
    assert encode_example(row, tokenizer, "s", 0) == encode_example(
        {"prompt": "1+2=", "completion": "3"}, tokenizer, "s", 0
    )


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "1+2="},
        {"prompt": "1+2=", "completion": ""},
        {"prompt": "1+2=", "completion": None},
    ],
)
def test_encode_needs_a_completion(tokenizer, row):
    with pytest.raises(DataError) as info:
        encode_example(row, tokenizer, "data.jsonl", 4)
    assert str(info.value) == "data.jsonl: row 4 column 'completion' is missing or empty"


CHAT = [
    {"role": "system", "content": "Add the numbers."},
    {"role": "user", "content": "12+30="},
    {"role": "assistant", "content": "42"},
]


def test_encode_messages_uses_the_chat_template(tokenizer):
    prompt_ids, completion_ids = encode_example({"messages": CHAT}, tokenizer, "chat.jsonl", 0)
    prompt = tokenizer.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nAdd the numbers.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(prompt_ids) == prompt
    assert tokenizer.decode(prompt_ids + completion_ids[:-1]) == full
    assert tokenizer.decode(completion_ids[:-1]).startswith("42")
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in prompt_ids


def test_prompt_text_of_messages_drops_the_answer(tokenizer):
    expected = tokenizer.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt_text({"messages": CHAT}, tokenizer) == expected
    assert prompt_text({"messages": CHAT[:-1]}, tokenizer) == expected
    assert prompt_text({"prompt": "1+2="}, tokenizer) == "1+2="


@pytest.mark.parametrize("role", ["user", "system"])
def test_encode_messages_must_end_with_the_assistant(tokenizer, role):
    row = {"messages": [*CHAT[:-1], {"role": role, "content": "more"}]}
    with pytest.raises(DataError) as info:
        encode_example(row, tokenizer, "chat.jsonl", 3)
    assert str(info.value) == (
        "chat.jsonl: row 3: the last message must be the assistant's answer to train on, "
        f"got role {role!r}"
    )


def test_loaded_chat_file_encodes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    (row,) = load_rows(DataConfig(source=str(path)), need=("prompt|messages",))
    prompt_ids, completion_ids = encode_example(row, tokenizer, str(path), 0)
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(prompt_ids + completion_ids) == full + tokenizer.eos_token


def test_datasets_folder_source_with_mapping(tmp_path):
    """A `datasets` source (here a local dataset folder, as hub names need the network)."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"question": f"{i}+1=", "solution": str(i + 1)} for i in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        source=str(folder), split="train", columns={"prompt": "question", "answer": "solution"}
    )
    loaded = load_rows(cfg)
    assert loaded == [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]


def test_datasets_source_that_cannot_load_names_it(tmp_path):
    cfg = DataConfig(source=str(tmp_path / "no-such-dataset"), split="train")
    with pytest.raises(DataError, match="cannot load dataset"):
        load_rows(cfg)


# ---------------------------------------------------------------------------------------------
# prompt_format, chat, system


def _one_row(tmp_path, row: dict, **options):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return load_rows(DataConfig(source=str(path), **options))[0]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "7+8="),
        ({"prompt_format": "Q: {prompt} ({level})"}, "Q: 7+8= (easy)"),
        ({"chat": True}, [{"role": "user", "content": "7+8="}]),
        (
            {"chat": True, "system": "Be brief.", "prompt_format": "{prompt}?"},
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7+8=?"}],
        ),
        ({"prompt_format": "{prompt} {{boxed}}"}, "7+8= {boxed}"),
    ],
)
def test_prompt_shaping_table(tmp_path, options, expected):
    row = _one_row(tmp_path, {"prompt": "7+8=", "level": "easy"}, **options)
    assert row["prompt"] == expected
    assert row["level"] == "easy"


def test_prompt_format_after_column_mapping(tmp_path):
    row = _one_row(
        tmp_path, {"question": "2+2", "solution": "4"},
        columns={"prompt": "question", "answer": "solution"},
        prompt_format="Solve: {prompt}",
    )  # fmt: skip
    assert row == {"prompt": "Solve: 2+2", "answer": "4"}


def test_chat_leaves_conversational_prompts_alone(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    assert _one_row(tmp_path, {"prompt": messages}, chat=True)["prompt"] == messages


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("{prompt} {nope}", "row 0: data.prompt_format names column 'nope'"),
        ("{prompt} {", "data.prompt_format '{prompt} {' is invalid"),
    ],
)
def test_bad_prompt_format_is_a_clear_error(tmp_path, fmt, message):
    with pytest.raises(DataError, match=re.escape(message)):
        _one_row(tmp_path, {"prompt": "7+8="}, prompt_format=fmt)
