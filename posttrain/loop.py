"""The iterative loop of online stages: generate, score, prepare, update, sync, log.

It holds no loss math and no algorithm branches: the algorithm object supplies `prepare`
(scored groups -> batch) and `loss`; the learner does the optimizer step. Two optional
attributes of the algorithm object change the loop's behaviour without branches on the
algorithm: `forward(model, micro)` (what the learner runs before `loss`; default: per-token
logprobs) and `wants_more(groups, rewards, rounds)`: after each round of prompts -> generate ->
score, return True to draw another round before `prepare` (DAPO's dynamic sampling refills
the batch this way); without it an iteration generates once. `prepare` then receives the
groups of every round, and the logged reward means cover all of them. A third,
`minibatches(batch)`, lists the optimizer batches of one pass (PPO's shuffled minibatches);
default: the whole batch, one step per pass. The metrics logged are the last step's.

Under several processes (`posttrain.distributed`) every process runs the loop: each generates
(the engines stay in step, which FSDP2 needs, and the HF engine serves the unwrapped policy),
rank 0 scores, and its samples and scores are broadcast, so every process prepares the same
global batch and the learner trains on its share; only rank 0's tracker writes.

Test: `pytest tests/test_pipeline.py`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any, Protocol

from tqdm.auto import tqdm

from posttrain.data.format import prompt_text
from posttrain.distributed import broadcast_object, is_main
from posttrain.evaluate import Evaluator, brief
from posttrain.health import HealthMonitor, rollout_metrics
from posttrain.learner import Learner, logprobs_forward
from posttrain.reward_setup import reward_columns, reward_inputs
from posttrain.sync import SyncError
from posttrain.tracking import StageTracker
from rewards import Rubric, Scores
from rollouts import Group, RolloutEngine, SamplingParams


class Algorithm(Protocol):
    passes: int
    """Optimizer passes over each prepared batch."""

    def prepare(self, groups: list[Group], rewards: list[float]) -> Any: ...
    def loss(self, logprobs_BT, batch) -> tuple[Any, dict]: ...

    # Optional (see the module docstring):
    # def forward(self, model, micro) -> Any: ...
    # def wants_more(self, groups: list[Group], rewards: list[float], rounds: int) -> bool: ...
    # def minibatches(self, batch) -> list: ...  (one pass's optimizer batches; default [batch])


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
    start: int = 0
    """Iterations already done (a resumed stage: the learner and sampler are restored)."""
    final: dict[str, float] | None = None
    """The last evaluation before `start` (a resumed stage)."""
    checkpoint: Callable[[int, dict[str, Any]], None] | None = None
    """Called after every iteration with (iteration, loop state: the last evaluation and the
    health monitor's state); saves when due."""
    health: dict | None = None
    """The health monitor's state before `start` (a resumed stage)."""


def run_loop(p: LoopParts) -> dict[str, float]:
    """Run the iterations; return the last evaluation's metrics."""
    final: dict[str, float] = dict(p.final or {})
    if p.start:  # resumed: the engine serves the restored weights, not the stage's input
        p.engine.load_weights(p.learner.model, version=p.start)
    forward = getattr(p.algorithm, "forward", logprobs_forward)
    wants_more = getattr(p.algorithm, "wants_more", _one_round)
    minibatches = getattr(p.algorithm, "minibatches", _whole_batch)
    progress = tqdm(
        range(p.start + 1, p.iterations + 1),
        desc=p.name,
        unit="it",
        dynamic_ncols=True,
        initial=p.start,
        total=p.iterations,
        disable=not is_main(),
    )
    health = HealthMonitor(name=p.name)
    if p.health is not None:
        health.load_state(p.health)
    for it in progress:
        timer = Timer()
        groups: list[Group] = []
        scored: list[Scores] = []
        for rounds in count(1):  # one round unless the algorithm wants more (dynamic sampling)
            with timer("prompts"):
                rows = p.next_prompts()
                prompts = [prompt_text(r, p.tokenizer) for r in rows]
            with timer("generate"):
                sampling = _round_sampling(p.sampling(it), rounds)
                new = p.engine.generate(prompts, p.n, sampling, rows)
            with timer("reward"):
                # Several processes: rank 0's samples and scores for all (a judge is asked once).
                new, score = broadcast_object((new, _score(p.rubric, new)) if is_main() else None)
                scored.append(score)
            groups += new
            totals = [t for s in scored for t in s.total]
            if not wants_more(groups, totals, rounds):
                break
        samples = [s for g in groups for s in g.samples]
        scores = _concat(scored)
        with timer("prepare"):
            prepared = p.algorithm.prepare(groups, scores.total)
        metrics = {**scores.metrics(prefix="train/reward"), **rollout_metrics(groups, scores.total)}
        metrics["rollout/generation_rounds"] = float(rounds)
        metrics.update(prepared.metrics)
        p.engine.sleep()
        with timer("update"):
            if prepared.batch is not None:
                for _ in range(p.algorithm.passes):
                    for batch in minibatches(prepared.batch):
                        update = p.learner.update(batch, p.algorithm.loss, forward)
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
        metrics["health/warnings"] = health.report(metrics, it, progress.write)
        p.tracker.log(metrics, it)
        if p.samples_every and (it % p.samples_every == 0 or it == 1):
            p.tracker.log_samples(_sample_rows(samples, scores, prepared.advantages), it)
        progress.set_postfix(reward=f"{metrics['train/reward/total']:.3f}")
        if p.checkpoint is not None:
            p.checkpoint(it, {"final": final, "health": health.state()})
    return final


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        # Summed: a stage repeated within an iteration (refill rounds) adds up.
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def _one_round(groups: list[Group], rewards: list[float], rounds: int) -> bool:
    return False


def _whole_batch(batch: Any) -> list[Any]:
    return [batch]


def _round_sampling(params: SamplingParams, rounds: int) -> SamplingParams:
    """The iteration's parameters; a refill round gets a seed derived from the iteration's."""
    if rounds == 1 or params.seed is None:
        return params
    seed = random.Random(f"{params.seed}-round-{rounds}").getrandbits(31)
    return dataclasses.replace(params, seed=seed)


def _score(rubric: Rubric, groups: list[Group]) -> Scores:
    samples = [s for g in groups for s in g.samples]
    rows = [g.row for g in groups for _ in g.samples]
    prompts, completions = reward_inputs(
        rows, [s.prompt for s in samples], [s.completion for s in samples]
    )
    return rubric.score(
        prompts, completions, reward_columns(rows), [s.completion_ids for s in samples]
    )


def _concat(parts: list[Scores]) -> Scores:
    """The scores of several rounds as one, in order (a term a round lacks reads None)."""
    if len(parts) == 1:
        return parts[0]

    def join(field: str) -> dict[str, list]:
        names = dict.fromkeys(name for s in parts for name in getattr(s, field))
        return {
            name: [v for s in parts for v in getattr(s, field).get(name, [None] * len(s.total))]
            for name in names
        }

    errors: dict[str, int] = {}
    for s in parts:
        for name, n in s.errors.items():
            errors[name] = errors.get(name, 0) + n
    total = [t for s in parts for t in s.total]
    return Scores(total, join("components"), join("feedback"), errors)


def _sample_rows(samples, scores, advantages) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        row = {"prompt": s.prompt, "completion": s.completion}
        row.update({name: values[i] for name, values in scores.components.items()})
        row.update({f"{name}_feedback": notes[i] for name, notes in scores.feedback.items()})
        row.update({"total": scores.total[i], "advantage": advantages[i]})
        rows.append(row)
    return rows
