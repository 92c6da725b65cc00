"""Config loading: unknown keys, type errors, `key.sub=value` overrides, and the resolved dump.

Every error is a `ConfigError` whose message names the file (or the override), the dotted key
path and what was expected; these tests pin those parts of the messages.

Run: `pytest tests/test_config.py`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.config import (
    ConfigError,
    GRPOStage,
    PipelineConfig,
    SFTStage,
    apply_override,
    dump_config,
    load_config,
    validate_config,
)
from posttrain.config.schema import ALGOS, RolloutConfig

REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "run": {"name": "t"},
    "stages": [
        {"name": "sft", "algo": "sft", "data": {"source": "builtin://arithmetic"}},
        {
            "name": "grpo",
            "algo": "grpo",
            "data": {"source": "builtin://arithmetic"},
            "rewards": [{"name": "exact_answer"}],
        },
    ],
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def write(tmp_path: Path, data: Any, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(tmp_path: Path, data: Any, overrides: tuple[str, ...] = ()) -> tuple[str, Path]:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value), path


def set_in(data: dict, dotted: str, value: Any) -> dict:
    """Set a nested key in plain Python (independent of `apply_override`)."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[last] = value
    return data


def test_base_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, base()))
    assert isinstance(cfg, PipelineConfig)
    assert isinstance(cfg.stages[0], SFTStage)
    assert isinstance(cfg.stages[1], GRPOStage)
    assert cfg.stages[1].rollout.n == 8
    assert cfg.run.folder == "runs/t"


# --- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "suggestion"),
    [
        ("stages.1.rollout.nn", "n"),
        ("runn", "run"),
        ("run.sed", "seed"),
        ("stages.0.nme", "name"),
        ("stages.0.train.lrr", "lr"),
        ("stages.1.grpo.bta", "beta"),
        ("stages.1.rewards.0.wieght", "weight"),
        ("stages.0.data.colums", "columns"),
        ("tracking.backnd", "backend"),
    ],
)
def test_unknown_key_names_path_and_nearest_valid_key(tmp_path, dotted, suggestion):
    message, path = load_error(tmp_path, set_in(base(), dotted, 1))
    assert message.startswith(f"{path}: 1 error\n")
    assert f"  {dotted}: unknown key; did you mean {suggestion!r}? (valid keys here: " in message


def test_unknown_key_lists_the_valid_keys_of_its_section(tmp_path):
    message, _ = load_error(tmp_path, set_in(base(), "stages.1.rollout.nn", 4))
    valid = ", ".join(RolloutConfig.model_fields)
    assert valid.startswith("engine, n, max_new_tokens, temperature, top_p, ignore_eos, batch_size")
    assert message.endswith(
        f"stages.1.rollout.nn: unknown key; did you mean 'n'? (valid keys here: {valid})"
    )


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path):
    message, _ = load_error(tmp_path, set_in(base(), "stages.1.rollout.zzzzzz", 4))
    assert "stages.1.rollout.zzzzzz: unknown key (valid keys here: engine, n," in message
    assert "did you mean" not in message


def test_unknown_key_from_an_override_is_reported_like_one_in_the_file(tmp_path):
    message, path = load_error(tmp_path, base(), ("stages.1.rollout.nn=4",))
    assert message.startswith(f"{path}: 1 error")
    assert "stages.1.rollout.nn: unknown key; did you mean 'n'?" in message


def test_unknown_algo_suggests_the_closest(tmp_path):
    data = set_in(base(), "stages.1.algo", "grpoo")
    message, path = load_error(tmp_path, data)
    assert message.startswith(f"{path}: 1 error")
    assert (
        "stages.1.algo: unknown algorithm 'grpoo'; did you mean 'grpo'? "
        f"(expected one of {', '.join(ALGOS)})"
    ) in message


def test_missing_algo_lists_the_algorithms(tmp_path):
    data = base()
    del data["stages"][0]["algo"]
    message, _ = load_error(tmp_path, data)
    assert f"stages.0.algo: missing; expected one of {', '.join(ALGOS)}" in message


def test_every_error_is_listed_and_counted(tmp_path):
    data = set_in(set_in(base(), "run.sed", 1), "stages.1.rollout.nn", 2)
    message, path = load_error(tmp_path, data)
    assert message.startswith(f"{path}: 2 errors\n")
    assert "  run.sed: unknown key; did you mean 'seed'?" in message
    assert "  stages.1.rollout.nn: unknown key; did you mean 'n'?" in message


# --- wrong types and values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("stages.1.rollout.n", "many", "valid integer"),
        ("stages.1.rollout.n", 0, "greater than or equal to 1"),
        ("stages.1.rollout.temperature", "hot", "valid number"),
        ("stages.0.data.limit", "ten", "valid integer"),
        ("model.dtype", "fp8", "'float32', 'bfloat16' or 'float16'"),
        ("tracking.backend", "tensorboard", "'wandb' or 'jsonl'"),
        ("stages.0.train.train_on_prompt", "maybe", "valid boolean"),
    ],
)
def test_type_error_names_path_and_bad_value(tmp_path, dotted, value, expected):
    message, path = load_error(tmp_path, set_in(base(), dotted, value))
    assert message.startswith(f"{path}: 1 error\n")
    line = message.splitlines()[1].strip()
    assert line.startswith(f"{dotted}: ")
    assert expected in line
    assert line.endswith(f"(got {value!r})")


def test_wrong_type_for_a_section(tmp_path):
    message, _ = load_error(tmp_path, {**base(), "run": 5})
    assert "  run: " in message
    assert message.endswith("(got 5)")


def test_stage_that_is_not_a_mapping(tmp_path):
    message, _ = load_error(tmp_path, {"stages": ["sft"]})
    assert "stages.0: " in message
    assert message.endswith("(got 'sft')")


def test_missing_stages(tmp_path):
    message, _ = load_error(tmp_path, {"run": {"name": "t"}})
    assert "  stages: Field required" in message


def test_empty_stages(tmp_path):
    message, _ = load_error(tmp_path, {"stages": []})
    assert "`stages` is empty; a pipeline needs at least one stage" in message


def test_duplicate_stage_names(tmp_path):
    data = set_in(base(), "stages.1.name", "sft")
    message, path = load_error(tmp_path, data)
    assert message.startswith(f"{path}: 1 error")
    assert "stage names must be unique; repeated: ['sft']" in message


def test_grpo_stage_with_empty_rewards(tmp_path):
    data = set_in(base(), "stages.1.rewards", [])
    message, _ = load_error(tmp_path, data)
    line = message.splitlines()[1].strip()
    assert line.startswith("stages.1: ")
    assert "a grpo stage needs at least one reward in `rewards`" in line


def test_grpo_stage_without_rewards_key(tmp_path):
    data = base()
    del data["stages"][1]["rewards"]
    message, _ = load_error(tmp_path, data)
    assert "  stages.1.rewards: Field required" in message


def test_validate_config_without_a_file_names_its_source():
    with pytest.raises(ConfigError, match=r"^<config>: 1 error\n  runn: unknown key"):
        validate_config({**base(), "runn": {}})
    with pytest.raises(ConfigError, match=r"^cli-args: 1 error"):
        validate_config({**base(), "runn": {}}, source="cli-args")


# --- the file itself ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert str(info.value) == f"config file not found: {path}"


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stages:\n  - name: [sft\n    algo: sft\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not valid YAML: ")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: sft\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: the top level must be a mapping, got list"


def test_empty_file_reports_missing_stages(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: 1 error\n  stages: Field required"


# --- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("4", 4),
        ("-2", -2),
        ("1.5", 1.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ("", None),
        ("[1, 2]", [1, 2]),
        ("{a: 1}", {"a": 1}),
        ("hello", "hello"),
        ("'4'", "4"),
        ("a=b", "a=b"),
    ],
)
def test_override_values_are_parsed_as_yaml(raw, expected):
    data: dict[str, Any] = {"x": {"y": 0}}
    apply_override(data, f"x.y={raw}")
    assert data == {"x": {"y": expected}}


def test_override_creates_nested_mappings():
    data: dict[str, Any] = {"run": None}
    apply_override(data, "run.name=demo")
    apply_override(data, "model.path=tiny://arithmetic-llama")
    assert data == {"run": {"name": "demo"}, "model": {"path": "tiny://arithmetic-llama"}}


def test_override_list_items_by_index():
    data = base()
    apply_override(data, "stages.1.rollout.n=4")
    apply_override(data, "stages.-1.iterations=3")
    apply_override(data, "stages.0.data.limit=10")
    assert data["stages"][1]["rollout"] == {"n": 4}
    assert data["stages"][1]["iterations"] == 3
    assert data["stages"][0]["data"] == {"source": "builtin://arithmetic", "limit": 10}
    assert data["stages"][0]["name"] == "sft"


def test_override_replaces_a_list_item():
    data = {"stages": [{"rewards": [{"name": "a"}, {"name": "b"}]}]}
    apply_override(data, "stages.0.rewards.1={name: c, weight: 0}")
    assert data["stages"][0]["rewards"] == [{"name": "a"}, {"name": "c", "weight": 0}]


def test_overrides_reach_the_validated_config(tmp_path):
    cfg = load_config(
        write(tmp_path, base()),
        [
            "stages.1.rollout.n=4",
            "stages.1.rollout.temperature=0.5",
            "stages.0.train.train_on_prompt=true",
            "stages.0.train.betas=[0.8, 0.95]",
            "run.seed=7",
            "run.seed=8",  # applied in order: the last one wins
            "run.output_dir=/tmp/elsewhere",
        ],
    )
    assert cfg.stages[1].rollout.n == 4
    assert cfg.stages[1].rollout.temperature == 0.5
    assert cfg.stages[0].train.train_on_prompt is True
    assert cfg.stages[0].train.betas == (0.8, 0.95)
    assert cfg.run.seed == 8
    assert cfg.run.folder == "/tmp/elsewhere"


def test_override_with_a_wrongly_typed_value_is_a_type_error(tmp_path):
    message, path = load_error(tmp_path, base(), ("stages.1.rollout.n=[4]",))
    assert message.startswith(f"{path}: 1 error")
    assert "stages.1.rollout.n: Input should be a valid integer" in message
    assert message.endswith("(got [4])")


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("stages.5.rollout.n=4", "override 'stages.5.rollout.n=4': stages.5 is out of range "
         "(the list has 2 items)"),
        ("stages.-3.name=x", "override 'stages.-3.name=x': stages.-3 is out of range "
         "(the list has 2 items)"),
        ("stages.1.rewards.1.weight=2", "override 'stages.1.rewards.1.weight=2': "
         "stages.1.rewards.1 is out of range (the list has 1 items)"),
    ],
)  # fmt: skip
def test_override_index_out_of_range(item, expected):
    data = base()
    with pytest.raises(ConfigError) as info:
        apply_override(data, item)
    assert str(info.value) == expected
    assert data == base()


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("stages.1.rollout.n", "override 'stages.1.rollout.n': expected key.path=value"),
        ("=4", "override '=4': expected key.path=value"),
        ("run.seed: 3", "override 'run.seed: 3': expected key.path=value"),
        ("stages.first.name=x", "override 'stages.first.name=x': stages.first indexes a list; "
         "use a number"),
        ("run.name.x=1", "override 'run.name.x=1': run.name is a value, not a mapping or list"),
        ("stages.--1.name=x", "override 'stages.--1.name=x': stages.--1 indexes a list"),
        ("stages.0.name=[sft", "override 'stages.0.name=[sft': "),
    ],
)  # fmt: skip
def test_malformed_override(item, expected):
    data = base()
    with pytest.raises(ConfigError) as info:
        apply_override(data, item)
    assert str(info.value).startswith(expected)


def test_malformed_override_through_load_config(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'stages\.9\.name=x': stages\.9 is out"):
        load_config(write(tmp_path, base()), ["stages.9.name=x"])


# --- the resolved config ------------------------------------------------------------------------


def test_dump_config_writes_every_default_and_loads_back_equal(tmp_path):
    cfg = load_config(
        write(tmp_path, base()),
        ["stages.1.rollout.n=4", "stages.0.train.betas=[0.8, 0.95]", "stages.0.data.limit=10"],
    )
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    resolved = yaml.safe_load(out.read_text())
    # The defaults are spelled out: the file alone says what the run used.
    assert resolved["stages"][1]["grpo"]["clip_eps"] == 0.2
    assert resolved["stages"][1]["rollout"]["n"] == 4
    assert resolved["stages"][0]["train"]["betas"] == [0.8, 0.95]
    assert resolved["model"]["path"] == "tiny://arithmetic"
    assert resolved["run"]["output_dir"] is None


def test_dump_config_round_trips_the_quickstart(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    dump_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == out.read_text()
