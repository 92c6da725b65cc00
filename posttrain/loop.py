"""The iterative loop of online stages: generate, score, prepare, update, sync, log.

It holds no loss math and no algorithm branches: the algorithm object supplies `prepare`
(scored groups -> batch) and `loss`; the learner does the optimizer step.

Test: `pytest tests/test_pipeline.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm

from posttrain.data.format import prompt_text
from posttrain.evaluate import Evaluator, brief
from posttrain.learner import Learner
from posttrain.reward_setup import reward_columns
from posttrain.sync import SyncError
from posttrain.tracking import StageTracker
from rewards import Rubric
from rollouts import Group, RolloutEngine, Sample, SamplingParams


class Algorithm(Protocol):
    passes: int
    """Optimizer passes over each prepared batch."""

    def prepare(self, groups: list[Group], rewards: list[float]) -> Any: ...
    def loss(self, logprobs_BT, batch) -> tuple[Any, dict]: ...


@dataclass
class LoopParts:
    name: str
    iterations: int
    next_prompts: Callable[[], list[dict]]
    engine: RolloutEngine
    n: int
    sampling: Callable[[int], SamplingParams]
    """Sampling parameters for an iteration (the seed changes per iteration)."""
    rubric: Rubric
    algorithm: Algorithm
    learner: Learner
    tokenizer: Any
    tracker: StageTracker
    evaluator: Evaluator | None
    eval_every: int
    samples_every: int
    probe: Callable[[list[list[int]]], float] | None = None
    """Largest engine-vs-trainer logprob gap on sequences after a sync; None = no probe."""
    probe_size: int = 8
    max_logprob_diff: float = 1e-2


def run_loop(p: LoopParts) -> dict[str, float]:
    """Run the iterations; return the last evaluation's metrics."""
    final: dict[str, float] = {}
    progress = tqdm(range(1, p.iterations + 1), desc=p.name, unit="it", dynamic_ncols=True)
    for it in progress:
        timer = Timer()
        with timer("prompts"):
            rows = p.next_prompts()
            prompts = [prompt_text(r, p.tokenizer) for r in rows]
        with timer("generate"):
            groups = p.engine.generate(prompts, p.n, p.sampling(it), rows)
        with timer("reward"):
            samples = [s for g in groups for s in g.samples]
            flat_rows = [g.row for g in groups for _ in g.samples]
            scores = p.rubric.score(
                [s.prompt for s in samples],
                [s.completion for s in samples],
                reward_columns(flat_rows),
                [s.completion_ids for s in samples],
            )
        with timer("prepare"):
            prepared = p.algorithm.prepare(groups, scores.total)
        metrics = {**scores.metrics(prefix="train/reward"), **_rollout_metrics(samples)}
        metrics.update(prepared.metrics)
        p.engine.sleep()
        with timer("update"):
            if prepared.batch is not None:
                for _ in range(p.algorithm.passes):
                    update = p.learner.update(prepared.batch, p.algorithm.loss)
                metrics.update({f"train/{k}": v for k, v in update.items()})
        with timer("sync"):
            p.engine.load_weights(p.learner.model, version=it)
        metrics["sync/seconds"] = timer.seconds["sync"]
        if p.probe is not None and p.probe_size > 0:
            probe = [s.prompt_ids + s.completion_ids for s in samples[: p.probe_size]]
            gap = metrics["sync/logprob_max_abs_diff"] = p.probe(probe)
            if gap > p.max_logprob_diff:
                raise SyncError(
                    f"after the weight sync of iteration {it}, the {p.engine.name} engine's "
                    f"logprobs differ from the trainer's by up to {gap:.3g} (bound "
                    f"rollout.max_logprob_diff={p.max_logprob_diff}): the engine is not "
                    "sampling from the policy being trained"
                )
        if p.evaluator and (it == p.iterations or (p.eval_every and it % p.eval_every == 0)):
            with timer("eval"):
                final = p.evaluator(p.engine, p.tokenizer)
            metrics.update(final)
            progress.write(f"[{p.name}] iteration {it}: " + brief(final))
        metrics.update(timer.metrics())
        p.tracker.log(metrics, it)
        if p.samples_every and (it % p.samples_every == 0 or it == 1):
            p.tracker.log_samples(_sample_rows(samples, scores, prepared.advantages), it)
        progress.set_postfix(reward=f"{metrics['train/reward/total']:.3f}")
    return final


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def _rollout_metrics(samples: list[Sample]) -> dict[str, float]:
    lengths = [len(s.completion_ids) for s in samples]
    return {
        "rollout/completion_length": sum(lengths) / len(lengths),
        "rollout/truncated_fraction": sum(s.finish_reason == "length" for s in samples)
        / len(samples),
    }


def _sample_rows(samples, scores, advantages) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        row = {"prompt": s.prompt, "completion": s.completion}
        row.update({name: values[i] for name, values in scores.components.items()})
        row.update({"total": scores.total[i], "advantage": advantages[i]})
        rows.append(row)
    return rows
