"""Held-out evaluation: greedy completions of held-out prompts, scored by a rubric.

`eval/accuracy` is the fraction of prompts whose accuracy component scores >= 1;
`eval/reward` the mean weighted total; `eval/reward/<name>` each component's mean.
Under several processes every process generates and rank 0's scores are returned on all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.data.format import prompt_text
from posttrain.distributed import broadcast_object, is_main
from posttrain.reward_setup import reward_columns, reward_inputs
from rewards import Rubric
from rollouts import RolloutEngine, SamplingParams


@dataclass(frozen=True)
class Evaluator:
    rows: list[dict[str, Any]]
    rubric: Rubric
    accuracy_reward: str
    max_new_tokens: int
    batch_size: int = 512

    def __call__(self, engine: RolloutEngine, tokenizer: Any) -> dict[str, float]:
        greedy = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        prompts = [prompt_text(r, tokenizer) for r in self.rows]
        groups = engine.generate(prompts, 1, greedy, self.rows)
        # Several processes: all generate (FSDP2 forwards need every process), rank 0 scores.
        return broadcast_object(self._score(groups, prompts) if is_main() else None)

    def _score(self, groups: list, prompts: list[str]) -> dict[str, float]:
        completions = [g.samples[0].completion for g in groups]
        ids = [g.samples[0].completion_ids for g in groups]
        shown_prompts, shown = reward_inputs(self.rows, prompts, completions)
        scores = self.rubric.score(shown_prompts, shown, reward_columns(self.rows), ids)
        correct = [v is not None and v >= 1.0 for v in scores.components[self.accuracy_reward]]
        lengths = [len(g.samples[0].completion_ids) for g in groups]
        return {
            "eval/accuracy": sum(correct) / len(correct),
            "eval/reward": sum(scores.total) / len(scores.total),
            **{
                k: v
                for k, v in scores.metrics(prefix="eval/reward").items()
                if k != "eval/reward/total"
            },
            "eval/completion_length": sum(lengths) / len(lengths),
        }


def brief(metrics: dict[str, float]) -> str:
    """`eval/accuracy=0.870, eval/reward=0.870, ...`: the top-level evaluation metrics."""
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.count("/") == 1)
