"""Rollout engine on plain transformers: a KV-cached decode loop that returns logprobs.

The engine can share its model object with the trainer (the usual case on one device): then
`load_weights` only bumps the policy version. Given another module or a state dict, it copies
the weights in. Prompts are left-padded so every row decodes in lock-step; finished rows keep
decoding padding until the whole micro-batch is done.

Llama-family models decode through `rollouts/static_decode.py` (a static KV cache, attention
that reads grouped KV heads once, the step replayed as a CUDA graph on GPU); other models, or
`static_cache=False`, use transformers' own cache. Sampling runs on the model's device, by
inverse CDF (`inverse_cdf`: one uniform number per row); on CUDA with the static decoder,
temperature sampling with `top_p = 1` and greedy decoding draw inside the compiled step: with
Triton, by the kernels' inverse CDF over vocabulary chunks (one uniform number per row,
`rollouts/decode_kernels.py`); else by the Gumbel-max trick (`rollouts/draw.py`). The same
distribution as `_choose`, other draws for the same seed. Samples of one prompt share its
prefill (`StaticDecoder.start`'s `rows_B`).

Test: `pytest tests/test_rollouts_hf.py tests/test_static_decode.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from rollouts.decode_session import DecodeSession
from rollouts.static_decode import StaticDecoder, unsupported
from rollouts.types import Group, Sample, SamplingParams


class HFEngine:
    """Sampling with transformers models, in the caller's process."""

    name = "hf"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 256,
        static_cache: bool = True,
        compile: bool | None = None,
        fuse_weights: bool | None = None,
    ) -> None:
        """`static_cache`: decode through `StaticDecoder` when the model allows it. `compile`:
        `torch.compile` its decode step; None = on CUDA only (compiling pays off there).
        `fuse_weights`: the decoder's fused q/k/v and gate/up matmuls; None = on CUDA only."""
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.version = 0
        self._generators: dict[str, torch.Generator] = {}
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        )
        self.static_cache = static_cache and unsupported(model) is None
        self.compile = compile
        self.fuse_weights = fuse_weights
        self._decoder: StaticDecoder | None = None

    def load_weights(self, source: Any, version: int) -> None:
        if source is not self.model:
            state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
            self.model.load_state_dict(state)
        self.version = version

    def close(self) -> None:
        self.model = None

    def sleep(self) -> None:
        """Nothing to free: the static cache lives only during `generate`."""

    @torch.no_grad()
    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        device = next(self.model.parameters()).device
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
        was_training = self.model.training
        self.model.eval()
        # Right-padded: causal attention keeps real tokens from the padding, no mask needed
        # (the trainer's `posttrain.logprobs` runs the same way). No KV cache: in eval mode
        # transformers would build one, and compiled decoder layers (`train.compile`) then
        # recompile once per layer on its per-layer state (H200 GRPO run: dynamo's recompile
        # limit of 8 was hit in the first step).
        logits = self.model(input_ids=ids.to(device), use_cache=False).logits.float()
        self.model.train(was_training)
        picked = logits[:, :-1].gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        values = (picked - torch.logsumexp(logits[:, :-1], -1)).cpu().tolist()
        return [[0.0] + row[: len(seq) - 1] for row, seq in zip(values, sequences, strict=True)]

    def _generator(self, device: torch.device, seed: int | None) -> torch.Generator:
        """A fresh generator for a seeded call, else the engine's own one for `device`."""
        if seed is not None:
            return torch.Generator(device).manual_seed(seed)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device).manual_seed(0)
        return self._generators[key]

    @torch.no_grad()
    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams, rows: list[dict] | None = None
    ) -> list[Group]:
        rows = rows if rows is not None else [{} for _ in prompts]
        if len(rows) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(rows)} rows")
        device = next(self.model.parameters()).device
        generator = self._generator(device, sampling.seed)
        prompt_ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
        samples: list[list[Sample]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start : start + self.batch_size]
                outs = self.decode([ids for _, ids in chunk], sampling, generator)
                for (i, ids), (comp, logps, reason) in zip(chunk, outs, strict=True):
                    text = self.tokenizer.decode(comp, skip_special_tokens=True)
                    samples[i].append(
                        Sample(prompts[i], text, ids, comp, logps, reason, self.version)
                    )
        finally:
            self.model.train(was_training)
        return [Group(p, s, r) for p, s, r in zip(prompts, samples, rows, strict=True)]

    @torch.no_grad()
    def decode(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, generator: torch.Generator
    ) -> list[tuple[list[int], list[float], str]]:
        """Sample completions of token-id prompts in one lock-step batch: per row the completion
        ids, their logprobs and the finish reason."""
        device = next(self.model.parameters()).device
        batch, width = len(prompt_ids), max(len(p) for p in prompt_ids)
        if device.type == "cuda":  # few prompt widths: each new shape costs a compiled step
            width = -(-width // 64) * 64  # and a cuDNN attention plan
        # Each distinct prompt once (the n samples of a prompt share its prefill).
        distinct: dict[tuple[int, ...], int] = {}
        rows_B = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids])
        # Left-padded in one tensor call (a slice assignment per row cost ~15 ms at batch 256).
        pad = (self.pad_id,)
        input_ids = torch.tensor(
            [pad * (width - len(ids)) + ids for ids in distinct], dtype=torch.long
        )
        lengths_U = torch.tensor([len(ids) for ids in distinct])
        mask = (torch.arange(width) >= width - lengths_U[:, None]).long()
        input_ids, mask, rows_B = input_ids.to(device), mask.to(device), rows_B.to(device)
        # Checked per call: FSDP2 shards the shared model after the engine is built.
        session = None
        if self.static_cache and unsupported(self.model) is None:
            session = self._static_decoder(device).start(
                input_ids, mask, sampling.max_new_tokens, rows_B if len(distinct) < batch else None
            )
            logits, step = session.first_logits, session.step
        else:
            logits, step = self._transformers_steps(input_ids[rows_B], mask[rows_B])
        stop_ids = set() if sampling.ignore_eos else self.stop_ids
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        try:
            tokens_BT, logps_BT = self._sample_loop(
                logits, step, session, sampling, generator, stop, batch, device
            )
        finally:
            if session is not None:
                session.close()
        return _finish(tokens_BT, logps_BT, stop)

    def _sample_loop(
        self, logits: Tensor, step: Callable[[Tensor], Tensor], session: DecodeSession | None,
        sampling: SamplingParams, generator: torch.Generator | None, stop: Tensor,
        batch: int, device: torch.device,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Draw up to `max_new_tokens` per row: the first from `logits`, each next one after
        `step` (or, on CUDA, the session's draw inside its graph); rows stop at a stop token.
        Returns the tokens and their logprobs, `[batch, steps]` (pad after a row's stop)."""
        T = sampling.temperature
        if session is not None and device.type == "cuda" and sampling.top_p == 1.0:
            # The draw runs inside the compiled step and its CUDA graph (`rollouts.draw`).
            token, logp = session.first_draw(T, generator)
            advance = partial(session.step_sample, temperature=T, generator=generator)
        else:
            token, logp = _choose(logits, sampling, generator)
            advance = lambda token: _choose(step(token), sampling, generator)  # noqa: E731
        has_stops = stop.numel() > 0
        # Each "all rows done?" check waits for the device; on GPU look every few steps.
        check_every = 1 if device.type == "cpu" else 8
        tokens_BT, logps_BT = [], []
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for t in range(sampling.max_new_tokens):
            if has_stops:  # without stop tokens (ignore_eos) no row finishes early: no checks
                token = torch.where(done, self.pad_id, token)
            tokens_BT.append(token)
            logps_BT.append(logp)
            if t == sampling.max_new_tokens - 1:
                break
            if has_stops:
                done = done | torch.isin(token, stop)
                if (t + 1) % check_every == 0 and bool(done.all()):
                    break
            token, logp = advance(token)
        return torch.stack(tokens_BT, 1), torch.stack(logps_BT, 1)

    def _static_decoder(self, device: torch.device) -> StaticDecoder:
        """One decoder per engine, so a compiled step is reused across calls."""
        if self._decoder is None:
            compile = device.type == "cuda" if self.compile is None else self.compile
            fuse = device.type == "cuda" if self.fuse_weights is None else self.fuse_weights
            self._decoder = StaticDecoder(self.model, compile=compile, fuse_weights=fuse)
        return self._decoder

    def _transformers_steps(
        self, input_ids: Tensor, mask: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The prefill logits and a one-token step on transformers' own (dynamic) cache."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        state = {"cache": out.past_key_values, "mask": mask, "pos": positions[:, -1:] + 1}

        def step(token: Tensor) -> Tensor:
            ones = torch.ones_like(state["mask"][:, :1])
            state["mask"] = torch.cat([state["mask"], ones], 1)
            out = self.model(
                input_ids=token[:, None],
                attention_mask=state["mask"],
                position_ids=state["pos"],
                past_key_values=state["cache"],
                use_cache=True,
            )
            state["cache"], state["pos"] = out.past_key_values, state["pos"] + 1
            return out.logits[:, -1]

        return out.logits[:, -1], step


def _finish(
    tokens_BT: Tensor, logps_BT: Tensor, stop: Tensor
) -> list[tuple[list[int], list[float], str]]:
    """Per row the tokens and logprobs up to its first token in `stop` (the rest is padding)
    and the finish reason. The first stops are found on the tensors' device, not in Python
    loops over every token."""
    is_stop_BT = torch.isin(tokens_BT, stop.to(tokens_BT.device))
    stopped_B = is_stop_BT.any(1)
    lengths_B = torch.where(stopped_B, is_stop_BT.int().argmax(1) + 1, tokens_BT.shape[1])
    rows = zip(tokens_BT.tolist(), logps_BT.tolist(), lengths_B.tolist(), stopped_B.tolist(),
               strict=True)  # fmt: skip
    return [(t[:n], lp[:n], "stop" if hit else "length") for t, lp, n, hit in rows]


def _choose(
    logits: Tensor, sampling: SamplingParams, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One token per row and its logprob: greedy at temperature 0, else temperature + nucleus
    sampling."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = _draw(logp, sampling, generator)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def _draw(logp: Tensor, sampling: SamplingParams, generator: torch.Generator) -> Tensor:
    if sampling.temperature == 0:
        return logp.argmax(-1)
    if sampling.temperature == 1.0:
        probs = logp.exp()
    else:
        probs = torch.softmax(logp / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return inverse_cdf(probs, generator)


def inverse_cdf(probs_BV: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row of the (unnormalised) `probs_BV`: the first whose cumulative
    probability exceeds a uniform draw over the row's total. One random number per row, where
    `torch.multinomial` draws one per vocabulary entry (ten times slower at batch 256 on CPU)."""
    cdf_BV = probs_BV.double().cumsum(-1)
    u_B1 = torch.rand(
        (probs_BV.shape[0], 1), generator=generator, device=probs_BV.device, dtype=torch.float64
    )
    total_B1 = cdf_BV[:, -1:]
    # Kept below the total (rounding could reach it), so some token's cumulative probability
    # exceeds the draw: the last token of nonzero probability at the latest.
    draw_B1 = torch.minimum(u_B1 * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    return torch.searchsorted(cdf_BV, draw_B1, right=True).squeeze(-1)
