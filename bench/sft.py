"""B1: SFT training throughput, posttrain's SFT step against TRL's SFTTrainer (issue 7).

Both systems train the same weights (loaded fresh by each, with posttrain's `load_policy`, so
dtype and attention implementation match) on the same random token sequences, in the same
order, at the same settings: batch and micro-batch size, AdamW (torch, not fused), constant LR,
gradient clipping at 1.0, no gradient checkpointing, no packing, loss on every token after the
first. Each system runs in its own subprocess, one after the other. Two data shapes: `fixed`
(every sequence `--max-len` tokens) and `variable` (lengths uniform in [`--min-len`,
`--max-len`]).

Ours is exactly the sft stage's step: `algorithms.sft.make_batch` + `Learner.update(batch,
sft.loss)`. TRL's is `SFTTrainer.train()` on a pre-tokenized dataset (`input_ids` only, so labels
are the inputs), with a sequential sampler so step k sees the same sequences as ours.

Our step includes the levers that were measured here before they went into core: logprobs
in checkpointed chunks of the LM head, all-padding columns trimmed, micro-batches longest
first (`posttrain/logprobs.py`, `posttrain/batch.py` `longest_first`; `bench/RESULTS.md`).

Reported per system: tokens/s (non-pad tokens; median over the steps after the warm-up), MFU
(see `bench/common.py` for the FLOP formula), peak memory (CUDA allocator peak during training
on GPU; peak RSS of the worker process on CPU), first-step time, and the step-1 loss (equal
losses show both trained the same model on the same batch).

    # CPU, tiny model (the lead's quiet run drops OMP_NUM_THREADS=1)
    OMP_NUM_THREADS=1 .venv/bin/python bench/sft.py --device cpu --model tiny --out sft_cpu.json
    # GPU, the random 0.5B Qwen2
    .venv/bin/python bench/sft.py --device cuda --model qwen2-0.5b --out sft_gpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

SYSTEMS = ("posttrain", "trl")

# Per-device defaults: (batch, micro-batch, min length, max length, lr)
DEFAULTS = {
    "cpu": dict(batch_size=16, micro_batch_size=4, min_len=32, max_len=256, steps=15, warmup=2),
    "cuda": dict(batch_size=32, micro_batch_size=8, min_len=128, max_len=1024, steps=20, warmup=3),
}


def make_sequences(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """`steps * batch_size` random token sequences (ids 3.. vocab-1, clear of the specials)."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    n = args.steps * args.batch_size
    if args.data == "fixed":
        lengths = [args.max_len] * n
    else:
        lengths = torch.randint(args.min_len, args.max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (t,), generator=g).tolist() for t in lengths]


def run_posttrain(args, model, tokenizer, seqs, clock) -> list[float]:
    from posttrain.algorithms import sft
    from posttrain.config.schema import SFTTrainConfig
    from posttrain.learner import Learner

    train = SFTTrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_steps=args.steps,
        max_length=args.max_len,
        train_on_prompt=True,
    )
    learner = Learner(model, train, args.steps)
    losses, grad_norms = [], []
    common.reset_peak(args.device)
    clock.start()
    for step in range(args.steps):
        rows = seqs[step * args.batch_size : (step + 1) * args.batch_size]
        batch = sft.make_batch([([], s) for s in rows], tokenizer.pad_token_id, True)
        metrics = learner.update(batch, sft.loss)
        losses.append(metrics["loss"])
        grad_norms.append(metrics["grad_norm"])
        clock.tick()
    return losses, grad_norms


def run_trl(args, model, tokenizer, seqs, clock) -> list[float]:
    import tempfile

    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    class Sequential(SFTTrainer):
        def _get_train_sampler(self, *a, **k):  # step k trains on the same rows as ours
            return SequentialSampler(self.train_dataset)

    losses: list[float] = []
    grad_norms: list[float] = []
    Timer = common.trl_step_timer(args.device, clock, losses, grad_norms)

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            **common.trl_train_args(args, tmp),
            packing=False,
            padding_free=False,
            max_length=args.max_len,
        )
        trainer = Sequential(
            model=model,
            args=config,
            train_dataset=Dataset.from_dict({"input_ids": seqs}),
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        trainer.train()
    return losses, grad_norms


def worker(args: argparse.Namespace) -> None:
    import torch

    from posttrain.models.load import load_policy

    torch.manual_seed(args.seed)
    rss_before = common.current_rss_mib()
    path = common.model_path(args.model)
    model, tokenizer = load_policy(path, common.model_dtype(args.device), args.device, args.seed)
    flops = common.flop_model(model)
    seqs = make_sequences(args, model.config.vocab_size)
    clock = common.StepClock(args.device)
    start = time.perf_counter()
    run = run_trl if args.worker == "trl" else run_posttrain
    losses, grad_norms = run(args, model, tokenizer, seqs, clock)
    total = time.perf_counter() - start
    b = args.batch_size
    lengths = [[len(s) for s in seqs[i * b : (i + 1) * b]] for i in range(args.steps)]
    tokens = [sum(ls) for ls in lengths]
    step_flops = [flops.step_flops(ls) for ls in lengths]
    stats = common.summarise(clock.seconds, args.warmup)
    measured = range(1 + args.warmup, len(clock.seconds))
    tps = [tokens[i] / clock.seconds[i] for i in measured]
    fps = [step_flops[i] / clock.seconds[i] for i in measured]
    result = {
        "system": args.worker,
        "data": args.data,
        **stats,
        "tokens_per_s": _median(tps),
        "flops_per_s": _median(fps),
        "mfu_vs_h100_bf16": _median(fps) / common.H100_BF16_FLOPS,
        "peak_memory_mib": common.peak_memory_mib(args.device),
        "rss_after_imports_mib": rss_before,
        "train_wall_s": total,
        "losses": losses,
        "step1_loss": losses[0] if losses else None,
        "grad_norms": grad_norms,
        "tokens_per_step": tokens,
        "params": flops.params,
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(next(model.parameters()).dtype),
    }
    Path(args.worker_out).write_text(__import__("json").dumps(result))


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=common.MODELS, default=None, help="tiny on cpu, else 0.5B")
    p.add_argument("--data", choices=("fixed", "variable", "both"), default="both")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps, warm-up included")
    p.add_argument("--warmup", type=int, default=None, help="steps after the first not measured")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--min-len", type=int, default=None, help="shortest variable-length sequence")
    p.add_argument("--max-len", type=int, default=None, help="fixed length; longest variable")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        args.model = "tiny" if args.device == "cpu" else "qwen2-0.5b"
    if args.batch_size % args.micro_batch_size:
        p.error("--batch-size must be a multiple of --micro-batch-size")
    return args


def forwarded(args: argparse.Namespace, data: str) -> list[str]:
    keys = ("device", "model", "steps", "warmup", "batch_size", "micro_batch_size", "min_len",
            "max_len", "lr", "seed")  # fmt: skip
    out = ["--data", data]
    for k in keys:
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    common.model_path(args.model)  # build the 0.5B model once, before the workers race for it
    datas = ("fixed", "variable") if args.data == "both" else (args.data,)
    systems = [s for s in args.systems.split(",") if s]
    results: dict[str, dict[str, Any]] = {}
    for data in datas:
        for system in systems:
            results[f"{data}/{system}"] = common.run_worker(
                __file__, [*forwarded(args, data), "--worker", system]
            )
    env = common.manifest(args.device)
    settings = {k: getattr(args, k) for k in vars(args) if not k.startswith("worker")}
    print(f"\nB1 SFT, model {args.model} on {args.device}; {env}")
    print(
        f"batch {args.batch_size} x micro {args.micro_batch_size}, {args.steps} steps "
        f"(first apart, {args.warmup} warm-up, median of {args.steps - 1 - args.warmup}), "
        f"lengths {args.max_len} (fixed) / {args.min_len}-{args.max_len} (variable)\n"
    )
    rows = []
    for data in datas:
        base = results.get(f"{data}/trl")
        for system in systems:
            r = results[f"{data}/{system}"]
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            mfu = f"{r['mfu_vs_h100_bf16']:.2%}" if args.device == "cuda" else "n/a"
            rows.append([data, system, r["tokens_per_s"], f"{r['flops_per_s'] / 1e12:.4g}",
                         mfu, f"{ratio:.2f}x", r["peak_memory_mib"],
                         r["first_step_s"], r["median_step_s"], f"{r['step1_loss']:.5f}",
                         f"{r['grad_norms'][0]:.5f}"])  # fmt: skip
    headers = ["data", "system", "tokens/s", "TFLOP/s", "MFU (H100 bf16)", "vs TRL", "peak MiB",
               "first step s", "median step s", "step-1 loss", "step-1 grad norm"]  # fmt: skip
    print(common.markdown_table(headers, rows))
    common.save_json(args.out, {"benchmark": "B1 sft", "env": env, "settings": settings,
                                "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
