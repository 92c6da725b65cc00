"""Rollout engines: sample completions (with per-token logprobs) from a policy.

`rollouts` is a leaf package: it never imports `posttrain` or `rewards`.
"""

from rollouts.types import FinishReason, Group, RolloutEngine, Sample, SamplingParams

__all__ = ["FinishReason", "Group", "RolloutEngine", "Sample", "SamplingParams", "create_engine"]


def create_engine(name: str, **kwargs):
    """Build an engine by name (`hf`). Heavy imports happen here, not at package import."""
    if name == "hf":
        from rollouts.hf import HFEngine

        return HFEngine(**kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; expected one of: hf")
