"""One batch decoding through `StaticDecoder`: its cache, one token per step, each step
replayed as a CUDA graph on GPU.

Test: `pytest tests/test_static_decode.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from rollouts.draw import draw, pick_in_row_chunks
from rollouts.fused_weights import unfuse


class DecodeSession:
    """The cache of one batch, stepping one token at a time: `step(tokens_B) -> logits_BV`, or
    `step_sample(tokens_B, ...) -> (next_tokens_B, their logprobs)` with the draw inside the
    step (inside the CUDA graph), for plain temperature sampling and greedy decoding. With
    `kernel_draw` (CUDA), that draw is the Triton kernels' (one uniform number per row); else
    `pick` on a `[B, vocab]` uniform buffer. `close` it when done (it restores the model's
    parameters after `fuse_weights`)."""

    def __init__(
        self, decoder: Any, cache: Any, next_pos_B: Tensor, first_slot: int,
        first_logits: Tensor, use_graph: bool, kernel_draw: bool = False,
    ) -> None:  # fmt: skip
        self.decoder, self.cache = decoder, cache
        self.first_logits = first_logits
        self._token_B = torch.zeros_like(next_pos_B)
        self._pos_B = next_pos_B.clone()
        self._slot = torch.tensor([first_slot], device=next_pos_B.device)
        self._next_slot = first_slot
        # Steps that run eagerly attend to the slots written so far; compiled steps and CUDA
        # graphs keep one shape (the whole cache).
        self._fixed_shape = use_graph or decoder.compiled
        self._graphs: dict[Any, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self._use_graph = use_graph
        self._noise: dict[tuple[int, ...], Tensor] = {}
        self._kernel_draw = kernel_draw
        self._closed = False

    @torch.no_grad()
    def step(self, tokens_B: Tensor) -> Tensor:
        """Feed the tokens just sampled; returns the logits for the next ones (with CUDA graphs,
        a buffer the next step overwrites: use or copy it before then)."""
        self._check_open()
        if self._fixed_shape:
            run = partial(self.decoder.decode_step, self.cache, self._token_B, self._pos_B,
                          self._slot)  # fmt: skip
        else:  # the slot as a slice: a plain strided write, and attention up to it
            slot = self._next_slot
            self.cache.valid_BS[:, slot] = True
            run = partial(self.decoder.decode_step, self.cache, self._token_B, self._pos_B,
                          slice(slot, slot + 1), slot + 1)  # fmt: skip
        return self._advance(tokens_B, "logits", run)

    @torch.no_grad()
    def first_draw(
        self, temperature: float, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """The first token per row and its logprob, drawn from the prefill's logits as the
        steps of `step_sample` draw theirs."""
        noise = self.noise(temperature, generator)
        if self._kernel_draw:
            return draw(self.first_logits, noise, temperature)
        return pick_in_row_chunks(self.first_logits, noise, temperature)

    @torch.no_grad()
    def step_sample(
        self, tokens_B: Tensor, temperature: float, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Feed the tokens just sampled; returns the next tokens and their logprobs (`draw`),
        the caller's to keep. The noise is drawn from `generator` before the step, outside the
        graph."""
        self._check_open()
        noise = self.noise(temperature, generator)
        run = partial(self.decoder.decode_sample, self.cache, self._token_B, self._pos_B,
                      self._slot, noise, temperature)  # fmt: skip
        token_B, logp_B = self._advance(tokens_B, ("sample", temperature), run)
        return token_B.clone(), logp_B.clone()  # a graph's outputs change at its next replay

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this decode session is closed: start a new one")

    def close(self) -> None:
        """End the session: the CUDA graphs and the cache are dropped (first, so their memory
        is free), then the model's parameters get their own storage back (with `fuse_weights`,
        `rollouts/fused_weights.py`). The session cannot step after `close`."""
        self._graphs.clear()
        self._closed = True
        fused, self.cache.fused = self.cache.fused, None
        self.cache.keys, self.cache.values, self.cache.prompts = [], [], None
        if fused is not None:
            unfuse(fused)

    def noise(self, temperature: float, generator: torch.Generator | None) -> Tensor:
        """The session's uniform noise for one draw, redrawn from `generator`: `[B]` for the
        kernel draw; else `[B, vocab]`, or at temperature 0 (argmax, no noise read) a `[B, 1]`
        stand-in. One buffer per shape: graphs keep its address."""
        B, V = self.first_logits.shape
        shape = (B,) if self._kernel_draw else (B, 1) if temperature == 0 else (B, V)
        if shape not in self._noise:
            self._noise[shape] = self.first_logits.new_zeros(shape, dtype=torch.float32)
        noise = self._noise[shape]
        if temperature != 0:
            noise.uniform_(generator=generator)
        return noise

    def _advance(self, tokens_B: Tensor, key: Any, run: Callable[[], Any]) -> Any:
        self._token_B.copy_(tokens_B)
        if not self._use_graph:
            out = run()
        else:
            if key not in self._graphs:
                self._graphs[key] = self._capture(run)
            graph, out = self._graphs[key]
            graph.replay()
        self._pos_B += 1
        self._slot += 1
        self._next_slot += 1
        return out

    def _capture(self, run: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        """Record one step as a CUDA graph, on a side stream. The warm-up step writes the same
        slot that the first replay writes again, so the cache stays right. Not through
        `torch.cuda.graph`, which empties the allocator's cache before every capture: the next
        call's prefill and cache would then be allocated from the driver again. The side
        stream is the decoder's one (`StaticDecoder.capture_stream`)."""
        cache_state = self.cache.valid_BS.clone()
        side = self.decoder.capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                run()
                self.cache.valid_BS.copy_(cache_state)
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin()
                try:
                    out = run()
                finally:
                    graph.capture_end()
                self.cache.valid_BS.copy_(cache_state)
        finally:  # also on errors: nothing is freed while the side stream may still use it
            torch.cuda.current_stream().wait_stream(side)
        return graph, out
