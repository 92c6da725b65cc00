"""Run health: rollout statistics that reveal collapse, and warnings for runs going wrong.

Pure functions over plain numbers (no torch):

- `completion_length_stats(lengths)`: mean and 95th percentile of completion lengths;
- `reward_length_correlation(rewards, lengths)`: Pearson's r, 0.0 when either is constant
  (a reward that grows with length is the usual sign of length hacking);
- `distinct_n(groups, n)`: distinct-n (Li et al. 2016, "A Diversity-Promoting Objective
  Function for Neural Conversation Models", sec. 4.3) among the samples of one prompt,
  averaged over prompts: a group whose samples are all the same scores 1/K of its
  n-grams, and GRPO learns nothing from it;
- `rollout_metrics(groups, rewards)`: the `rollout/*` metrics the online loop logs.

`HealthMonitor` watches the metrics of successive iterations and returns warnings for: a
gradient norm of zero for `zero_grad_steps` steps in a row (nothing is being learned), a
zero-variance group fraction above `zero_variance_bound` for `zero_variance_steps` steps in a
row (almost every group has one reward for all its samples: no advantage signal), and train
reward rising while held-out accuracy falls over `diverging_evals` evaluations in a row (the
policy is exploiting the reward). A NaN loss or gradient already stops the run in the learner.

Test: `pytest tests/test_health.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollouts import Group

Units = str | Sequence[Hashable]
"""One sample for distinct-n: a text (split on whitespace into words) or a token sequence."""


def completion_length_stats(lengths: Sequence[int | float]) -> tuple[float, float]:
    """Mean and 95th percentile (linear interpolation between ranks, as numpy's default)."""
    if not lengths:
        raise ValueError("completion_length_stats needs at least one length")
    return sum(lengths) / len(lengths), percentile(lengths, 95.0)


def percentile(values: Sequence[int | float], q: float) -> float:
    """The q-th percentile: position q/100 * (n - 1) in sorted order, interpolated."""
    if not values:
        raise ValueError("percentile needs at least one value")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = q / 100.0 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def reward_length_correlation(rewards: Sequence[float], lengths: Sequence[int | float]) -> float:
    """Pearson's correlation of reward and completion length; 0.0 if either is constant.

    r = sum((x - mean_x)(y - mean_y)) / sqrt(sum((x - mean_x)^2) * sum((y - mean_y)^2)).
    A constant variable has no linear relation to report, so 0.0 (not NaN) keeps the
    logged series continuous, e.g. while every reward in a batch is 0.
    """
    if len(rewards) != len(lengths):
        raise ValueError(f"got {len(rewards)} rewards for {len(lengths)} lengths")
    n = len(rewards)
    if n < 2:
        return 0.0
    mean_x, mean_y = sum(rewards) / n, sum(lengths) / n
    dx = [x - mean_x for x in rewards]
    dy = [y - mean_y for y in lengths]
    sxx, syy = sum(d * d for d in dx), sum(d * d for d in dy)
    if sxx <= 1e-24 * n or syy <= 1e-24 * n:  # constant up to rounding
        return 0.0
    r = sum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def distinct_n(groups: Sequence[Sequence[Units]], n: int) -> float:
    """Mean over prompts of (unique n-grams) / (all n-grams) across that prompt's samples.

    Each group holds the K samples of one prompt; a sample is a text (whitespace-split
    into words, as in Li et al. 2016) or a sequence of tokens (e.g. completion ids).
    Groups without any n-gram (every sample shorter than n) are left out of the mean;
    NaN when no group has one.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    ratios = []
    for group in groups:
        grams = [g for sample in group for g in _ngrams(sample, n)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return sum(ratios) / len(ratios) if ratios else math.nan


def _ngrams(sample: Units, n: int) -> list[tuple]:
    units = sample.split() if isinstance(sample, str) else list(sample)
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


def rollout_metrics(groups: list[Group], rewards: list[float]) -> dict[str, float]:
    """Length, truncation, reward-length correlation, distinct-2 and the sampled tokens' NLL.

    `rollout/neg_logprob_mean` is the mean of -log p(token) over the sampled completion
    tokens, with the engine's logprobs of the raw model: a Monte Carlo estimate of the
    policy's per-token entropy when sampling at temperature 1 (it falls as the policy
    sharpens). `rewards` are the samples' totals, in group order. Metrics that are
    undefined for this batch (no n-grams, no logprobs) are left out.
    """
    samples = [s for g in groups for s in g.samples]
    if len(rewards) != len(samples):
        raise ValueError(f"got {len(rewards)} rewards for {len(samples)} samples")
    lengths = [len(s.completion_ids) for s in samples]
    mean, p95 = completion_length_stats(lengths)
    token_logprobs = [lp for s in samples for lp in s.logprobs]
    metrics = {
        "rollout/completion_length_mean": mean,
        "rollout/completion_length_p95": p95,
        "rollout/truncated_fraction": sum(s.finish_reason == "length" for s in samples)
        / len(samples),
        "rollout/reward_length_corr": reward_length_correlation(rewards, lengths),
        "rollout/distinct_2": distinct_n(
            [[s.completion_ids for s in g.samples] for g in groups], 2
        ),
    }
    if token_logprobs:
        metrics["rollout/neg_logprob_mean"] = -sum(token_logprobs) / len(token_logprobs)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


@dataclass
class HealthMonitor:
    """Warnings from a stage's successive metrics; defaults need no configuration.

    Feed every iteration's metrics to `check` (or `report`). Each condition warns once when
    it starts to hold and again only after it has stopped holding; `count` is the number of
    warnings so far (logged as `health/warnings`).
    """

    name: str = ""
    """Shown before each warning `report` writes, e.g. the stage's name."""
    zero_grad_steps: int = 5
    """Warn when the gradient norm is (near) zero for this many steps in a row."""
    zero_grad_tol: float = 1e-10
    """A gradient norm at or below this counts as zero."""
    zero_variance_bound: float = 0.9
    """Warn when the zero-variance group fraction is above this..."""
    zero_variance_steps: int = 5
    """...for this many steps in a row."""
    diverging_evals: int = 2
    """Warn when, at this many evaluations in a row, the mean train reward since the previous
    evaluation rose and held-out accuracy fell."""
    grad_norm_key: str = "train/grad_norm"
    reward_key: str = "train/reward/total"
    accuracy_key: str = "eval/accuracy"
    zero_variance_suffix: str = "zero_variance_fraction"
    """Any metric whose name ends with this (e.g. `grpo/zero_variance_fraction`)."""
    count: int = field(default=0, init=False)
    """Warnings so far."""
    _zero_grad: int = field(default=0, init=False, repr=False)
    _zero_variance: int = field(default=0, init=False, repr=False)
    _diverging: int = field(default=0, init=False, repr=False)
    _rewards: list[float] = field(default_factory=list, init=False, repr=False)
    """Train rewards logged since the last evaluation."""
    _last_eval: tuple[float, float] | None = field(default=None, init=False, repr=False)
    """(mean train reward over the interval before the last evaluation, its accuracy)."""

    def __post_init__(self) -> None:
        for name in ("zero_grad_steps", "zero_variance_steps", "diverging_evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"HealthMonitor.{name} must be >= 1, got {getattr(self, name)}")

    def check(self, metrics: dict[str, float], step: int) -> list[str]:
        """The warnings that start at this step (usually none)."""
        warnings = [
            w
            for w in (
                self._check_grad(metrics, step),
                self._check_zero_variance(metrics, step),
                self._check_divergence(metrics, step),
            )
            if w
        ]
        self.count += len(warnings)
        return warnings

    def state(self) -> dict:
        """What a checkpoint needs so that a resumed stage warns exactly as before."""
        return {
            "count": self.count,
            "zero_grad": self._zero_grad,
            "zero_variance": self._zero_variance,
            "diverging": self._diverging,
            "rewards": list(self._rewards),
            "last_eval": list(self._last_eval) if self._last_eval is not None else None,
        }

    def load_state(self, state: dict) -> None:
        self.count = state["count"]
        self._zero_grad, self._zero_variance = state["zero_grad"], state["zero_variance"]
        self._diverging, self._rewards = state["diverging"], list(state["rewards"])
        self._last_eval = tuple(state["last_eval"]) if state["last_eval"] is not None else None

    def report(self, metrics: dict[str, float], step: int, write: Callable[[str], None]) -> float:
        """`check`, pass each warning to `write` (e.g. tqdm's), return the count so far."""
        for warning in self.check(metrics, step):
            write(f"[{self.name}] warning: {warning}" if self.name else f"warning: {warning}")
        return float(self.count)

    def _check_grad(self, metrics: dict[str, float], step: int) -> str | None:
        norm = metrics.get(self.grad_norm_key)
        self._zero_grad = (
            self._zero_grad + 1 if norm is not None and norm <= self.zero_grad_tol else 0
        )
        if self._zero_grad == self.zero_grad_steps:
            return (
                f"step {step}: {self.grad_norm_key} has been zero for {self.zero_grad_steps} "
                "steps in a row; the policy is not changing (all advantages zero? a frozen "
                "model?)"
            )
        return None

    def _check_zero_variance(self, metrics: dict[str, float], step: int) -> str | None:
        keys = [k for k in metrics if k.endswith(self.zero_variance_suffix)]
        value = metrics[keys[0]] if keys else None
        high = value is not None and value > self.zero_variance_bound
        self._zero_variance = self._zero_variance + 1 if high else 0
        if self._zero_variance == self.zero_variance_steps:
            return (
                f"step {step}: {keys[0]} has been above {self.zero_variance_bound} for "
                f"{self.zero_variance_steps} steps in a row; almost every group has one reward "
                "for all its samples, so there is little advantage signal (tasks too easy or "
                "too hard, or too few samples per prompt)"
            )
        return None

    def _check_divergence(self, metrics: dict[str, float], step: int) -> str | None:
        if self.reward_key in metrics:
            self._rewards.append(metrics[self.reward_key])
        if self.accuracy_key not in metrics or not self._rewards:
            return None
        now = (sum(self._rewards) / len(self._rewards), metrics[self.accuracy_key])
        self._rewards = []
        before, self._last_eval = self._last_eval, now
        if before is None:
            return None
        diverging = now[0] > before[0] and now[1] < before[1]
        self._diverging = self._diverging + 1 if diverging else 0
        if self._diverging == self.diverging_evals:
            return (
                f"step {step}: train reward rose while {self.accuracy_key} fell at "
                f"{self.diverging_evals} evaluations in a row (now reward {now[0]:.3f}, "
                f"accuracy {now[1]:.3f}); the policy may be exploiting the reward"
            )
        return None
