"""Rollouts through a pool of Ray actors, each holding its own engine (`rollout.workers: N`).

`RayPool` is a `RolloutEngine`: `generate` splits the prompts (with their rows) into contiguous
shards, one per actor, and concatenates the actors' groups in prompt order. Each shard samples
with its own seed derived from the call's seed and the shard's index, so seeded sampling is
reproducible for a fixed number of workers (and unchanged when a shard is re-sent).
`load_weights` exports the policy's state once (LoRA merged), puts it in the Ray object store
once and has every actor load it; `worker_logprobs` lets the sync probe check every actor.

An actor that dies (its process or node is lost) is replaced by a new one built from the same
model path and given the latest weights, and the calls it had not answered are re-sent; after
`restarts` replacements the next death is an error. Simplifications: one engine per actor (no
tensor parallelism inside a pool), shards are equal in prompt count (not balanced by length),
and actors are placed by Ray's default scheduler (`num_gpus=1` each where the cluster has
GPUs, so a node with k GPUs hosts up to k actors).

Test: `pytest tests/test_ray_pool.py` (a local Ray pool of two HF actors on CPU).
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.exceptions import RayActorError

from rollouts.types import Group, SamplingParams
from rollouts.vllm_engine import VLLMOptions
from rollouts.weights import export_state_dict


class PoolError(RuntimeError):
    """The pool cannot go on: actors could not start, or died more often than allowed."""


@dataclass(frozen=True)
class PoolOptions:
    """How many actors, where, and how each builds its engine."""

    workers: int = 2
    address: str | None = None
    """Ray cluster to join (`ray.init(address=...)`); None: the running Ray session if there
    is one, else a local Ray started here (and stopped by `close`)."""
    restarts: int = 3
    """Dead actors replaced in all before the next death is an error."""
    gpus_per_worker: float | None = None
    """None: 1 when the cluster has GPUs, else 0."""
    cpus_per_worker: float = 1.0
    startup_timeout: float = 600.0
    """Seconds to wait for actors to be placed and build their engines."""
    dtype: str = "float32"
    """`hf` actors: the model's dtype (the trainer's, so the sync probe compares like with like)."""
    batch_size: int = 256
    """`hf` actors: sequences decoded at once."""
    static_cache: bool = True
    """`hf` actors: static-cache decoding (see `HFEngine`)."""
    compile: bool | None = None
    """`hf` actors: compile the decode step; None = on CUDA only."""
    fuse_weights: bool | None = None
    """`hf` actors: fused q/k/v and gate/up matmuls (`HFEngine`); None = on CUDA only."""
    vllm: VLLMOptions | None = None
    """`vllm` actors: engine settings."""


class EngineWorker:
    """One engine in a Ray actor process; built from a model path, then fed weights."""

    def __init__(
        self,
        engine: str,
        model_path: str,
        tokenizer: Any,
        options: PoolOptions,
        weights: dict | None = None,
        version: int = 0,
    ) -> None:
        if engine == "hf":
            import torch
            from transformers import AutoModelForCausalLM

            from rollouts.hf import HFEngine

            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=getattr(torch, options.dtype)
            )
            # Ray hides the GPUs an actor was not given (CUDA_VISIBLE_DEVICES).
            model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
            self.engine = HFEngine(
                model,
                tokenizer,
                batch_size=options.batch_size,
                static_cache=options.static_cache,
                compile=options.compile,
                fuse_weights=options.fuse_weights,
            )
        else:
            from rollouts.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(model_path, tokenizer, options.vllm)
        if weights is not None:
            self.engine.load_weights(weights, version)

    def ready(self) -> int:
        return os.getpid()

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams, rows: list[dict]
    ) -> list[Group]:
        return self.engine.generate(prompts, n, sampling, rows)

    def load_weights(self, weights: dict, version: int) -> None:
        self.engine.load_weights(weights, version)

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.engine.logprobs(sequences)

    def sleep(self) -> None:
        self.engine.sleep()


class RayPool:
    """`workers` engine actors behind the `RolloutEngine` protocol."""

    def __init__(
        self, engine: str, model_path: str, tokenizer: Any, options: PoolOptions | None = None
    ) -> None:
        options = options or PoolOptions()
        if engine not in ("hf", "vllm"):
            raise ValueError(f"a Ray pool holds `hf` or `vllm` engines, not {engine!r}")
        if options.workers < 1:
            raise ValueError(f"a Ray pool needs at least one worker, got {options.workers}")
        self.name = f"{engine} x{options.workers} (ray)"
        self.engine = engine
        self.model_path = model_path
        self.options = options
        self.version = 0
        self.replaced = 0
        """Actors replaced so far."""
        self._started_ray = False
        if not ray.is_initialized():
            if options.address is not None:
                ray.init(address=options.address, log_to_driver=False)
            else:
                cpus = max(os.cpu_count() or 1, int(options.workers * options.cpus_per_worker))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        have = ray.cluster_resources().get("GPU", 0)
        gpus = options.gpus_per_worker
        if gpus is None:
            gpus = 1 if have > 0 else 0
        self._resources = {"CPU": options.cpus_per_worker, "GPU": gpus}
        if self._started_ray and options.address is None and gpus * options.workers > have:
            ray.shutdown()  # a local Ray cannot grow: fail now, not after startup_timeout
            raise PoolError(
                f"{options.workers} rollout actors with {gpus} GPU each need "
                f"{gpus * options.workers:g} GPUs; this machine has {have:g}: lower "
                "rollout.workers or give rollout.ray_address of a cluster"
            )
        self._actor_class = ray.remote(
            num_cpus=options.cpus_per_worker, num_gpus=gpus, max_restarts=0
        )(EngineWorker)
        self._tokenizer = ray.put(tokenizer)
        self._weights: ray.ObjectRef | None = None  # the latest weights pushed, for replacements
        self._rng = random.Random(0)  # seeds for unseeded calls
        self.actors = [self._start() for _ in range(options.workers)]
        self._wait_ready(list(range(options.workers)))

    # -- RolloutEngine -------------------------------------------------------------------------

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams, rows: list[dict] | None = None
    ) -> list[Group]:
        rows = rows if rows is not None else [{} for _ in prompts]
        if len(rows) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(rows)} rows")
        if not prompts:
            return []
        seed = sampling.seed if sampling.seed is not None else self._rng.randrange(2**31)
        calls = {}
        for i, (lo, hi) in enumerate(_shards(len(prompts), len(self.actors))):
            shard = replace(sampling, seed=_shard_seed(seed, i))
            calls[i] = ("generate", (prompts[lo:hi], n, shard, rows[lo:hi]))
        done = self._run(calls)
        return [group for i in sorted(done) for group in done[i]]

    def load_weights(self, source: Any, version: int) -> None:
        state = {name: t.detach().cpu() for name, t in export_state_dict(source).items()}
        # Set before the push, so an actor replaced during it starts from these weights.
        self._weights, self.version = ray.put(state), version
        self._run({i: ("load_weights", (self._weights, version)) for i in range(len(self.actors))})

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The first actor's logprobs; `worker_logprobs` has every actor's."""
        return self._run({0: ("logprobs", (sequences,))})[0]

    def worker_logprobs(self, sequences: list[list[int]]) -> list[list[list[float]]]:
        """Every actor's logprobs of `sequences` (one list per actor), for the sync probe."""
        done = self._run({i: ("logprobs", (sequences,)) for i in range(len(self.actors))})
        return [done[i] for i in range(len(self.actors))]

    def sleep(self) -> None:
        self._run({i: ("sleep", ()) for i in range(len(self.actors))})

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    # -- actors --------------------------------------------------------------------------------

    def _start(self):
        return self._actor_class.remote(
            self.engine, self.model_path, self._tokenizer, self.options, self._weights, self.version
        )

    def _wait_ready(self, indices: list[int]) -> None:
        self._run({i: ("ready", ()) for i in indices}, timeout=self.options.startup_timeout)

    def _run(
        self, calls: dict[int, tuple[str, tuple]], timeout: float | None = None
    ) -> dict[int, Any]:
        """Call `method(*args)` on actor i for every `i: (method, args)`; return i -> result.

        An actor that dies is replaced and its call re-sent (a replacement starts from the
        latest weights). Errors raised by the engine itself are not retried.
        """
        pending = {getattr(self.actors[i], m).remote(*a): i for i, (m, a) in calls.items()}
        done: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                raise PoolError(
                    f"{len(pending)} rollout actor(s) did not answer within {timeout:.0f} s; "
                    f"each asks for {self._resources} and the cluster has "
                    f"{ray.cluster_resources()} (available: {ray.available_resources()})"
                )
            i = pending.pop(ready[0])
            method, args = calls[i]
            try:
                done[i] = ray.get(ready[0])
            except RayActorError as err:
                self._replace(i, method, err)
                pending[getattr(self.actors[i], method).remote(*args)] = i
        return done

    def _replace(self, i: int, method: str, err: Exception) -> None:
        if self.replaced >= self.options.restarts:
            raise PoolError(
                f"rollout actor {i} died during {method} after {self.replaced} replacement(s) "
                f"(the limit, rollout.worker_restarts={self.options.restarts}): {err}"
            ) from err
        self.replaced += 1
        ray.kill(self.actors[i])  # in case it is only unreachable
        self.actors[i] = self._start()
        print(
            f"[rollouts] actor {i} died during {method}; replaced "
            f"({self.replaced}/{self.options.restarts}), weights version {self.version}, "
            "its calls re-sent",
            file=sys.stderr,
            flush=True,
        )


def _shards(count: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges over `count` items, at most `workers`, sizes differing by <= 1."""
    parts = min(count, workers)
    size, extra = divmod(count, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + size + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _shard_seed(seed: int, shard: int) -> int:
    """A distinct, reproducible seed per shard of one call."""
    return (seed * 1_000_003 + shard) % 2**31
