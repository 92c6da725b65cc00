"""Rollout engines: sample completions (with per-token logprobs) from a policy.

`rollouts` is a leaf package: it never imports `posttrain` or `rewards`.
"""

from rollouts.types import FinishReason, Group, RolloutEngine, Sample, SamplingParams

__all__ = ["FinishReason", "Group", "RolloutEngine", "Sample", "SamplingParams", "create_engine"]


def create_engine(name: str, **kwargs):
    """Build an engine by name: `hf`, `vllm`, `vllm-server`, `ray` (a pool of `hf` or `vllm`
    engine actors: `RayPool(engine, model_path, tokenizer, options)`). vLLM and Ray are
    imported only here."""
    if name == "hf":
        from rollouts.hf import HFEngine

        return HFEngine(**kwargs)
    if name == "vllm":
        from rollouts.vllm_engine import VLLMEngine

        return VLLMEngine(**kwargs)
    if name == "vllm-server":
        from rollouts.vllm_server import VLLMServerEngine

        return VLLMServerEngine(**kwargs)
    if name == "ray":
        from rollouts.ray_pool import RayPool

        return RayPool(**kwargs)
    raise ValueError(
        f"unknown rollout engine {name!r}; expected one of: hf, vllm, vllm-server, ray"
    )
