"""Shared pieces of the training benchmarks (`bench/sft.py`, `bench/dpo.py`).

- the models: `tiny` (posttrain's `tiny://arithmetic`, for CPU) and `qwen2-0.5b` (a random-
  initialised Qwen2 config of Qwen2.5-0.5B's shape, built once and saved, so both systems load the
  same weights; it carries the tiny model's tokenizer: the data are random token ids, so only
  the pad id is read from it);
- workers: each system runs in its own subprocess, one after the other, so peak memory (CUDA
  allocator peak on GPU, peak RSS on CPU) belongs to one system only;
- timing: per-step wall times (after `torch.cuda.synchronize` on GPU); the first step is
  reported apart, the next `warmup` steps are dropped, the rest give the median;
- FLOPs, the PaLM convention (Chowdhery et al. 2022, appendix B): a training step on a
  sequence of T tokens costs 6*N*T + 12*L*d_attn*T^2, where N is the parameter count (a tied
  embedding counted once: its lookup is free, its LM-head matmul is not), L the layers and
  d_attn = heads*head_dim. The attention term counts the full (non-causal) T x T score matrix,
  as PaLM does. Padding tokens are not counted. MFU = achieved FLOP/s / 989 TFLOP/s (H100 SXM
  dense bf16), whatever GPU ran it;
- an environment manifest (versions, device, CPU count, date) saved with the results.

Run the benchmarks, not this file: see `bench/sft.py` and `bench/dpo.py`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

H100_BF16_FLOPS = 989e12
"""Dense bf16 peak of an H100 SXM, the MFU denominator the issue names."""

QWEN2_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151_936,
    tie_word_embeddings=True,
    max_position_embeddings=32_768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)
"""Qwen2.5-0.5B's shape (about 494M parameters)."""

MODELS = ("tiny", "qwen2-0.5b")


def default_cache() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def make_qwen2_05b(path: str | Path, seed: int = 0) -> Path:
    """Build (once) a random-initialised Qwen2 of Qwen2.5-0.5B's shape at `path`, in bf16, with
    the tiny model's tokenizer. Nothing is downloaded. Returns the folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from posttrain.models.tiny import build_tiny

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(build_tiny("arithmetic", seed=seed))
    config = Qwen2Config(
        **QWEN2_05B,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(path)
    return path


def model_path(name: str) -> str:
    """The folder both systems load for `--model name`."""
    if name == "tiny":
        from posttrain.models.load import resolve_model_path

        return resolve_model_path("tiny://arithmetic")
    if name == "qwen2-0.5b":
        return str(make_qwen2_05b(default_cache() / "bench" / "qwen2-0.5b-random-seed0"))
    raise ValueError(f"--model must be one of {MODELS}, got {name!r}")


def model_dtype(device: str) -> str:
    """bf16 on GPU (both systems train pure bf16), float32 on CPU."""
    return "bfloat16" if device.startswith("cuda") else "float32"


# --- FLOPs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopModel:
    params: int
    """Unique parameters (a tied embedding counted once)."""
    layers: int
    attn_width: int
    """heads * head_dim."""

    def step_flops(self, lengths: list[int]) -> float:
        """Training FLOPs (forward + backward) of sequences of these non-pad lengths."""
        return sum(
            6 * self.params * t + 12 * self.layers * self.attn_width * t * t for t in lengths
        )


def flop_model(model: Any) -> FlopModel:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return FlopModel(params, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)


# --- timing and memory -----------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: str) -> float:
    """Peak CUDA allocation since the last `reset_peak` on GPU; peak RSS of this process on CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def summarise(step_seconds: list[float], warmup: int) -> dict[str, Any]:
    """First step apart; the median (and spread) of the steps after `warmup` more."""
    measured = step_seconds[1 + warmup :]
    if len(measured) < 1:
        raise ValueError(
            f"{len(step_seconds)} steps timed; need more than 1 + warmup ({warmup}): raise --steps"
        )
    return {
        "first_step_s": step_seconds[0],
        "median_step_s": statistics.median(measured),
        "min_step_s": min(measured),
        "max_step_s": max(measured),
        "measured_steps": len(measured),
        "step_seconds": step_seconds,
    }


# --- environment and workers -----------------------------------------------------------------


def manifest(device: str) -> dict[str, Any]:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name()
    return out


def run_worker(script: str, args: list[str]) -> dict[str, Any]:
    """Run `script --worker-out FILE *args` in a fresh interpreter; return what it saved."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, script, *args, "--worker-out", str(out)]
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        result = json.loads(out.read_text())
        # Each system's numbers as soon as it ends, so a run cut short still tells something.
        brief = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
        print("result:", json.dumps(brief), flush=True)
        return result


def save_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results written to {path}")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class StepClock:
    """Wall time per step: `tick()` at each step's end (after a device sync)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.last = 0.0
        self.seconds: list[float] = []

    def start(self) -> None:
        sync(self.device)
        self.last = time.perf_counter()

    def tick(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now


def trl_step_timer(device: str, clock: StepClock, losses: list, grad_norms: list) -> type:
    """A transformers `TrainerCallback` class: resets the peak memory and starts `clock` when
    training begins, ticks it after each optimizer step, and records each logged loss and
    gradient norm into `losses` and `grad_norms`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            reset_peak(device)
            clock.start()

        def on_step_end(self, *a, **k):
            clock.tick()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                grad_norms.append(float(logs["grad_norm"]))

    return Timer


def trl_train_args(args: Any, output_dir: str) -> dict[str, Any]:
    """The `TrainingArguments` both TRL trainers get, matching our learner: `args.batch_size`
    rows per optimizer step in micro-batches of `args.micro_batch_size`, `args.steps` steps,
    torch AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) at a constant `args.lr`,
    clipping at 1.0, no gradient checkpointing, bf16 on GPU, a log line per step, no saving."""
    cuda = args.device.startswith("cuda")
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
