"""What a stage receives from the pipeline, and the pieces every stage builds the same way.

Every training process runs the stage; `resume`, `checkpoint` and `save_output` leave the
writing to rank 0 (see `posttrain.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from posttrain.checkpoint import Checkpointer, rewind_logs, save_output
from posttrain.config.schema import EvalConfig, PipelineConfig, RewardSpec
from posttrain.data.load import load_rows
from posttrain.distributed import barrier, is_main
from posttrain.evaluate import Evaluator
from posttrain.reward_setup import build_rubric
from posttrain.tracking import StageTracker


@dataclass(frozen=True)
class StageContext:
    config: PipelineConfig
    index: int
    """Position of the stage in the pipeline."""
    input_model: str
    """Path (or tiny:// / hub id) of the model the stage starts from."""
    stage_dir: Path
    config_dir: Path
    """Folder of the pipeline YAML: relative reward file paths may be given against it."""
    tracker: StageTracker

    @property
    def seed(self) -> int:
        return self.config.run.seed * 1000 + self.index

    @property
    def output_model(self) -> Path:
        return self.stage_dir / "model"

    @cached_property
    def checkpointer(self) -> Checkpointer:
        """Register extra modules to checkpoint with `ctx.checkpointer.modules[name] = m`."""
        run = self.config.run
        return Checkpointer(self.stage_dir, run.checkpoint_every, run.keep_checkpoints)

    def resume(self, learner: Any) -> dict[str, Any] | None:
        """Restore the stage's newest checkpoint (None if there is none) and rewind its logs."""
        state = self.checkpointer.restore(learner)
        # Lines logged after the checkpoint (all of them, starting afresh) will be logged again.
        step = state["step"] if state is not None else -1
        if is_main():
            rewind_logs(self.stage_dir.parent, self.stage_dir.name, step)
        barrier()
        if state is not None and is_main():
            print(f"[{self.stage_dir.name}] resuming from the checkpoint at step {step}")
        return state

    def checkpoint(self, step: int, total: int, learner: Any, **state: Any) -> None:
        """Save a checkpoint when one is due at `step` of `total` (always at the last)."""
        if self.checkpointer.due(step, total):
            self.checkpointer.save(step, learner, {"total": total, **state})

    def save_output(self, model: Any, tokenizer: Any) -> None:
        """Save the stage's output policy to `output_model` (rank 0; gathered under FSDP2)."""
        save_output(model, tokenizer, self.output_model, self.config.model.lora)


def build_evaluator(
    cfg: EvalConfig, stage_rewards: list[RewardSpec] | None, ctx: StageContext
) -> Evaluator | None:
    if cfg.data is None:
        return None
    rows = load_rows(cfg.data, need=("prompt|messages",))
    specs = cfg.rewards or stage_rewards or [RewardSpec(name="exact_answer")]
    rubric = build_rubric(specs, list(rows[0]), ctx.config_dir)
    names = [t.name for t in rubric.terms]
    accuracy = cfg.accuracy_reward or names[0]
    if accuracy not in names:
        raise ValueError(f"eval.accuracy_reward {accuracy!r} is not among the rewards {names}")
    return Evaluator(rows, rubric, accuracy, cfg.max_new_tokens)
