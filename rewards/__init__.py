"""Reward modules: plain functions with TRL's signature, combined by a `Rubric`.

`rewards` is a leaf package: it never imports `posttrain` or `rollouts`.
"""

from rewards.answer import exact_answer
from rewards.registry import BUILTIN, RewardLookupError, resolve_reward
from rewards.rubric import RewardError, RewardTerm, Rubric, Scores

__all__ = [
    "BUILTIN",
    "RewardError",
    "RewardLookupError",
    "RewardTerm",
    "Rubric",
    "Scores",
    "exact_answer",
    "resolve_reward",
]
