"""B4: GRPO step time, ours versus TRL's GRPOTrainer (transformers generation, no vLLM).

Both systems train the same weights on the same prompts with the same settings: 32 prompts x
8 samples per step, prompts of `--prompt-len` random digits (one token each with the embedded
tokenizer), `--new-tokens` new tokens forced (TRL: `min_new_tokens`; ours: `rollout.ignore_eos`;
ours reports its mean completion length), beta 0.04
with a frozen reference model, sequence-level loss (TRL `loss_type="grpo"`), group-scaled
advantages, micro-batches of 32 sequences, one optimizer step per generation, lr 1e-6, no
gradient checkpointing, no checkpoints saved. The reward is the same Python function, with
TRL's signature, for both (`bench/grpo_reward.py`). Ours runs the real `grpo` stage through
`posttrain.pipeline.run_pipeline` with the HF engine; `--engine vllm` runs ours with the
in-process vLLM engine and TRL with `use_vllm=True, vllm_mode="colocate"` (a system that fails
is reported as failed, the others still run).

    python bench/grpo.py --device cuda --model qwen2-0.5b --steps 13 \
        --out bench/results/grpo-gpu.json
    python bench/grpo.py --device cpu --model tiny --prompts 8 --prompt-len 32 --new-tokens 64

Reported: median step time over the steps after the first and `--warmup` more, the first
step apart, a breakdown (generate / reward / reference logprobs / update), peak memory.
Ours: step times are the wall time between consecutive metric lines; the breakdown is the
stage's own `time/*` metrics. TRL: step times from a trainer callback (after a device sync);
the breakdown from TRL's own profiling sections (`transformers.generate`,
`_calculate_rewards`, `_get_per_token_logps_and_entropies` under no-grad = reference), each
timed with a device sync around it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

HERE = Path(__file__).resolve().parent
SYSTEMS = ("posttrain", "trl")


def _prompts(count: int, length: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice("0123456789") for _ in range(length)) for _ in range(count)]


def _ours(args: argparse.Namespace, prompts: list[str], tmp: Path) -> dict:
    import torch

    from posttrain.config.load import validate_config
    from posttrain.config.schema import PipelineConfig
    from posttrain.pipeline import run_pipeline
    from posttrain.tracking import JsonlTracker

    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    stage = {
        "name": "grpo",
        "algo": "grpo",
        "iterations": args.steps,
        "data": {"source": str(data)},
        "rollout": {
            "engine": args.engine,
            "n": args.n,
            "max_new_tokens": args.new_tokens,
            "ignore_eos": True,
            "batch_size": args.prompts * args.n,
            "sync_probe": 8,  # its largest gap is reported (`sync_probe_max_diff`)
        },
        "rewards": [{"name": f"{HERE / 'grpo_reward.py'}:id_checksum"}],
        "grpo": {
            "prompts_per_iteration": args.prompts,
            "beta": 0.04,
            "zero_variance_groups": "keep",
        },
        "train": {"lr": 1e-6, "micro_batch_size": args.micro_batch},
    }
    raw = {
        "run": {"name": "bench-grpo", "seed": 0, "output_dir": str(tmp / "run"), "checkpoint_every": 10_000},
        "model": {"path": common.model_path(args.model), "dtype": common.model_dtype(args.device),
                  "device": args.device},
        "tracking": {"backend": "jsonl", "samples_every": 0},
        "stages": [stage],
    }  # fmt: skip
    cfg = validate_config(raw, "bench/grpo.py", PipelineConfig)
    stamps: list[float] = []
    log = JsonlTracker.log

    def stamped(self, metrics, step):
        stamps.append(time.perf_counter())
        log(self, metrics, step)

    JsonlTracker.log = stamped
    common.reset_peak(args.device)
    run_pipeline(cfg, overwrite=True)
    lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if x.get("stage") == "grpo" and "time/update" in x]
    steps = [sum(v for k, v in lines[0].items() if k.startswith("time/") and k != "time/eval")]
    steps += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    parts = {
        "generate": "time/generate",
        "reward": "time/reward",
        "reference": "time/prepare",
        "update": "time/update",
        "sync": "time/sync",
    }
    measured = lines[1 + args.warmup :]
    breakdown = {k: statistics.median(x[v] for x in measured) for k, v in parts.items()}
    return {
        **common.summarise(steps, args.warmup),
        "breakdown_s": breakdown,
        "completion_length_mean": statistics.mean(
            x["rollout/completion_length_mean"] for x in lines
        ),
        "sync_probe_max_diff": max(x.get("sync/logprob_max_abs_diff", 0.0) for x in lines),
        "peak_mib": common.peak_memory_mib(args.device),
        "torch": torch.__version__,
    }


def _trl(args: argparse.Namespace, prompts: list[str], tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    sys.path.insert(0, str(HERE))
    from grpo_reward import id_checksum

    sections: dict[str, list[float]] = {}
    enter, leave = profiling.ProfilingContext.__enter__, profiling.ProfilingContext.__exit__

    def timed_enter(self):
        common.sync(args.device)
        return enter(self)

    def timed_exit(self, *exc):
        common.sync(args.device)
        out = leave(self, *exc)
        return out

    def record(self, duration):
        sections.setdefault(self.name, []).append(duration)

    profiling.ProfilingContext.__enter__ = timed_enter
    profiling.ProfilingContext.__exit__ = timed_exit
    profiling.ProfilingContext._log_metrics = record

    clock = common.StepClock(args.device)
    per_step: list[dict[str, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not clock.seconds:
                clock.start()
            self.before = {n: sum(v) for n, v in sections.items()}

        def on_step_end(self, *a, **k):
            clock.tick()
            per_step.append({n: sum(v) - self.before.get(n, 0.0) for n, v in sections.items()})

    cuda = args.device.startswith("cuda")
    config = GRPOConfig(
        output_dir=str(tmp / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.prompts * args.n // args.micro_batch,
        num_generations=args.n,
        max_completion_length=args.new_tokens,
        # Forced lengths: transformers' and vLLM's names for it.
        generation_kwargs={
            ("min_tokens" if args.engine == "vllm" else "min_new_tokens"): args.new_tokens
        },
        temperature=1.0,
        beta=0.04,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        bf16=cuda,
        use_cpu=not cuda,
        model_init_kwargs={"dtype": common.model_dtype(args.device)},
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        # `--engine vllm`: TRL's own vLLM path, in the trainer's process, like ours.
        use_vllm=args.engine == "vllm",
        vllm_mode="colocate",
    )
    trainer = GRPOTrainer(
        model=common.model_path(args.model),
        reward_funcs=[id_checksum],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[Clock()],
    )
    common.reset_peak(args.device)
    trainer.train()
    measured = per_step[1 + args.warmup :]
    steps = clock.seconds

    def median_of(name: str) -> float:
        """Sections are named `<TrainerClass>.<name>`."""
        return statistics.median(
            sum(v for k, v in s.items() if k.endswith("." + name)) for s in measured
        )

    generate = median_of("transformers.generate") + median_of("vLLM.generate")
    reward = median_of("_calculate_rewards")
    logps = median_of("_get_per_token_logps_and_entropies")
    summary = common.summarise(steps, args.warmup)
    breakdown = {
        "generate": generate,
        "reward": reward,
        "reference": logps,
        "update": summary["median_step_s"] - generate - reward - logps,
    }
    return {
        **summary,
        "breakdown_s": breakdown,
        "breakdown_note": "reference = every _get_per_token_logps_and_entropies call (TRL runs "
        "it for the reference and, in the loss, for the policy under grad); update = the rest",
        "peak_mib": common.peak_memory_mib(args.device),
        "sections": sorted(sections),
    }


def worker(args: argparse.Namespace) -> dict:
    prompts = _prompts(args.prompts * args.steps, args.prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        run = _ours if args.system == "posttrain" else _trl
        return {"system": args.system, **run(args, prompts, Path(tmp))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", choices=common.MODELS)
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return

    common.model_path(args.model)
    passed = [a for a in sys.argv[1:] if not a.startswith("--out")]
    if "--out" in sys.argv:
        i = sys.argv.index("--out")
        passed = sys.argv[1:i] + sys.argv[i + 2 :]
    runs, failed = {}, {}
    for system in args.systems:
        try:
            runs[system] = common.run_worker(__file__, [*passed, "--system", system])
        except subprocess.CalledProcessError as error:  # e.g. TRL's vLLM mode on a CPU
            failed[system] = f"exit status {error.returncode} (its output is above)"
            print(f"{system} failed: {failed[system]}")
    base = runs.get("trl")
    rows = []
    for system, r in runs.items():
        b = r["breakdown_s"]
        speedup = base["median_step_s"] / r["median_step_s"] if base else float("nan")
        rows.append(
            [
                system,
                r["first_step_s"],
                r["median_step_s"],
                speedup,
                b["generate"],
                b["reward"],
                b["reference"],
                b["update"],
                r["peak_mib"],
            ]  # fmt: skip
        )
    headers = ["system", "first step s", "median step s", "x trl", "generate s", "reward s",
               "reference s", "update s", "peak MiB"]  # fmt: skip
    print(common.markdown_table(headers, rows))
    for system, why in failed.items():
        print(f"| {system} | failed: {why} |")
    common.save_json(
        args.out,
        {"manifest": common.manifest(args.device), "args": vars(args), "runs": runs,
         "failed": failed},
    )  # fmt: skip


if __name__ == "__main__":
    main()
