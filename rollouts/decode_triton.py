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
ATTENTION_BLOCK = 128
"""Cache slots per iteration of the attention loop (64 for head dims above 128, whose key and
value tiles in 2 stages would otherwise need 256 KB of shared memory)."""
ATTENTION_LAUNCH: dict[str, int] = {"num_warps": 4, "num_stages": 2}
"""Launch options of the attention kernel. Chosen on an H200 over blocks of 32/64/128 slots,
2/4/8 warps and 1-4 stages, with 24 layers' caches in turn as a decode step reads them (cold
in L2; batch 256, 2 KV heads of 7 queries, head dim 64): 14.0 us per layer on average over
160/256/352 written slots, against 15.0 us for blocks of 64 with Triton's defaults."""


@triton.jit
def _attention_kernel(
    q_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, out_ptr,
    sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, s_rot_b, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    s_valid_b, so_b, so_h,
    scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Rotate the step's query heads and its new key (`x * cos + rotate_half(x) * sin`), write
    the new key and value at the step's slot, and attend over the earlier valid slots and the
    new one."""
    b = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
    kh = tl.program_id(1)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = kh * G + g
    in_group = g[:, None] < G
    # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after
    swapped = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + b * s_rot_b + d).to(tl.float32)
    sin = tl.load(sin_ptr + b * s_rot_b + d).to(tl.float32) * sign
    q_row = q_ptr + b * sq_b + heads[:, None] * sq_h
    q = tl.load(q_row + d[None, :], mask=in_group, other=0.0)
    q_swapped = tl.load(q_row + swapped[None, :], mask=in_group, other=0.0)
    q = (q.to(tl.float32) * cos[None, :] + q_swapped.to(tl.float32) * sin[None, :]).to(q.dtype)
    k_row = kn_ptr + b * skn_b + kh * skn_h
    k_new = tl.load(k_row + d).to(tl.float32) * cos + tl.load(k_row + swapped).to(tl.float32) * sin
    k_new = k_new.to(k_ptr.dtype.element_ty)
    v_new = tl.load(vn_ptr + b * svn_b + kh * svn_h + d).to(v_ptr.dtype.element_ty)
    slot = tl.load(slot_ptr)
    tl.store(k_ptr + b * sk_b + kh * sk_h + slot * sk_s + d, k_new)
    tl.store(v_ptr + b * sv_b + kh * sv_h + slot * sv_s + d, v_new)
    # The new slot first, from registers: it is always attended (a row sees its own token).
    m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
    m_i = m_i.to(tl.float32)  # torch.compile may pass the scale as fp64
    l_i = tl.full([GP], 1.0, tl.float32)
    acc = tl.zeros([GP, D], tl.float32) + v_new.to(tl.float32)[None, :]
    for start in range(0, slot, BLOCK):
        s = start + tl.arange(0, BLOCK)
        inside = s < slot
        valid = tl.load(valid_ptr + b * s_valid_b + s, mask=inside, other=0) != 0
        k = tl.load(k_ptr + b * sk_b + kh * sk_h + s[None, :] * sk_s + d[:, None],
                    mask=inside[None, :], other=0.0)  # fmt: skip
        scores = (tl.dot(q, k) * scale).to(tl.float32)
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
             out.to(out_ptr.dtype.element_ty), mask=in_group)  # fmt: skip


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


@triton_op("posttrain::decode_attention", mutates_args=("keys", "values"))
def _decode_attention(
    q: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor, sin: Tensor, keys: Tensor,
    values: Tensor, valid: Tensor, slot: Tensor, scale: float,
) -> Tensor:  # fmt: skip
    B, H, D = q.shape
    K = keys.shape[1]
    G = H // K
    out = q.new_empty((B, H, D))
    wrap_triton(_attention_kernel)[(B, K)](
        q, k_new, v_new, cos, sin, keys, values, valid, slot, out,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0),
        v_new.stride(1), cos.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), valid.stride(0),
        out.stride(0), out.stride(1), scale,
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D,
        BLOCK=ATTENTION_BLOCK if D <= 128 else 64, **ATTENTION_LAUNCH,
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
