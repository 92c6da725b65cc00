"""Choose and build the rollout engine for a stage from its `rollout` config."""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

from posttrain.config.schema import RolloutConfig
from rollouts import RolloutEngine


def engine_name(cfg: RolloutConfig) -> str:
    """The engine `cfg.engine` means here; `auto` is `vllm` when vLLM is importable."""
    if cfg.engine != "auto":
        return cfg.engine
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def build_engine(
    cfg: RolloutConfig, model: nn.Module, tokenizer: Any, model_path: str, dtype: str, seed: int
) -> RolloutEngine:
    """`model_path` holds the weights `model` starts from (vLLM engines load it themselves)."""
    name = engine_name(cfg)
    vllm_dtype = dtype if cfg.dtype == "auto" else cfg.dtype
    if name == "hf":
        from rollouts.hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=cfg.batch_size)
    if name == "vllm":
        from rollouts.vllm_engine import VLLMEngine, VLLMOptions

        options = VLLMOptions(
            dtype=vllm_dtype,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            sleep_mode=cfg.sleep_mode,
            seed=seed,
        )
        return VLLMEngine(model_path, tokenizer, options)
    from rollouts.vllm_server import ServerOptions, VLLMServerEngine

    options = ServerOptions(
        url=cfg.server_url,
        dtype=vllm_dtype,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        tensor_parallel_size=cfg.tensor_parallel_size,
        seed=seed,
        request_timeout=cfg.request_timeout,
        restarts=cfg.server_restarts,
        weights_dir=cfg.server_weights_dir,
    )
    return VLLMServerEngine(model_path, tokenizer, options)
