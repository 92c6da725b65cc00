"""The online DPO stage: sample, score, pair best vs worst, DPO steps, every iteration.

The set-up is the iterative stages' (`stages/grpo.py` `run_iterative`); the algorithm object
is `algorithms/online_dpo.py` `OnlineDPO`. With `dpo.reference: input` the reference is the
stage's input model (a frozen copy; with LoRA the policy with its adapter disabled).

Test: `pytest tests/test_online_dpo_rft.py`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from posttrain.algorithms.online_dpo import OnlineDPO
from posttrain.config.schema import OnlineDPOStage
from posttrain.stages.context import StageContext
from posttrain.stages.grpo import frozen_reference, run_iterative


def run(stage: OnlineDPOStage, ctx: StageContext) -> dict[str, float]:
    def build(model: nn.Module, tokenizer: Any) -> OnlineDPO:
        reference = (
            frozen_reference(model, stage.train.compile) if stage.dpo.reference == "input" else None
        )
        judge = None
        if stage.online_dpo.judge is not None:
            from posttrain.config.load import ConfigError
            from rewards.judge_pairwise import pairwise_judge

            try:
                judge = pairwise_judge(**stage.online_dpo.judge)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"stage {stage.name!r}: online_dpo.judge: {err}") from err
        return OnlineDPO(
            stage.online_dpo,
            stage.dpo,
            tokenizer.pad_token_id,
            model,
            reference,
            stage.train.micro_batch_size,
            judge,
        )

    return run_iterative(stage, ctx, stage.online_dpo.prompts_per_iteration, build)
