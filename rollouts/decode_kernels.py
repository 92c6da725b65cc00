"""Triton kernels for the CUDA decode step: one-token attention over the static cache, and the
draw of the next token from the logits.

At a few hundred rows a decode step is bound by how many kernels run and how often each one
reads the vocabulary-wide logits, not by arithmetic (`bench/RESULTS.md`, B2). Two places gain
most from a kernel of their own:

- `decode_attention`: a KV head's grouped queries against the cache, in one pass (an online
  softmax, as flash attention), reading only the slots written so far: the loop ends at the
  step's slot, read from the device, so one CUDA graph serves every step. The matmul attention
  it replaces ran two batched matmuls and a softmax over the whole cache at every step.
- `sample`: the draw by inverse CDF with one uniform number per row. One pass over the logits,
  split into chunks across the GPU, sums each chunk's mass (and the log-sum-exp for the
  token's logprob); the draw picks a chunk from those sums, and a second kernel scans only that
  chunk. The Gumbel-max draw that `rollouts.draw.pick` makes needs a uniform number and two
  logarithms per vocabulary entry: as a kernel making its own random numbers it took 235 us a
  step at batch 256 on an H200, about five times this (44.9 us, compiled with its torch glue). Greedy decoding (temperature 0) takes
  the first largest logit, as `argmax` does.

Both run only on CUDA with Triton installed and torch >= 2.6 (`available()`); elsewhere the decoder keeps its
torch code (`rollouts/static_decode.py`). Registered as custom ops, so `torch.compile` keeps
them inside the compiled step and CUDA graphs capture them.

Test: `pytest -m gpu tests/test_decode_kernels.py` (on a GPU machine).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except Exception:  # no Triton (CPU-only installs), a broken one, or torch < 2.6
    triton = None

SAMPLE_CHUNK = 4096
"""Vocabulary entries per program of the draw (151,936 -> 38 programs per row)."""
SAMPLE_BLOCK = 1024
ATTENTION_BLOCK = 64
"""Cache slots per iteration of the attention loop."""


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def attention_supported(head_dim: int, group: int) -> bool:
    """The kernel keeps a head's dimensions in one block (a power of two, 16-256) and the
    group's queries in one MMA tile (at most 64 query heads per KV head)."""
    return head_dim in (16, 32, 64, 128, 256) and group <= 64


if triton is not None:

    @triton.jit
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, out_ptr,
        sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, s_valid_b, so_b, so_h,
        scale,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
        kh = tl.program_id(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        heads = kh * G + g
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :],
                    mask=g[:, None] < G, other=0.0)  # fmt: skip
        n = tl.load(slot_ptr) + 1  # slots 0..current are written
        m_i = tl.full([GP], -1.0e30, tl.float32)  # finite: a fully masked block adds nothing
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for start in range(0, n, BLOCK):
            s = start + tl.arange(0, BLOCK)
            inside = s < n
            valid = tl.load(valid_ptr + b * s_valid_b + s, mask=inside, other=0) != 0
            k = tl.load(k_ptr + b * sk_b + kh * sk_h + s[None, :] * sk_s + d[:, None],
                        mask=inside[None, :], other=0.0)  # fmt: skip
            scores = (tl.dot(q, k) * scale).to(tl.float32)  # torch.compile may pass fp64
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * sv_b + kh * sv_h + s[:, None] * sv_s + d[None, :],
                        mask=inside[:, None], other=0.0)  # fmt: skip
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g[:, None] < G)  # fmt: skip

    @triton.jit
    def _chunk_kernel(
        logits_ptr, max_ptr, sum_ptr, tempered_ptr, best_ptr, index_ptr,
        s_logits, V, n_chunks, inv_temperature,
        GREEDY: tl.constexpr, TEMPERED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Per chunk of a row: its largest logit m, sum(exp(x - m)), sum(exp((x - m) / T))
        and (greedy) its first largest logit's index."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        m = -1.0e30  # finite, as in the attention: -inf logits then add nothing
        total = 0.0
        tempered = 0.0
        best = float("-inf")
        best_i = 0
        for off in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(logits_ptr + b * s_logits + cols, mask=cols < V, other=float("-inf"))
            x = x.to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            if TEMPERED:  # torch.compile may pass the float as fp64
                shrink = tl.exp(((m - m_new) * inv_temperature).to(tl.float32))
                mass = tl.exp(((x - m_new) * inv_temperature).to(tl.float32))
                tempered = tempered * shrink + tl.sum(mass, 0)
            m = m_new
            if GREEDY:
                block_best = tl.max(x, 0)
                better = block_best > best  # strictly: ties keep the first index, as argmax
                best_i = tl.where(better, off + tl.argmax(x, 0), best_i)
                best = tl.where(better, block_best, best)
        out = b * n_chunks + c
        tl.store(max_ptr + out, m)
        tl.store(sum_ptr + out, total)
        tl.store(tempered_ptr + out, tempered if TEMPERED else total)
        tl.store(best_ptr + out, best)
        tl.store(index_ptr + out, best_i)

    @triton.jit
    def _scan_kernel(
        logits_ptr, chunk_ptr, residual_ptr, chunk_max_ptr, token_ptr,
        s_logits, V, inv_temperature, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """In a row's chosen chunk, the first token whose running sum of exp((x - m) / T)
        exceeds the residual draw (the last token of nonzero mass, should rounding leave the
        draw beyond the chunk's sum)."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.load(chunk_ptr + b).to(tl.int32)
        residual = tl.load(residual_ptr + b)
        m = tl.load(chunk_max_ptr + b)
        none = 2**30
        found = none
        last = c * CHUNK  # a chunk with no mass at all (a row of -inf logits): its first token
        carry = 0.0
        for off in range(0, CHUNK, BLOCK):
            cols = c * CHUNK + off + tl.arange(0, BLOCK)
            x = tl.load(logits_ptr + b * s_logits + cols, mask=cols < V, other=float("-inf"))
            mass = tl.exp(((x.to(tl.float32) - m) * inv_temperature).to(tl.float32))
            running = carry + tl.cumsum(mass, 0)
            hit = (running > residual) & (mass > 0)
            found = tl.minimum(found, tl.min(tl.where(hit, cols, none), 0))
            last = tl.maximum(last, tl.max(tl.where(mass > 0, cols, -1), 0))
            carry = carry + tl.sum(mass, 0)
        tl.store(token_ptr + b, tl.where(found < none, found, last))

    @triton_op("posttrain::decode_attention", mutates_args=())
    def _decode_attention(
        q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, slot: Tensor, scale: float
    ) -> Tensor:
        B, H, _, D = q.shape
        K = keys.shape[1]
        G = H // K
        out = q.new_empty((B, H, 1, D))
        wrap_triton(_attention_kernel)[(B, K)](
            q, keys, values, valid, slot, out,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), valid.stride(0),
            out.stride(0), out.stride(1), scale,
            G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK=ATTENTION_BLOCK,
        )  # fmt: skip
        return out

    @triton_op("posttrain::chunk_partials", mutates_args=())
    def _chunk_partials(
        logits: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        B, V = logits.shape
        n_chunks = triton.cdiv(V, SAMPLE_CHUNK)
        maxes = logits.new_empty((B, n_chunks), dtype=torch.float32)
        sums, tempered, best = (torch.empty_like(maxes) for _ in range(3))
        index = torch.empty((B, n_chunks), dtype=torch.int32, device=logits.device)
        greedy = temperature == 0
        wrap_triton(_chunk_kernel)[(B, n_chunks)](
            logits, maxes, sums, tempered, best, index,
            logits.stride(0), V, n_chunks, 0.0 if greedy else 1.0 / temperature,
            GREEDY=greedy, TEMPERED=not greedy and temperature != 1.0,
            CHUNK=SAMPLE_CHUNK, BLOCK=SAMPLE_BLOCK,
        )  # fmt: skip
        return maxes, sums, tempered, best, index

    @triton_op("posttrain::scan_chunk", mutates_args=())
    def _scan_chunk(
        logits: Tensor, chunk: Tensor, residual: Tensor, chunk_max: Tensor, temperature: float
    ) -> Tensor:
        B, V = logits.shape
        token = torch.empty((B,), dtype=torch.int32, device=logits.device)
        wrap_triton(_scan_kernel)[(B,)](
            logits, chunk, residual, chunk_max, token,
            logits.stride(0), V, 1.0 / temperature, CHUNK=SAMPLE_CHUNK, BLOCK=SAMPLE_BLOCK,
        )  # fmt: skip
        return token


def decode_attention(
    q_BH1D: Tensor, keys_BKSD: Tensor, values_BKSD: Tensor, valid_BS: Tensor, slot: Tensor,
    scale: float,
) -> Tensor:  # fmt: skip
    """One query per head against the cache slots `0..slot` that `valid_BS` marks (the current
    slot, already written, must be marked). Returns `[B, H, 1, D]` in the queries' dtype."""
    if q_BH1D.stride(-1) != 1 or keys_BKSD.stride(-1) != 1 or values_BKSD.stride(-1) != 1:
        raise ValueError("decode_attention needs the head dimension contiguous")
    if valid_BS.stride(-1) != 1:
        raise ValueError("decode_attention needs each row of valid_BS contiguous")
    return _decode_attention(q_BH1D, keys_BKSD, values_BKSD, valid_BS, slot, scale)


def sample(logits_BV: Tensor, uniform_B: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """One token per row from `softmax(logits / temperature)` (the first largest logit at
    temperature 0) and its logprob under the untempered model, as `rollouts.draw.pick` returns
    them, by inverse CDF: `uniform_B` (one uniform number on [0, 1) per row) picks a chunk of
    the vocabulary by the chunks' tempered masses, then a token inside it."""
    if logits_BV.stride(-1) != 1:
        raise ValueError("sample needs contiguous rows of logits")
    maxes, sums, tempered, best, index = _chunk_partials(logits_BV, float(temperature))
    top = maxes.max(-1, keepdim=True).values
    lse_B = (top + torch.log((sums * torch.exp(maxes - top)).sum(-1, keepdim=True))).squeeze(-1)
    if temperature == 0:
        token_B = index.gather(-1, best.argmax(-1, keepdim=True)).squeeze(-1).long()
    else:
        token_B = _inverse_cdf(logits_BV, maxes, tempered, top, uniform_B, temperature)
    logp_B = logits_BV.gather(-1, token_B[:, None]).squeeze(-1).float() - lse_B
    return token_B, logp_B


def _inverse_cdf(
    logits_BV: Tensor, maxes_BC: Tensor, tempered_BC: Tensor, top_B1: Tensor, uniform_B: Tensor,
    temperature: float,
) -> Tensor:  # fmt: skip
    """Chunk c holds mass `tempered_c * exp((max_c - top) / T)`; the draw `u * total` (kept
    below the total, so some chunk's running mass exceeds it) falls in the first chunk whose
    running mass exceeds it, at a residual that the scan kernel, in that chunk's own units,
    turns into a token."""
    scale_BC = torch.exp((maxes_BC - top_B1) / temperature)
    cum_BC = (tempered_BC * scale_BC).cumsum(-1)
    total_B1 = cum_BC[:, -1:]
    draw_B1 = torch.minimum(
        uniform_B[:, None] * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1))
    )
    chunk_B1 = (cum_BC <= draw_B1).sum(-1, keepdim=True).clamp(max=cum_BC.shape[1] - 1)
    below_B1 = cum_BC.gather(-1, chunk_B1) - (tempered_BC * scale_BC).gather(-1, chunk_B1)
    residual_B = ((draw_B1 - below_B1).clamp(min=0) / scale_BC.gather(-1, chunk_B1)).squeeze(-1)
    chunk_max_B = maxes_BC.gather(-1, chunk_B1).squeeze(-1)
    chunk_B = chunk_B1.squeeze(-1).to(torch.int32)
    return _scan_chunk(logits_BV, chunk_B, residual_B, chunk_max_B, float(temperature)).long()
