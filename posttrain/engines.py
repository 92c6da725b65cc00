"""Choose and build the rollout engine for a stage from its `rollout` config.

`rollout.workers` > 1 builds a Ray pool of engine actors (`rollouts/ray_pool.py`) instead of
one engine in the trainer's process.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

from posttrain.config.schema import RolloutConfig
from rollouts import RolloutEngine, create_engine


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
    if cfg.workers > 1:
        return _build_pool(name, cfg, tokenizer, model_path, dtype, seed)
    if name == "hf":
        return create_engine("hf", model=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    shared = {
        "dtype": dtype if cfg.dtype == "auto" else cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "seed": seed,
    }
    if name == "vllm":
        from rollouts.vllm_engine import VLLMOptions

        options = VLLMOptions(sleep_mode=cfg.sleep_mode, **shared)
    else:
        from rollouts.vllm_server import ServerOptions

        options = ServerOptions(
            url=cfg.server_url,
            request_timeout=cfg.request_timeout,
            restarts=cfg.server_restarts,
            weights_dir=cfg.server_weights_dir,
            **shared,
        )
    return create_engine(name, model_path=model_path, tokenizer=tokenizer, options=options)


def _build_pool(
    name: str, cfg: RolloutConfig, tokenizer: Any, model_path: str, dtype: str, seed: int
) -> RolloutEngine:
    """A Ray pool of `cfg.workers` actors, each with its own `name` engine (`hf` or `vllm`)."""
    if name not in ("hf", "vllm"):  # the config refuses vllm-server already; kept for callers
        raise ValueError(f"rollout.workers > 1 needs rollout.engine hf or vllm, not {name!r}")
    if importlib.util.find_spec("ray") is None:
        raise ModuleNotFoundError(
            f"rollout.workers={cfg.workers} runs the engines as Ray actors, but Ray is not "
            "installed: pip install -e '.[ray]' (or set rollout.workers: 1)"
        )
    from rollouts.ray_pool import PoolOptions
    from rollouts.vllm_engine import VLLMOptions

    engine_dtype = dtype if cfg.dtype == "auto" else cfg.dtype
    options = PoolOptions(
        workers=cfg.workers,
        address=cfg.ray_address,
        restarts=cfg.worker_restarts,
        dtype=dtype,
        batch_size=cfg.batch_size,
        vllm=VLLMOptions(
            dtype=engine_dtype,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            sleep_mode=cfg.sleep_mode,
            seed=seed,
        ),
    )
    return create_engine(
        "ray", engine=name, model_path=model_path, tokenizer=tokenizer, options=options
    )
