"""Check a weight sync: the engine's logprobs of a probe batch against the trainer's.

After `engine.load_weights(policy)`, both should assign the same log-probability to every
token of the same sequences (up to numerics: ~1e-5 in float32). A larger gap means the engine
samples from another policy than the one being trained, which silently biases the update.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.batch import eval_mode, pad_right
from posttrain.logprobs import token_logprobs
from rollouts import RolloutEngine

FLOAT32_BOUND = 1e-2
HALF_BOUND = 0.1
"""The default bound in bfloat16/float16: the engine's path (full forward, or vLLM) and the
trainer's (compiled layers, chunked LM head) round differently; on the benchmark's random 0.5B
Qwen2 on an H200 the HF engine's probe read 0.043 (`bench/RESULTS.md`, B4)."""


def probe_bound(configured: float | None, policy: nn.Module) -> float:
    """`rollout.max_logprob_diff`, or its default for the policy's dtype."""
    if configured is not None:
        return configured
    dtype = next(policy.parameters()).dtype
    return FLOAT32_BOUND if dtype in (torch.float32, torch.float64) else HALF_BOUND


class SyncError(RuntimeError):
    """The rollout engine's logprobs disagree with the trainer's after a weight sync."""


@torch.no_grad()
def probe_logprob_diff(
    engine: RolloutEngine, policy: nn.Module, sequences: list[list[int]], pad_id: int
) -> float:
    """Largest |engine - trainer| logprob over every predicted token of `sequences`; for an
    engine with several workers (a Ray pool's `worker_logprobs`), the largest over all."""
    if getattr(engine, "follower", False):  # not rank 0: rank 0 probes its engine
        return 0.0
    per_worker = getattr(engine, "worker_logprobs", None)
    engine_lps = per_worker(sequences) if per_worker else [engine.logprobs(sequences)]
    ids, mask = pad_right(sequences, pad_id)
    with eval_mode(policy):
        trainer_lp = token_logprobs(policy, ids, mask).cpu()
    worst = 0.0
    for engine_lp in engine_lps:
        for row, (seq, values) in enumerate(zip(sequences, engine_lp, strict=True)):
            got = torch.tensor(values[1 : len(seq)], dtype=torch.float32)
            worst = max(worst, (got - trainer_lp[row, 1 : len(seq)]).abs().max().item())
    return worst
