"""Several training processes under `accelerate launch` (or `torchrun`): who this process is,
and the few collectives the pipeline needs.

Data parallelism here is simple: every process builds the same global batch (same data order,
same seeds; an online stage's rollouts and scores are broadcast from rank 0), the learner
trains on this process's contiguous share of its rows (`row_share`), and gradients are summed
over processes, so an update equals the one-process update on the same global batch. Rank 0
alone writes the run folder's shared files; the others wait at `barrier()`.

With one process (no `WORLD_SIZE` above 1 in the environment) every function is a no-op and
nothing from `accelerate` or `torch.distributed` is initialised. On a machine without CUDA the
processes talk through gloo (`PartialState(cpu=True)`), which is what the tests use.

Test: `pytest tests/test_distributed.py`.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def world_size() -> int:
    """Number of training processes (`WORLD_SIZE`, set by `accelerate launch` / `torchrun`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


@cache
def state() -> Any:
    """accelerate's `PartialState`; creating it joins the process group (gloo without CUDA)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    return state().process_index if is_distributed() else 0


def is_main() -> bool:
    """True on the one process that writes the run folder, logs and prints progress."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: `cuda:<local rank>` on GPUs, else the CPU."""
    return state().device


def barrier() -> None:
    """Wait until every process gets here (rank 0 has finished writing, say)."""
    if is_distributed():
        state().wait_for_everyone()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every process (pickled; for rollouts, scores, small dicts)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over processes (float64). Every process must pass the same keys."""
    if not is_distributed() or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    sums = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if state().backend == "nccl":
        sums = sums.to(device())
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return dict(zip(keys, sums.tolist(), strict=True))


def row_share(rows: int, index: int | None = None, size: int | None = None) -> slice:
    """Process `index`'s contiguous share of `rows` rows (sizes differ by at most one)."""
    index = rank() if index is None else index
    size = world_size() if size is None else size
    return slice(rows * index // size, rows * (index + 1) // size)


def sharded(model: torch.nn.Module) -> bool:
    """True when `model`'s parameters are sharded over processes (FSDP2 `fully_shard`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
