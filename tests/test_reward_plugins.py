"""Rewards from installed packages (entry-point group `posttrain.rewards`), and `args:`.

The plugin is a real distribution on `sys.path`: a module plus a `.dist-info` folder with
`entry_points.txt`, which is exactly what `pip install` leaves behind for a package that
declares `[project.entry-points."posttrain.rewards"]`. Run: `pytest tests/test_reward_plugins.py`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from posttrain.config.schema import RewardSpec
from posttrain.reward_setup import build_rubric
from posttrain.rewards_cli import format_listing
from rewards import RewardLookupError, resolve_reward

PLUGIN_SOURCE = textwrap.dedent(
    '''
    def shouting(prompts, completions, **kwargs):
        """1.0 for completions written in capitals."""
        return [1.0 if c.isupper() else 0.0 for c in completions]

    def min_length(*, chars: int = 3):
        """1.0 when the completion has at least `chars` characters."""
        if chars < 0:
            raise ValueError(f"chars must be >= 0, got {chars}")

        def reward(prompts, completions, **kwargs):
            return [1.0 if len(c) >= chars else 0.0 for c in completions]

        return reward
    '''
)


def install_plugin(root: Path, entries: dict[str, str], name: str = "posttrain-test-plugin"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "posttrain_test_plugin.py").write_text(PLUGIN_SOURCE)
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[posttrain.rewards]\n{lines}\n")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    install_plugin(
        tmp_path / "site",
        {
            "shouting": "posttrain_test_plugin:shouting",
            "min_length": "posttrain_test_plugin:min_length",
            "broken": "posttrain_test_plugin_missing:fn",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield


def test_plugin_reward_resolves_by_its_entry_point_name(plugin):
    fn = resolve_reward("shouting")
    assert fn(prompts=["p", "p"], completions=["YES", "no"]) == [1.0, 0.0]


def test_plugin_factory_takes_args(plugin):
    assert resolve_reward("min_length")(prompts=["p"] * 2, completions=["ab", "abc"]) == [0, 1]
    fn = resolve_reward("min_length", args={"chars": 2})
    assert fn(prompts=["p"] * 2, completions=["ab", "a"]) == [1.0, 0.0]
    with pytest.raises(RewardLookupError, match="bad options.*chars must be >= 0"):
        resolve_reward("min_length", args={"chars": -1})
    with pytest.raises(RewardLookupError, match=r"no option\(s\) \['char'\]; did you mean 'chars'"):
        resolve_reward("min_length", args={"char": 2})


def test_broken_plugin_is_an_error_naming_the_package(plugin):
    with pytest.raises(RewardLookupError, match="posttrain-test-plugin.*failed to load"):
        resolve_reward("broken")


def test_unknown_name_suggests_plugins_too(plugin):
    with pytest.raises(RewardLookupError, match="did you mean 'shouting'.*plugins: broken"):
        resolve_reward("shoutin")


def test_listing_shows_builtins_plugins_and_options(plugin):
    text = format_listing()
    assert "exact_answer" in text and "1.0 when the completion" in text
    assert "plugins (entry-point group posttrain.rewards)" in text
    assert "shouting             1.0 for completions written in capitals." in text
    assert "options: chars=3" in text
    assert "broken" in text and "failed to load" in text


def test_plugin_in_a_config_with_label_args_and_gate(plugin):
    specs = [
        RewardSpec(name="min_length", args={"chars": 2}, label="long_enough"),
        RewardSpec(name="shouting", weight=2.0, gate="long_enough"),
    ]
    rubric = build_rubric(specs, ["prompt"], base_dir=None)
    scores = rubric.score(["p"] * 3, ["AB", "A", "ab"])
    assert scores.components == {"long_enough": [1.0, 0.0, 1.0], "shouting": [1.0, None, 0.0]}
    assert scores.total == [3.0, 0.0, 1.0]


def test_args_bind_to_a_plain_reward_function(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text(
        "def contains(prompts, completions, word='a', **kwargs):\n"
        "    return [1.0 if word in c else 0.0 for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    fn = resolve_reward("./r.py:contains", args={"word": "z"})
    assert fn(prompts=["p", "p"], completions=["zz", "aa"]) == [1.0, 0.0]
    with pytest.raises(RewardLookupError, match=r"no option\(s\) \['wrd'\]"):
        resolve_reward("./r.py:contains", args={"wrd": "z"})
