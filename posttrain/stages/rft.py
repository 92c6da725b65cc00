"""The rejection-sampling fine-tuning stage (RAFT): sample, score, keep the best, SFT steps.

The set-up is the iterative stages' (`stages/grpo.py` `run_iterative`); the algorithm object
is `algorithms/rft.py` `RFT`. No reference model is needed.

Test: `pytest tests/test_online_dpo_rft.py`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from posttrain.algorithms.rft import RFT
from posttrain.config.schema import RFTStage
from posttrain.stages.context import StageContext
from posttrain.stages.grpo import run_iterative


def run(stage: RFTStage, ctx: StageContext) -> dict[str, float]:
    def build(model: nn.Module, tokenizer: Any) -> RFT:
        return RFT(stage.rft, tokenizer.pad_token_id)

    return run_iterative(stage, ctx, stage.rft.prompts_per_iteration, build)
