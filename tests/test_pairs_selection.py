"""Best-vs-worst pairs (online DPO) and rejection-sampling selection (RAFT), by hand."""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms.pairs import Pair, best_vs_worst_pairs
from posttrain.algorithms.selection import select_completions

T = torch.tensor

REWARDS = T(
    [
        [1.0, 3.0, 3.0, 0.0],  # best: first of the two 3s (index 1); worst index 3; margin 3
        [2.0, 2.0, 2.0, 2.0],  # all equal: a tie, no preference
        [0.5, 0.4, 0.45, 0.5],  # best index 0 (first 0.5), worst index 1; margin 0.1
        [0.0, 1.0, 0.0, 1.0],  # best index 1, worst index 0; margin 1
    ]
)


def test_pairs_with_min_margin():
    out = best_vs_worst_pairs(REWARDS, min_margin=0.2)
    assert out.pairs == (Pair(0, 1, 3, 3.0), Pair(3, 1, 0, 1.0))
    assert (out.dropped_ties, out.dropped_small_margin) == (1, 1)
    metrics = out.metrics()
    assert metrics["pairs/kept"] == 2.0
    assert metrics["pairs/dropped_ties_fraction"] == 0.25
    assert metrics["pairs/margin_mean"] == pytest.approx(2.0)


def test_pairs_without_min_margin_keep_every_non_tie():
    out = best_vs_worst_pairs(REWARDS)
    assert [(p.prompt_index, p.chosen_index, p.rejected_index) for p in out.pairs] == [
        (0, 1, 3),
        (2, 0, 1),
        (3, 1, 0),
    ]
    assert out.pairs[1].margin == pytest.approx(0.1)
    assert (out.dropped_ties, out.dropped_small_margin) == (1, 0)


def test_margin_equal_to_min_margin_is_kept():
    assert len(best_vs_worst_pairs(T([[0.0, 0.5]]), min_margin=0.5).pairs) == 1


@pytest.mark.parametrize(
    ("rewards", "kwargs", "match"),
    [
        (T([[1.0], [2.0]]), {}, "K >= 2"),
        (T([[1.0, float("nan")]]), {}, "prompt 0, completion 1 is NaN"),
        (T([[1.0, 0.0]]), {"min_margin": -1.0}, "min_margin"),
    ],
)
def test_pair_errors(rewards, kwargs, match):
    with pytest.raises(ValueError, match=match):
        best_vs_worst_pairs(rewards, **kwargs)


SCORES = T([[0.9, 0.1, 0.9, 0.5], [0.2, 0.3, 0.1, 0.0]])
TEXTS = [["a", "b", "a", "c"], ["x", "y", "z", "w"]]


@pytest.mark.parametrize(
    ("kwargs", "kept", "rate"),
    [
        # prompt 0: completion 2 repeats "a" and is dropped first; top 2 of (0.9, 0.1, 0.5)
        ({"top_k": 2}, [(0, 0), (0, 3), (1, 0), (1, 1)], 4 / 8),
        # >= 0.5 keeps 0 and 3 of prompt 0 (0.5 included), nothing of prompt 1
        ({"threshold": 0.5}, [(0, 0), (0, 3)], 2 / 8),
        # threshold first, then the best one: prompt 0 -> 0, prompt 1 -> 1 (0.3)
        ({"threshold": 0.25, "top_k": 1}, [(0, 0), (1, 1)], 2 / 8),
        ({}, [(0, 0), (0, 1), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)], 7 / 8),  # dedup only
    ],
)
def test_select_completions_table(kwargs, kept, rate):
    out = select_completions(SCORES, TEXTS, **kwargs)
    assert out.indices == kept
    assert out.acceptance_rate == pytest.approx(rate)
    assert out.duplicates == 1


def test_selection_metrics_and_ties():
    out = select_completions(SCORES, TEXTS, threshold=0.5)
    assert out.metrics()["rft/prompts_without_sample"] == 1.0
    assert out.metrics()["rft/kept_per_prompt"] == 1.0
    tied = select_completions(T([[1.0, 1.0, 1.0]]), [["p", "q", "r"]], top_k=2)
    assert tied.indices == [(0, 0), (0, 1)]  # equal rewards: lower index first


@pytest.mark.parametrize(
    ("rewards", "texts", "kwargs", "match"),
    [
        (SCORES, [["a"] * 4], {}, "texts has 1 prompts, rewards has 2"),
        (SCORES, [["a"] * 4, ["b"] * 3], {}, "texts of prompt 1 has 3 completions, expected 4"),
        (SCORES, TEXTS, {"top_k": 0}, "top_k"),
        (T([[float("nan")]]), [["a"]], {}, "prompt 0, completion 0 is NaN"),
    ],
)
def test_selection_errors(rewards, texts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_completions(rewards, texts, **kwargs)
