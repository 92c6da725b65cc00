"""The Triton kernels behind `rollouts/decode_kernels.py` (see there), registered as custom
ops. Imported only when a CUDA decoder first asks for them (`decode_kernels.load`): importing
Triton and registering the ops costs a process about 1.7 s, which CPU runs never pay.

Test: `pytest -m gpu tests/test_decode_kernels.py` (on a GPU machine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

SAMPLE_CHUNK = 4096
"""Vocabulary entries per program of the draw (151,936 -> 38 programs per row)."""
SAMPLE_BLOCK = 1024
ATTENTION_BLOCK = 64
"""Cache slots per iteration of the attention loop."""


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
