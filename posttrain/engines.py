"""Choose and build the rollout engine for a stage from its `rollout` config.

`rollout.workers` > 1 builds a Ray pool of engine actors (`rollouts/ray_pool.py`) instead of
one engine in the trainer's process.

Under several processes (`accelerate launch`), an engine that owns its weights (vLLM, a vLLM
server, a Ray pool) is built on rank 0 only: rank 0 samples, scores and broadcasts (see
`loop.py`), so the other processes get a `FollowerEngine` and neither hold a second copy of
the model nor start a second pool. The `hf` engine shares the policy and runs on every
process (FSDP2 needs every process in each forward).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

from posttrain.config.schema import RolloutConfig
from posttrain.distributed import is_distributed, is_main
from rollouts import Group, RolloutEngine, Sample, SamplingParams, create_engine


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
    if (cfg.workers > 1 or name != "hf") and is_distributed() and not is_main():
        return FollowerEngine(name)
    if cfg.workers > 1:
        return _build_pool(name, cfg, tokenizer, model_path, dtype, seed)
    if name == "hf":
        return create_engine(
            "hf",
            model=model,
            tokenizer=tokenizer,
            batch_size=cfg.batch_size,
            static_cache=cfg.static_cache,
            compile=cfg.compile,
            fuse_weights=cfg.fuse_weights,
        )
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
        static_cache=cfg.static_cache,
        compile=cfg.compile,
        fuse_weights=cfg.fuse_weights,
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


class FollowerEngine:
    """The engine of a process other than rank 0 when rank 0's engine owns its weights.

    Its samples are never used (the loop and the evaluator take rank 0's, broadcast), so
    `generate` returns empty completions of the right shape; weight syncs go to rank 0's
    engine alone, and the sync probe is rank 0's (`sync.probe_logprob_diff` returns 0 here).
    """

    follower = True

    def __init__(self, name: str) -> None:
        self.name = f"{name} (on rank 0)"

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams, rows: list[dict] | None = None
    ) -> list[Group]:
        rows = rows if rows is not None else [{} for _ in prompts]
        return [
            Group(p, [Sample(p, "", [], [], [], "length", 0) for _ in range(n)], row)
            for p, row in zip(prompts, rows, strict=True)
        ]

    def load_weights(self, source: Any, version: int) -> None:
        """Rank 0 syncs its engine."""

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        raise RuntimeError("a follower engine has no weights; the sync probe runs on rank 0")

    def sleep(self) -> None:
        """Nothing held."""

    def close(self) -> None:
        """Nothing held."""
