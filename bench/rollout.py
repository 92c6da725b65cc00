"""Rollout throughput: the HF engine, our vLLM engines, and raw `vllm.LLM.generate`.

All engines sample the same prompts (n samples each, temperature 1, the same length limit)
from the same weights, back to back in one process (the server engine in its own). Reported:
generated tokens per second, median over `--repeats` runs after one warm-up run.

    .venv/bin/python bench/rollout.py [--prompts 64] [--n 8] [--max-new-tokens 64]

The model is the untrained tiny model (`tiny://arithmetic`), which rarely emits EOS, so
nearly every sample runs to the length limit; tokens are counted, not assumed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _timed(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        runs.append((time.perf_counter() - start, tokens))
    seconds = statistics.median(r[0] for r in runs)
    return seconds, runs[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers
    import vllm
    from vllm import SamplingParams as VSampling

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.models.load import load_policy, resolve_model_path
    from rollouts import SamplingParams, create_engine

    path = resolve_model_path("tiny://arithmetic")
    model, tokenizer = load_policy(path, "float32", "cpu")
    prompts = [r["prompt"] for r in arithmetic_rows("test")[: args.prompts]]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)

    def count(groups) -> int:
        return sum(len(s.completion_ids) for g in groups for s in g.samples)

    results: list[tuple[str, float, int]] = []
    hf = create_engine("hf", model=model, tokenizer=tokenizer, batch_size=args.prompts * args.n)
    results.append(
        (
            "posttrain hf engine",
            *_timed(lambda: count(hf.generate(prompts, args.n, sampling)), args.repeats),
        )
    )

    engine = create_engine("vllm", model_path=path, tokenizer=tokenizer)
    ids = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False).input_ids} for p in prompts]
    raw_params = [
        VSampling(n=args.n, temperature=1.0, max_tokens=args.max_new_tokens, logprobs=0, seed=i)
        for i in range(len(prompts))
    ]

    def raw() -> int:
        outs = engine.llm.generate(ids, raw_params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    # Interleaved, so drift in machine speed hits both alike.
    ours_runs, raw_runs = [], []
    for _ in range(args.repeats):
        ours_runs.append(_timed(lambda: count(engine.generate(prompts, args.n, sampling)), 1))
        raw_runs.append(_timed(raw, 1))
    ours = (statistics.median(r[0] for r in ours_runs), ours_runs[0][1])
    raw_result = (statistics.median(r[0] for r in raw_runs), raw_runs[0][1])
    results.append(("posttrain vllm engine (in-process)", *ours))
    results.append(("raw vllm.LLM.generate", *raw_result))
    engine.close()

    if not args.skip_server:
        server = create_engine("vllm-server", model_path=path, tokenizer=tokenizer)
        try:
            results.append(
                (
                    "posttrain vllm-server engine",
                    *_timed(
                        lambda: count(server.generate(prompts, args.n, sampling)), args.repeats
                    ),
                )
            )
        finally:
            server.close()

    print(
        f"\n{args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} new tokens, "
        f"median of {args.repeats} after a warm-up"
    )
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, vllm {vllm.__version__}, {os.cpu_count()} CPUs, {platform.machine()}\n"
    )
    print("| engine | tokens | seconds | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, seconds, tokens in results:
        print(f"| {name} | {tokens} | {seconds:.3f} | {tokens / seconds:,.0f} |")
    ratio = (ours[1] / ours[0]) / (raw_result[1] / raw_result[0])
    print(f"\nin-process engine / raw vLLM tokens/s: {ratio:.1%}")


if __name__ == "__main__":
    main()
