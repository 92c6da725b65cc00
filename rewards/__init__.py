"""Reward modules: plain functions with TRL's signature, combined by a `Rubric`.

`rewards` is a leaf package: it never imports `posttrain` or `rollouts`. Built-in rewards load
on first use (`rewards.BUILTIN[name]`), so `import rewards` stays light.
"""

from rewards.answer import exact_answer
from rewards.calls import RewardSignatureError
from rewards.per_sample import per_sample
from rewards.registry import BUILTIN, RewardLookupError, resolve_reward
from rewards.rubric import RewardConfigError, RewardError, RewardTerm, Rubric, Scores
from rewards.types import Failed, Scored

__all__ = [
    "BUILTIN",
    "Failed",
    "RewardConfigError",
    "RewardError",
    "RewardLookupError",
    "RewardSignatureError",
    "RewardTerm",
    "Rubric",
    "Scored",
    "Scores",
    "exact_answer",
    "per_sample",
    "resolve_reward",
]
