"""Stage checkpoints: written atomically, restored exactly, the last k kept.

A checkpoint is a folder `<stage>/checkpoint-<step>/` holding
- `model/`: the policy in Hugging Face format (for LoRA: the adapter), usable as a model;
- `trainer.pt`: optimizer and LR-scheduler state, the learner's step, and the state dicts of
  any extra modules the stage registers (a critic, a refreshed reference);
- `rng.pt`: Python, NumPy and torch (CPU and CUDA) random states;
- `state.json`: the step, the sampler's position, and whatever the stage adds.

Under several processes (`posttrain.distributed`) rank 0 writes the checkpoint and the others
wait; each process keeps its own RNG state (`rng.pt` is rank 0's, `rng-<rank>.pt` the others').
When the policy is sharded over processes (FSDP2), the model and optimizer are saved sharded
instead (`sharded/`, `torch.distributed.checkpoint`, each process writing its shards; no
`model/` folder) and a resume needs the same kind of launch; the stage's output model is
gathered and saved whole.

Each one is written to a temporary folder and renamed into place, so a crash leaves either the
previous checkpoint or the new one, never half of one. Restoring loads all of it back, and
rewinds the stage's lines in `metrics.jsonl` and `samples-<stage>.jsonl` to the checkpoint's
step, so a resumed stage logs exactly what an uninterrupted one would have.

Test: `pytest tests/test_resume.py`.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posttrain import distributed
from posttrain.distributed import barrier, is_main
from posttrain.models.lora import is_peft, save_policy

PREFIX = "checkpoint-"
SHARDED = "sharded"


@dataclass
class Checkpointer:
    stage_dir: Path
    every: int
    """Save every this many steps (0 = only at the end of the stage)."""
    keep: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    modules: dict[str, nn.Module] = field(default_factory=dict)
    """Extra modules to save and restore beside the policy (critic, reference, ...)."""

    def due(self, step: int, last: int) -> bool:
        return step == last or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, learner: Any, state: dict[str, Any]) -> Path:
        """Write `checkpoint-<step>` atomically and drop the oldest beyond `keep`."""
        final = self.stage_dir / f"{PREFIX}{step}"
        tmp = self.stage_dir / f".tmp-{PREFIX}{step}"
        sharded = distributed.sharded(learner.model)
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        trainer = {
            "scheduler": learner.scheduler.state_dict(),
            "learner_step": learner.step,
            "learner_counts": {"calls": learner.calls, "skipped": learner.skipped},
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
        }
        if sharded:  # every process writes its shards
            import torch.distributed.checkpoint as dcp

            dcp.save(_sharded_state(learner), checkpoint_id=tmp / SHARDED)
        else:
            trainer["optimizer"] = learner.optimizer.state_dict()
        torch.save(_rng_state(), tmp / _rng_file())
        if is_main():
            if not sharded:
                learner.model.save_pretrained(tmp / "model")
            torch.save(trainer, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        barrier()
        if is_main():
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        found = [p for p in self.stage_dir.glob(f"{PREFIX}*") if p.name[len(PREFIX) :].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))

    def restore(self, learner: Any) -> dict[str, Any] | None:
        """Load the newest checkpoint into `learner` (and the extra modules); None if none."""
        found = self.checkpoints()
        if not found:
            return None
        path = found[-1]
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        if distributed.sharded(learner.model):
            if not (path / SHARDED).is_dir():
                raise RuntimeError(
                    f"checkpoint {path} holds a whole model, but the policy is sharded (FSDP2): "
                    "resume it with the launch that wrote it"
                )
            _load_sharded(learner, path / SHARDED)
        else:
            if not (path / "model").is_dir():
                raise RuntimeError(
                    f"checkpoint {path} is sharded (FSDP2): resume it with an FSDP2 launch of "
                    "as many processes as wrote it"
                )
            _load_model(learner.model, path / "model")
            learner.optimizer.load_state_dict(trainer["optimizer"])
        learner.scheduler.load_state_dict(trainer["scheduler"])
        learner.step = trainer["learner_step"]
        counts = trainer.get("learner_counts", {})
        learner.calls, learner.skipped = counts.get("calls", 0), counts.get("skipped", 0)
        for name, module in self.modules.items():
            module.load_state_dict(trainer["modules"][name])
        rng = path / _rng_file()
        _set_rng_state(torch.load(rng if rng.exists() else path / "rng.pt", weights_only=False))
        return json.loads((path / "state.json").read_text())


def _rng_file() -> str:
    return "rng.pt" if is_main() else f"rng-{distributed.rank()}.pt"


def _sharded_state(learner: Any) -> dict[str, Any]:
    """Model and optimizer state as this process's shards (`torch.distributed.checkpoint`)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(learner.model, _torch_optimizer(learner))
    return {"model": model, "optimizer": optim}


def _load_sharded(learner: Any, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(learner)
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        learner.model,
        _torch_optimizer(learner),
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def _torch_optimizer(learner: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (or the optimizer itself)."""
    return getattr(learner.optimizer, "optimizer", learner.optimizer)


def save_output(model: nn.Module, tokenizer: Any, folder: Path, lora: Any) -> None:
    """Save a stage's output policy from rank 0 (gathered first when sharded by FSDP2)."""
    if distributed.sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        whole = get_model_state_dict(model, options=options)  # every process takes part
        if is_main():
            model.save_pretrained(folder, state_dict=whole)
            tokenizer.save_pretrained(folder)
    elif is_main():
        save_policy(model, tokenizer, folder, lora)
    barrier()


def rewind_logs(run_dir: Path, stage: str, step: int) -> None:
    """Drop this stage's metric and sample lines logged after `step` (they will be redone).
    Rank 0's job: call it on that process only."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        keep = [
            line
            for line in metrics.read_text().splitlines()
            if not ((row := json.loads(line))["stage"] == stage and row["step"] > step)
        ]
        _write_atomic(metrics, keep)
    samples = run_dir / f"samples-{stage}.jsonl"
    if samples.exists():
        keep = [ln for ln in samples.read_text().splitlines() if json.loads(ln)["step"] <= step]
        _write_atomic(samples, keep)


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


def _load_model(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embed_tokens) are saved once; anything else missing is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    real_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {real_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
