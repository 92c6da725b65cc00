"""One optimizer step, the same for every algorithm.

`Learner.update(batch, loss_fn, forward)` splits the batch into micro-batches, runs
`forward(model, micro)` on each (default: per-token logprobs of `micro.input_ids_BT`; DPO runs
chosen and rejected together, PPO adds the critic's values), asks `loss_fn(outputs, micro)` for
a loss normalised by whole-batch counts, back-propagates, clips the gradient norm and steps
AdamW and the LR schedule. It knows nothing about the algorithm.

Test: `pytest tests/test_learner.py`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.batch import micro_batches
from posttrain.config.schema import OptimConfig
from posttrain.logprobs import token_logprobs

LossFn = Callable[[Any, Any], tuple[Tensor, dict[str, Tensor]]]
Forward = Callable[[nn.Module, Any], Any]


def logprobs_forward(model: nn.Module, micro: Any) -> Tensor:
    """The default forward: per-token logprobs of `micro.input_ids_BT` (see `logprobs.py`)."""
    return token_logprobs(model, micro.input_ids_BT, micro.attention_mask_BT)


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
        self.optimizer = torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(cfg, max(total_steps, 1))
        )
        self.step = 0
        self.calls = 0
        self.skipped = 0

    def update(
        self, batch: Any, loss_fn: LossFn, forward: Forward = logprobs_forward
    ) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.calls += 1
        totals: dict[str, float] = defaultdict(float)
        for micro in micro_batches(batch, self.cfg.micro_batch_size):
            loss, metrics = loss_fn(forward(self.model, micro), micro)
            if not torch.isfinite(loss):
                return self._non_finite(f"loss is {loss.item()}")
            loss.backward()
            totals["loss"] += loss.item()
            for key, value in metrics.items():
                totals[key] += float(value)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            return self._non_finite(f"gradient norm is {grad_norm}")
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        totals["grad_norm"] = grad_norm
        totals["skipped_steps"] = float(self.skipped)
        return dict(totals)

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
