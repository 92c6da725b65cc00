"""Fast decoding for Llama-family models: a static KV cache, grouped-query attention that never
expands the KV heads, and (on CUDA) the one-token step replayed as a CUDA graph.

The decoder runs the model's own submodules (embedding, norms, the q/k/v/o projections, LoRA-
wrapped ones included, the MLP, the rotary embedding, the head), so it shares the trainer's
weights: nothing needs syncing. Only the attention is its own: the queries of the heads that
share a KV head are laid side by side, so each KV head is read once (in torch code,
`rollouts/torch_attention.py`; on CUDA, the one-token steps' Triton kernel,
`rollouts/decode_kernels.py`). Samples of one
prompt share its prefill; eager steps (CPU) also keep its keys and values once and read them
once per group (`rollouts/grouped_attention.py`). The cache lives
only for one `generate` call, so the memory goes back to the trainer between rollouts. With
`fuse_weights`, the prefill and each step run q/k/v and gate/up as one matmul each, on the
model's weights laid side by side for the call (`rollouts/fused_weights.py`).

Supported: model types in `SUPPORTED` with full attention in every layer; `unsupported(model)`
says why another model falls back to the plain transformers loop.

Test: `pytest tests/test_static_decode.py` (logits equal to the transformers forward).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollouts import decode_kernels
from rollouts.decode_session import DecodeSession
from rollouts.draw import draw, pick
from rollouts.fused_weights import FusedLayer, fuse_layers, mlp_forward, project_qkv, unfuse
from rollouts.grouped_attention import attend_grouped, grouped_rows
from rollouts.torch_attention import allowed_slots, attend, rotate, write_slots

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
PREFILL_TOKENS = 16_384
"""Prompt tokens prefilled at once on CUDA, at most."""
PREFILL_SHARE = 1.0
"""The prefill's MLP activations (gate/up and their product: 6 * intermediate bytes per 16-bit
token, an upper bound) are kept within this share of the cache they sit on. The whole cache is
allocated before the prefill, so without a bound a small batch peaked above transformers
`generate` (B2 on an H200 at batch 64: 1,642 MiB with its 8,192 prompt tokens at once, against
1,515; with 1.0, four parts of 2,048 tokens: 1,506 MiB, and 1,461 once graph captures kept to
one stream). Batches of 256 and more (0.5B model, prompt 128, 256 new) are not affected:
`PREFILL_TOKENS` is smaller."""
CPU_PREFILL_TOKENS = 1_024
"""Elsewhere: the prefill's MLP activations sit on top of the preallocated cache. Tiny model,
64-token prompts, peak RSS of a process decoding 64 then 256 rows: 515 / 776 MiB with 16,384
tokens at once, 478 / 555 MiB with 1,024 (below transformers `generate`: `bench/RESULTS.md`)."""
DECODE_ATTENTION = "matmul"
"""One-token steps in torch code: `matmul` (two batched matmuls and a masked softmax, which the
compiled step fuses) or `sdpa` (`scaled_dot_product_attention` with a boolean mask); see
`bench/RESULTS.md` for the measurement behind the choice."""
KERNELS = True
"""On CUDA with Triton and a 16-bit model, fixed-shape steps (CUDA graphs, compiled steps)
attend with `rollouts/decode_kernels.py`, and every draw inside the decoder (the first token's
too) uses its kernels; False keeps torch code everywhere."""

__all__ = ["DecodeSession", "StaticDecoder", "causal_lm", "pick", "unsupported"]


def causal_lm(model: nn.Module) -> nn.Module:
    """The `*ForCausalLM` module inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model: nn.Module) -> str | None:
    """Why the static decoder cannot run `model`, or None when it can."""
    lm = causal_lm(model)
    cfg = getattr(lm, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} (static decoding supports {', '.join(SUPPORTED)})"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "sliding-window attention layers"
    if kind == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        return "sliding-window attention"
    body = getattr(lm, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or not all(hasattr(body, n) for n in needed) or not hasattr(lm, "lm_head"):
        return "an unexpected module layout"
    if _is_dtensor(next(lm.parameters(), None)):
        # FSDP2 gathers a layer's weights in hooks on the layers and the root forward; the
        # decoder calls the submodules themselves.
        return "parameters sharded by FSDP2"
    return None


@dataclass
class _Cache:
    keys: list[Tensor]
    """Per layer `[B, kv_heads, S, head_dim]`."""
    values: list[Tensor]
    valid_BS: Tensor
    """True where a slot holds a real token (not left padding, not yet written)."""
    unpadded: bool = False
    """Every slot holds a real token (prompts without left padding): no mask needed."""
    prompts: _Cache | None = None
    """Eager steps over rows in equal groups per prompt: the distinct prompts' cache, read
    once per group (`rollouts/grouped_attention.py`); the rows' own cache then holds only
    generated tokens."""
    fused: list[FusedLayer] | None = None
    """Per layer, q/k/v and gate/up weights side by side (the model's parameters are views
    of them until the session closes)."""
    kernel_attention: bool = False
    """Fixed-shape one-token steps attend with the Triton kernel (`decode_kernels`)."""


class StaticDecoder:
    """Prefill a left-padded batch into a static cache, then decode one token per call."""

    def __init__(
        self, model: nn.Module, cuda_graphs: bool = True, compile: bool = False,
        fuse_weights: bool = False,
    ) -> None:  # fmt: skip
        """`cuda_graphs`: replay the decode step as a CUDA graph (CUDA only). `compile`: run
        the decode step (and, on CUDA, the prefill) through `torch.compile` first (fuses the
        small kernels of a step; the first call of each batch shape compiles). `fuse_weights`:
        the prefill and steps run q/k/v and gate/up as one matmul each, the model's parameters
        being views of the fused weights until `DecodeSession.close`
        (`rollouts/fused_weights.py`)."""
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"static decoding cannot run this model: {reason}")
        self.lm = causal_lm(model)
        self.body = self.lm.model
        cfg = self.lm.config
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = self.body.layers[0].self_attn.head_dim
        self.group = cfg.num_attention_heads // self.kv_heads
        self.cuda_graphs = cuda_graphs
        self.compiled = compile
        self.fuse_weights = fuse_weights
        # The prefill compiled too, on CUDA only (B2 on an H200: 102 -> 56 ms for 256 prompts
        # of 128 tokens; on CPU the compilation would outweigh it).
        self.prefill = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self.decode_step = torch.compile(self._step, dynamic=False) if compile else self._step
        self.decode_sample = (
            torch.compile(self._step_sample, dynamic=False) if compile else self._step_sample
        )
        self._capture_stream: torch.cuda.Stream | None = None

    def capture_stream(self) -> torch.cuda.Stream:
        """The side stream on which every session of this decoder captures its CUDA graphs.
        One for all: cuBLAS keeps a workspace for each stream it has run on (~33 MiB on an
        H200) for the life of the process, so a new stream per generate call left one more
        workspace behind each call, up to torch's pool of 32 streams. B2 on an H200: the peak
        grew ~33 MiB per call before; with one stream 1,461 / 2,748 / 6,348 MiB at batch 64 /
        256 / 1024, against 1,506 / 2,909 / 6,585 with four calls per batch."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream()
        return self._capture_stream

    # -- one pass of the decoder over T new positions -----------------------------------------

    def _forward(
        self, cache: _Cache, ids_BT: Tensor, pos_BT: Tensor, slots: Any, visible: int | None = None,
        whole_prompts: bool = False,
    ) -> Tensor:  # fmt: skip
        """Run `ids_BT` at positions `pos_BT`, writing their keys/values at cache `slots` (a
        slice for the prefill, a 1-element index tensor for a decode step). `visible`: attend
        to the first `visible` slots only (the ones written so far; None = all, a fixed shape
        for compiled steps and CUDA graphs). `whole_prompts`: a prefill of prompts without
        padding from slot 0, whose tokens then attend causally among themselves only (flash
        attention, no mask). Returns the last position's hidden state after the final norm,
        `[B, hidden]`."""
        h = self.body.embed_tokens(ids_BT)
        cos_BTD, sin_BTD = self.body.rotary_emb(h, pos_BT)
        B, T = ids_BT.shape
        prompts = cache.prompts
        kernel = cache.kernel_attention and T == 1 and not isinstance(slots, slice)
        if kernel:  # the kernel writes the step's slot and reads the ones before; marked here
            cache.valid_BS.index_fill_(1, slots, True)
        causal = whole_prompts and prompts is None
        allowed = (
            None if prompts or kernel or causal
            else allowed_slots(cache.valid_BS, slots, T)[..., :visible]
        )  # fmt: skip
        for i, layer in enumerate(self.body.layers):
            attn, fused = layer.self_attn, cache.fused[i] if cache.fused else None
            qkv = project_qkv(attn, fused, layer.input_layernorm(h))
            q, k, v = (t.view(B, T, -1, self.head_dim) for t in qkv)
            if hasattr(attn, "q_norm"):  # qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            if kernel:  # rotary, cache write and attention in one kernel
                out = decode_kernels.decode_attention(
                    q[:, 0], k[:, 0], v[:, 0], cos_BTD[:, 0], sin_BTD[:, 0], cache.keys[i],
                    cache.values[i], cache.valid_BS, slots, attn.scaling,
                )  # fmt: skip
            else:
                q, k = rotate(q, cos_BTD, sin_BTD), rotate(k, cos_BTD, sin_BTD)
                out = self._torch_attention(cache, i, q, k, v, slots, visible, allowed,
                                            attn.scaling, causal)  # fmt: skip
            h = h + attn.o_proj(out.reshape(B, T, -1))
            h = h + mlp_forward(layer.mlp, fused, layer.post_attention_layernorm(h))
        return self.body.norm(h[:, -1])

    def _torch_attention(
        self, cache: _Cache, i: int, q_BTHD: Tensor, k_BTKD: Tensor, v_BTKD: Tensor, slots: Any,
        visible: int | None, allowed: Tensor | None, scale: float, causal: bool = False,
    ) -> Tensor:  # fmt: skip
        """Layer `i`'s attention in torch code, rotated queries and keys in: writes the new keys
        and values at `slots`, returns `[B, T, H, D]`. `causal`: the new tokens are whole
        prompts, attending causally among themselves."""
        q, k, v = q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2)
        write_slots(cache.keys[i], slots, k)
        write_slots(cache.values[i], slots, v)
        if causal:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=True
            )
            return out.transpose(1, 2)
        keys, values = cache.keys[i][:, :, :visible], cache.values[i][:, :, :visible]
        prompts = cache.prompts
        if prompts is None:
            out = attend(q, keys, values, allowed, scale, DECODE_ATTENTION)
        else:
            valid = None if prompts.unpadded else prompts.valid_BS
            out = attend_grouped(q, prompts.keys[i], prompts.values[i], valid, keys, values, scale)
        return out.transpose(1, 2)

    def logits(self, hidden_BH: Tensor) -> Tensor:
        return self.lm.lm_head(hidden_BH)

    def _step(
        self,
        cache: _Cache,
        token_B: Tensor,
        pos_B: Tensor,
        slot: Any,
        visible: int | None = None,
    ) -> Tensor:
        """One decode step: the logits after `token_B`, written at cache `slot` (a 1-element
        index tensor; or, with `visible`, a slice whose `valid_BS` column is already set)."""
        return self.logits(self._forward(cache, token_B[:, None], pos_B[:, None], slot, visible))

    def _step_sample(
        self, cache: _Cache, token_B: Tensor, pos_B: Tensor, slot: Tensor, noise: Tensor,
        temperature: float,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """One decode step and the next token drawn from its logits (`rollouts.draw.draw`:
        `noise`: uniform numbers, `[B, vocab]` or, for the kernels, `[B]`)."""
        return draw(self._step(cache, token_B, pos_B, slot), noise, temperature)

    # -- a generation session -----------------------------------------------------------------

    @torch.no_grad()
    def start(
        self, ids_UP: Tensor, mask_UP: Tensor, max_new_tokens: int, rows_B: Tensor | None = None
    ) -> DecodeSession:
        """Prefill left-padded prompts; the session then decodes up to `max_new_tokens`.
        `rows_B`: row b decodes prompt `rows_B[b]` (each distinct prompt is prefilled once and
        its cache copied to its rows); None = one row per prompt."""
        shared = rows_B is not None
        B, P = (rows_B.shape[0] if shared else ids_UP.shape[0]), ids_UP.shape[1]
        use_graph = self.cuda_graphs and ids_UP.device.type == "cuda"
        kernels = KERNELS and decode_kernels.load(ids_UP.device)  # imported here, not traced
        # Eager steps keep a prompt's cache once for its rows (compiled steps and CUDA graphs
        # keep the one-cache layout they were built for).
        grouped = (
            shared and P > 0 and not (use_graph or self.compiled)
            and grouped_rows(rows_B, ids_UP.shape[0])
        )  # fmt: skip
        S = max_new_tokens if grouped else P + max_new_tokens
        if self.compiled:  # few cache lengths, so few compilations
            S = -(-S // 128) * 128
        cache = self._empty_cache(B, S, ids_UP.device)
        prefix = self._empty_cache(ids_UP.shape[0], P, ids_UP.device) if shared else cache
        prefix.valid_BS[:, :P] = mask_UP.bool()
        positions_UP = (mask_UP.cumsum(-1) - 1).clamp(min=0)
        # Prefill a few rows at a time: the MLP's activations of every prompt token at once
        # would outgrow the cache itself. Row slices of the cache are views, written in place.
        unpadded = bool(mask_UP.all())
        hidden = []
        step = self._prefill_rows(ids_UP.shape[0], P, cache, ids_UP.device)
        prefill = self.prefill if ids_UP.device.type == "cuda" else self._forward
        # The prefill runs the fused matmuls too; the session's `close` unfuses (or, should
        # anything before the session fail, the handler below).
        fused = fuse_layers(self.body.layers) if self.fuse_weights else None
        try:
            for r in range(0, ids_UP.shape[0], step):
                rows = slice(r, r + step)
                part = _Cache(
                    [k[rows] for k in prefix.keys],
                    [v[rows] for v in prefix.values],
                    prefix.valid_BS[rows],
                    fused=fused,
                )
                hidden.append(
                    prefill(part, ids_UP[rows], positions_UP[rows], slice(0, P), None, unpadded)
                )
            hidden_BD, next_pos_B = torch.cat(hidden), positions_UP[:, -1] + 1
            if grouped:
                cache.prompts = prefix
                prefix.unpadded = unpadded
            elif shared:
                for full, part in zip(cache.keys + cache.values, prefix.keys + prefix.values,
                                      strict=True):  # fmt: skip
                    full[:, :, :P] = part[rows_B]
                cache.valid_BS[:, :P] = prefix.valid_BS[rows_B]
            if shared:
                hidden_BD, next_pos_B = hidden_BD[rows_B], next_pos_B[rows_B]
            first_slot = 0 if grouped else P
            cache.fused = fused
            cache.kernel_attention = (
                kernels and not grouped
                and cache.keys[0].dtype in (torch.bfloat16, torch.float16)  # tl.dot: TF32 on fp32
                and decode_kernels.attention_supported(self.head_dim, self.group)
            )  # fmt: skip
            return DecodeSession(
                self, cache, next_pos_B, first_slot, self.logits(hidden_BD), use_graph, kernels
            )
        except BaseException:  # no parameter stays a view of the fused weights
            if fused is not None:
                unfuse(fused)
            raise

    def _prefill_rows(self, U: int, P: int, cache: _Cache, device: torch.device) -> int:
        """Prompts per prefill part: at most `PREFILL_TOKENS` tokens (off CUDA also at most
        `CPU_PREFILL_TOKENS`; on CUDA with activations within `PREFILL_SHARE` of the cache);
        the `U` prompts split into equal parts (one compiled shape) when a part of more than
        half the largest size divides them, else into parts of one size but the last."""
        budget = PREFILL_TOKENS
        if device.type != "cuda":
            budget = min(budget, CPU_PREFILL_TOKENS)
        else:
            cache_bytes = sum(t.nbytes for t in cache.keys + cache.values)
            per_token = 6 * self.lm.config.intermediate_size * cache.keys[0].element_size()
            budget = min(budget, int(PREFILL_SHARE * cache_bytes) // per_token)
        rows = max(1, budget // max(P, 1))
        if rows >= U:
            return U
        even = next((r for r in range(rows, rows // 2, -1) if U % r == 0), None)
        if even is not None:
            return even
        parts = -(-U // rows)
        return -(-U // parts)

    def _empty_cache(self, B: int, S: int, device: torch.device) -> _Cache:
        dtype = self.body.embed_tokens.weight.dtype
        shape = (B, self.kv_heads, S, self.head_dim)
        return _Cache(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.body.layers],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.body.layers],
            valid_BS=torch.zeros((B, S), dtype=torch.bool, device=device),
        )


def _is_dtensor(x: Any) -> bool:
    """A DTensor exists only once `torch.distributed.tensor` is imported; importing it here
    would cost every process about a second and 40 MiB."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)
