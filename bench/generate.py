"""B2: rollout tokens/s of our HF engine versus transformers `generate` as TRL calls it.

TRL's GRPOTrainer without vLLM samples with `model.generate(input_ids, attention_mask,
generation_config=GenerationConfig(do_sample=True, temperature, top_p, top_k=0, min_p=None,
repetition_penalty=1.0, cache_implementation=None, disable_compile=True, ...))` on the whole
batch at once; that is the baseline. Ours is `rollouts.hf.HFEngine.decode` (static KV cache,
CUDA-graph step on GPU, compiled on GPU, the draw inside the step, Triton attention and draw
kernels and q/k/v and gate/up as one matmul each on CUDA), with four variants:
`posttrain-unfused` (`fuse_weights=False`: the seven projections of a layer as seven matmuls;
on CPU the same as `posttrain`),
`posttrain-no-compile` (static cache and CUDA graph, no `torch.compile`),
`posttrain-sdpa-decode` (one-token steps through `scaled_dot_product_attention` with a mask
instead of the matmul attention, `rollouts.static_decode.DECODE_ATTENTION`) and
`posttrain-dynamic-cache` (`static_cache=False`: transformers' dynamic cache in our loop).
Every row is forced to the full length (TRL side:
`min_new_tokens = max_new_tokens`; ours: `ignore_eos`), prompts are random token ids of one
length, temperature 1. Each system runs in its own subprocess (peak memory is its own).

    python bench/generate.py --device cuda --model qwen2-0.5b --batches 64 256 1024 \
        --prompt-len 128 --new-tokens 256 --out bench/results/generate-gpu.json
    python bench/generate.py --device cpu --model tiny --batches 64 256 \
        --prompt-len 64 --new-tokens 128

Reported per batch size: generated tokens/s (median of `--repeats` runs after one warm-up
run; the warm-up, which includes graph capture, is reported apart) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

SYSTEMS = (
    "posttrain",
    "posttrain-unfused",
    "posttrain-no-compile",
    "posttrain-sdpa-decode",
    "posttrain-dynamic-cache",
    "trl-generate",
)


def _prompts(batch: int, length: int, vocab: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def worker(args: argparse.Namespace) -> dict:
    import torch

    from posttrain.models.load import load_policy

    device = args.device
    model, tokenizer = load_policy(
        common.model_path(args.model), common.model_dtype(device), device
    )
    model.eval()
    vocab = min(model.config.vocab_size, 10_000)
    results = []
    for batch in args.batches:
        ids = _prompts(batch, args.prompt_len, vocab)
        run = _runner(args.system, model, tokenizer, ids, args.new_tokens, device)
        common.reset_peak(device)
        times, tokens = [], 0
        for _ in range(args.repeats + 1):
            common.sync(device)
            start = time.perf_counter()
            tokens = run()
            common.sync(device)
            times.append(time.perf_counter() - start)
        median = statistics.median(times[1:])
        results.append(
            {
                "batch": batch,
                "tokens": tokens,
                "first_run_s": times[0],
                "median_s": median,
                "tokens_per_s": tokens / median,
                "peak_mib": common.peak_memory_mib(device),
                "runs_s": times,
            }
        )
        print(f"{args.system} batch {batch}: {tokens / median:,.0f} tokens/s", flush=True)
        del run
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"system": args.system, "results": results}


def _runner(system, model, tokenizer, ids, new_tokens, device):
    import torch

    if system == "trl-generate":
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            min_p=None,
            repetition_penalty=1.0,
            cache_implementation=None,
            disable_compile=True,
        )
        inputs = ids.to(device)
        mask = torch.ones_like(inputs)

        @torch.no_grad()
        def run() -> int:
            out = model.generate(input_ids=inputs, attention_mask=mask, generation_config=config)
            return int((out.shape[1] - inputs.shape[1]) * out.shape[0])

        return run

    from rollouts import SamplingParams, static_decode
    from rollouts.hf import HFEngine

    if system == "posttrain-sdpa-decode":
        static_decode.DECODE_ATTENTION = "sdpa"

    engine = HFEngine(
        model,
        tokenizer,
        batch_size=ids.shape[0],
        static_cache=system != "posttrain-dynamic-cache",
        compile=False if system == "posttrain-no-compile" else None,
        fuse_weights=False if system == "posttrain-unfused" else None,  # None: on CUDA only
    )
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True)
    generator = torch.Generator(device).manual_seed(0)
    prompt_ids = ids.tolist()

    def run() -> int:
        outs = engine.decode(prompt_ids, sampling, generator)
        return sum(len(tokens) for tokens, _, _ in outs)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", choices=common.MODELS)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return

    common.model_path(args.model)  # build once, before the workers race for it
    shared = [
        *("--device", args.device, "--model", args.model, "--repeats", str(args.repeats)),
        *("--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)),
        "--batches",
        *map(str, args.batches),
    ]
    runs = {s: common.run_worker(__file__, [*shared, "--system", s]) for s in args.systems}
    rows = []
    for i, batch in enumerate(args.batches):
        base = runs.get("trl-generate", {}).get("results", [None] * len(args.batches))[i]
        for system, run in runs.items():
            r = run["results"][i]
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            rows.append(
                [
                    batch,
                    system,
                    r["tokens"],
                    r["first_run_s"],
                    r["median_s"],
                    r["tokens_per_s"],
                    ratio,
                    r["peak_mib"],
                ]  # fmt: skip
            )
    headers = ["batch", "system", "tokens", "first run s", "median s", "tokens/s",
               "x trl", "peak MiB"]  # fmt: skip
    print(common.markdown_table(headers, rows))
    common.save_json(
        args.out, {"manifest": common.manifest(args.device), "args": vars(args), "runs": runs}
    )


if __name__ == "__main__":
    main()
