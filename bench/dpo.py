"""B5: DPO training throughput, posttrain's DPO step against TRL's DPOTrainer (issue 7).

Both systems train the same weights (loaded fresh by each with posttrain's `load_policy`) on the
same random preference pairs (prompt `--prompt-len` tokens, chosen and rejected responses of
random lengths in [1, `--max-response`]), in the same order, with reference log-probabilities
precomputed once before training (ours: the dpo stage's `pair_logps`; TRL:
`precompute_ref_log_probs=True`). Settings match: sigmoid loss, beta 0.1, batch and micro-batch
size in pairs, AdamW (torch, not fused), constant LR, clipping at 1.0, no gradient
checkpointing. Each system runs in its own subprocess, one after the other.

Ours is exactly the dpo stage's step: `algorithms.dpo.make_batch` + `Learner.update(batch,
dpo.loss, dpo.forward)`. TRL's is `DPOTrainer.train()`; its dataset is given pre-tokenized
(`prompt_ids`, `chosen_ids`, `rejected_ids`) and its text preparation is skipped (a subclass
returns the dataset as is), since random ids do not survive a decode/encode round trip.

Our step includes the levers that were measured here before they went into core: logprobs
in checkpointed chunks of the LM head, all-padding columns trimmed, micro-batches longest
first (`posttrain/logprobs.py`, `posttrain/batch.py` `longest_first`; `bench/RESULTS.md`).

Timed: the training steps only. The reference precompute is reported apart (TRL's includes the
trainer's construction, where it runs). Reported: pairs/s (median over the steps after the
warm-up), peak memory (CUDA allocator peak during training on GPU; peak RSS of the worker on
CPU), first-step time, and the step-1 gradient norm and step-2 loss (the step-1 loss is log 2 for
any model, as policy = reference), which match when both trained the same thing.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dpo.py --device cpu --model tiny --out dpo_cpu.json
    .venv/bin/python bench/dpo.py --device cuda --model qwen2-0.5b --out dpo_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

SYSTEMS = ("posttrain", "trl")

DEFAULTS = {
    "cpu": dict(
        pairs=256, batch_size=16, micro_batch_size=4, prompt_len=64, max_response=128, warmup=2
    ),  # fmt: skip
    "cuda": dict(
        pairs=2048, batch_size=32, micro_batch_size=4, prompt_len=256, max_response=512, warmup=3
    ),  # fmt: skip
}


def make_pairs(
    args: argparse.Namespace, vocab: int
) -> list[tuple[list[int], list[int], list[int]]]:
    """`(prompt, chosen, rejected)` random token ids (3..vocab-1, clear of the specials)."""
    import torch

    g = torch.Generator().manual_seed(args.seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    def length() -> int:
        return int(torch.randint(1, args.max_response + 1, (1,), generator=g))

    return [(ids(args.prompt_len), ids(length()), ids(length())) for _ in range(args.pairs)]


def run_posttrain(args, model, tokenizer, pairs, clock) -> dict[str, Any]:
    from functools import partial

    from posttrain.algorithms import dpo
    from posttrain.config.schema import DPOParams, SFTTrainConfig
    from posttrain.data.pairs import EncodedPair
    from posttrain.learner import Learner
    from posttrain.models.lora import reference_mode
    from posttrain.stages.dpo import pair_logps

    pad, micro = tokenizer.pad_token_id, args.micro_batch_size
    encoded = [EncodedPair(*p) for p in pairs]
    start = time.perf_counter()
    with reference_mode(model):  # as the stage does (a no-op without LoRA)
        refs = pair_logps(model, encoded, pad, micro)
    common.sync(args.device)
    precompute = time.perf_counter() - start
    train = SFTTrainConfig(lr=args.lr, batch_size=args.batch_size, micro_batch_size=micro,
                           max_steps=args.steps)  # fmt: skip
    learner = Learner(model, train, args.steps)
    loss_fn = partial(dpo.loss, cfg=DPOParams(beta=args.beta))
    losses, grad_norms = [], []
    common.reset_peak(args.device)
    clock.start()
    for step in range(args.steps):
        index = list(range(step * args.batch_size, (step + 1) * args.batch_size))
        batch = dpo.make_batch(
            [encoded[i] for i in index], pad, refs.chosen_P[index], refs.rejected_P[index]
        )
        metrics = learner.update(batch, loss_fn, dpo.forward)
        losses.append(metrics["loss"])
        grad_norms.append(metrics["grad_norm"])
        clock.tick()
    return {"losses": losses, "grad_norms": grad_norms, "precompute_s": precompute}


def run_trl(args, model, tokenizer, pairs, clock) -> dict[str, Any]:
    import tempfile

    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):  # already token ids
            return dataset

        def _get_train_sampler(self, *a, **k):  # step k trains on the same pairs as ours
            return SequentialSampler(self.train_dataset)

    losses: list[float] = []
    grad_norms: list[float] = []
    Timer = common.trl_step_timer(args.device, clock, losses, grad_norms)

    dataset = Dataset.from_dict(
        {
            "prompt_ids": [p for p, _, _ in pairs],
            "chosen_ids": [c for _, c, _ in pairs],
            "rejected_ids": [r for _, _, r in pairs],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        # A dataset on disk, so TRL can cache the precomputed reference logprobs next to it.
        dataset.save_to_disk(f"{tmp}/pairs")
        dataset = Dataset.load_from_disk(f"{tmp}/pairs")
        config = DPOConfig(
            **common.trl_train_args(args, f"{tmp}/out"),
            beta=args.beta,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=args.micro_batch_size,
            max_length=args.prompt_len + args.max_response,
            padding_free=False,
        )
        start = time.perf_counter()
        trainer = PreTokenized(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        common.sync(args.device)
        precompute = time.perf_counter() - start
        trainer.train()
    return {"losses": losses, "grad_norms": grad_norms, "precompute_s": precompute}


def worker(args: argparse.Namespace) -> None:
    import torch

    from posttrain.models.load import load_policy

    torch.manual_seed(args.seed)
    rss_before = common.current_rss_mib()
    path = common.model_path(args.model)
    model, tokenizer = load_policy(path, common.model_dtype(args.device), args.device, args.seed)
    pairs = make_pairs(args, model.config.vocab_size)
    clock = common.StepClock(args.device)
    run = run_trl if args.worker == "trl" else run_posttrain
    start = time.perf_counter()
    out = run(args, model, tokenizer, pairs, clock)
    total = time.perf_counter() - start
    stats = common.summarise(clock.seconds, args.warmup)
    measured = clock.seconds[1 + args.warmup :]
    result = {
        "system": args.worker,
        **stats,
        "pairs_per_s": args.batch_size / statistics.median(measured),
        "peak_memory_mib": common.peak_memory_mib(args.device),
        "rss_after_imports_mib": rss_before,
        "wall_s": total,
        **out,
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(next(model.parameters()).dtype),
    }
    Path(args.worker_out).write_text(json.dumps(result))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=common.MODELS, default=None, help="tiny on cpu, else 0.5B")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs (2048 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="default: pairs / batch size")
    p.add_argument("--warmup", type=int, default=None, help="steps after the first not measured")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None, help="pairs per forward")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--max-response", type=int, default=None, help="responses: 1..this tokens")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-6)
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
    if args.steps is None:
        args.steps = args.pairs // args.batch_size
    if args.steps * args.batch_size > args.pairs:
        p.error(f"--steps {args.steps} x --batch-size {args.batch_size} is over --pairs")
    return args


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    common.model_path(args.model)  # build the 0.5B model once, before the workers
    keys = ("device", "model", "pairs", "steps", "warmup", "batch_size", "micro_batch_size",
            "prompt_len", "max_response", "beta", "lr", "seed")  # fmt: skip
    forwarded = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    systems = [s for s in args.systems.split(",") if s]
    results = {s: common.run_worker(__file__, [*forwarded, "--worker", s]) for s in systems}
    env = common.manifest(args.device)
    settings = {k: getattr(args, k) for k in vars(args) if not k.startswith("worker")}
    print(f"\nB5 DPO, model {args.model} on {args.device}; {env}")
    print(
        f"{args.pairs} pairs, prompt {args.prompt_len}, responses 1-{args.max_response}; batch "
        f"{args.batch_size} x micro {args.micro_batch_size} pairs, {args.steps} steps (first "
        f"apart, {args.warmup} warm-up, median of {args.steps - 1 - args.warmup})\n"
    )
    base = results.get("trl")
    rows = []
    for system in systems:
        r = results[system]
        ratio = r["pairs_per_s"] / base["pairs_per_s"] if base else float("nan")
        step2 = r["losses"][1] if len(r["losses"]) > 1 else float("nan")
        rows.append([system, r["pairs_per_s"], f"{ratio:.2f}x", r["peak_memory_mib"],
                     r["first_step_s"], r["median_step_s"], r["precompute_s"],
                     f"{r['grad_norms'][0]:.5f}", f"{step2:.5f}"])  # fmt: skip
    headers = ["system", "pairs/s", "vs TRL", "peak MiB", "first step s", "median step s",
               "ref precompute s", "step-1 grad norm", "step-2 loss"]  # fmt: skip
    print(common.markdown_table(headers, rows))
    common.save_json(args.out, {"benchmark": "B5 dpo", "env": env, "settings": settings,
                                "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
