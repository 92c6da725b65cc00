"""One optimizer step, the same for every algorithm.

`Learner.update(batch, loss_fn, forward)` splits the batch into micro-batches, runs
`forward(model, micro)` on each (default: per-token logprobs of `micro.input_ids_BT`; DPO runs
chosen and rejected together, PPO adds the critic's values), asks `loss_fn(outputs, micro)` for
a loss normalised by whole-batch counts, back-propagates, clips the gradient norm and steps
AdamW and the LR schedule. It knows nothing about the algorithm.

Under several processes (`posttrain.distributed`) every process passes the same global batch
and trains on its own contiguous share of the rows; the model (and optimizer) are prepared by
`accelerate` (DDP, or FSDP2 from the `accelerate launch` config), which averages gradients over
processes, so each loss is scaled by the world size: losses are normalised by whole-batch
counts, so the per-process gradients add up to the one-process gradient of the global batch.
Every process runs the same number of micro-batches (a process whose share is short runs a row
with weight 0), since DDP and FSDP synchronise in each backward; the logged sums are reduced
over processes, so they equal one process's numbers.

Test: `pytest tests/test_learner.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from posttrain import distributed
from posttrain.batch import longest_first, micro_batches, num_rows, take_rows
from posttrain.compile_layers import compile_layers
from posttrain.config.schema import OptimConfig
from posttrain.logprobs import token_logprobs

LossFn = Callable[[Any, Any], tuple[Tensor, dict[str, Tensor]]]
Forward = Callable[[nn.Module, Any], Any]


def logprobs_forward(model: nn.Module, micro: Any) -> Tensor:
    """The default forward: per-token logprobs of `micro.input_ids_BT` (see `logprobs.py`),
    computed from each row's first loss position on (the losses are masked), so that rows
    sharing a prompt run it once (`posttrain/shared_prefix.py`)."""
    return token_logprobs(
        model, micro.input_ids_BT, micro.attention_mask_BT, getattr(micro, "loss_mask_BT", None)
    )


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite."""


class Learner:
    def __init__(
        self,
        model: nn.Module,
        cfg: OptimConfig,
        total_steps: int,
        param_groups: list[dict[str, Any]] | None = None,
    ) -> None:
        """`param_groups`: AdamW parameter groups in torch's format (`{"params": [...],
        "lr": ...}`, e.g. a policy and a PPO critic at their own learning rates); None = every
        trainable parameter of `model` at `cfg.lr`. The schedule scales every group alike and
        the gradient norm is clipped over all of them together."""
        self.model = model
        self.cfg = cfg
        if param_groups is None:
            param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.params = [p for group in param_groups for p in group["params"]]
        # The fused CUDA kernel: one launch for every parameter (same update as the default).
        fused = (
            bool(self.params)
            and all(p.is_cuda for p in self.params)
            and not distributed.is_distributed()
        )
        self.optimizer = torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(cfg, max(total_steps, 1))
        )
        self.train_model = model
        """What the learner's forward runs: `model`, or its DDP wrapper (FSDP2 shards `model`
        in place). `model` is the plain module the engine, the probe and checkpoints use."""
        self.accelerator: Any = None
        self.unsynced: list[nn.Parameter] = []
        """Trainable parameters outside `model` (a PPO critic): gradients summed by hand."""
        self.compiled = compile_layers(model, cfg.compile)
        if distributed.is_distributed():
            self._prepare()
        self.step = 0
        self.calls = 0
        self.skipped = 0

    def update(
        self, batch: Any, loss_fn: LossFn, forward: Forward = logprobs_forward
    ) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.calls += 1
        if not distributed.is_distributed():
            totals: dict[str, Any] = defaultdict(float)
            # Compiled layers never share prompts (`posttrain/shared_prefix.py`): sort by length.
            ordered = longest_first(batch, keep_prompts=not self.compiled)
            for micro in micro_batches(ordered, self.cfg.micro_batch_size):
                loss, metrics = loss_fn(forward(self.model, micro), micro)
                loss.backward()
                _add(totals, loss, metrics, 1.0)
            # Read back once, after every micro-batch is queued: a read per micro-batch would
            # make the host wait for the device each time. A non-finite loss has made the
            # gradients non-finite too; `_non_finite` drops them.
            totals = _floats(totals)
            if not math.isfinite(totals["loss"]):
                return self._non_finite(f"loss is {totals['loss']}")
        else:
            totals, bad = self._distributed_backward(batch, loss_fn, forward)
            if bad:
                return self._non_finite(bad)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        if self.accelerator is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        else:  # over the global gradient (DDP: all-reduced; FSDP2: DTensor shards)
            grad_norm = float(self.accelerator.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            return self._non_finite(f"gradient norm is {grad_norm}")
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        totals["grad_norm"] = grad_norm
        totals["skipped_steps"] = float(self.skipped)
        return dict(totals)

    def _prepare(self) -> None:
        """Wrap the model and optimizer for several processes, as `accelerate launch` says."""
        from accelerate import Accelerator

        distributed.state()  # joins the process group (gloo without CUDA) before Accelerator
        self.accelerator = Accelerator()
        if self.accelerator.distributed_type.name == "DEEPSPEED":
            raise NotImplementedError(
                "DeepSpeed is not supported: its engine steps the optimizer inside backward at a "
                "fixed gradient-accumulation count, while the learner accumulates a batch's "
                "micro-batches itself; use configs/accelerate/ddp.yaml or fsdp2.yaml"
            )
        inside = {id(p) for p in self.model.parameters()}
        self.unsynced = [p for p in self.params if id(p) not in inside]
        self.train_model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # FSDP2 swaps the parameters for sharded ones, in the optimizer too.
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def _distributed_backward(
        self, batch: Any, loss_fn: LossFn, forward: Forward
    ) -> tuple[dict[str, float], str]:
        """This process's share of `batch`, forward and backward; the summed metrics of every
        process and, when a loss was not finite somewhere, what to report (else "")."""
        size, world = self.cfg.micro_batch_size, distributed.world_size()
        rows = num_rows(batch)
        mine = take_rows(batch, distributed.row_share(rows))
        micros = [(m, 1.0) for m in micro_batches(mine, size)] if num_rows(mine) else []
        # As many micro-batches as the process with the largest share: a weight-0 row pads.
        longest = math.ceil(math.ceil(rows / world) / size)
        micros += [(take_rows(batch, slice(0, 1)), 0.0)] * (longest - len(micros))
        totals: dict[str, float] = defaultdict(float)
        bad = ""
        for index, (micro, weight) in enumerate(micros):
            last = index == len(micros) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.train_model):
                loss, metrics = loss_fn(forward(self.train_model, micro), micro)
                if weight and not torch.isfinite(loss) and not bad:
                    bad = f"loss is {loss.item()}"
                # DDP and FSDP average gradients over processes; the losses are already
                # normalised by whole-batch counts, so scale back to a sum.
                self.accelerator.backward(loss * (weight * world))
            _add(totals, loss, metrics, weight)
        totals = _floats(totals)
        for p in self.unsynced:  # scaled by `world` like the rest: the mean is the sum
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(self.accelerator.reduce(p.grad, reduction="mean"))
        totals["nonfinite_losses"] = float(bool(bad))
        totals = distributed.reduce_sums(dict(totals))
        if totals.pop("nonfinite_losses") and not bad:
            bad = "loss is not finite on another process"
        return totals, bad

    def _non_finite(self, what: str) -> dict[str, float]:
        """Stop (`on_nonfinite: stop`), or drop this step's gradients and go on (`skip`)."""
        where = f"{what} at optimizer step {self.step + 1} (update call {self.calls})"
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{where}; lower the learning rate, check the data and rewards, or set "
                "train.on_nonfinite: skip to drop such steps"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        print(f"warning: {where}: step skipped ({self.skipped} so far)")
        return {"skipped_steps": float(self.skipped), "lr": self.scheduler.get_last_lr()[0]}


def _add(totals: dict[str, Any], loss: Tensor, metrics: dict[str, Any], weight: float) -> None:
    """Add a micro-batch's loss and metrics (a weight-0 padding row adds zeros, same keys),
    tensors still on the device."""
    totals["loss"] += loss.detach() if weight else 0.0
    for key, value in metrics.items():
        value = value.detach() if isinstance(value, Tensor) else float(value)
        totals[key] += value if weight else 0.0


def _floats(totals: dict[str, Any]) -> dict[str, float]:
    return defaultdict(float, {key: float(value) for key, value in totals.items()})


def _schedule(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
