"""Triton kernels for the CUDA decode step: one-token attention over the static cache, and the
draw of the next token from the logits.

At a few hundred rows a decode step is bound by how many kernels run and how often each one
reads the vocabulary-wide logits, not by arithmetic (`bench/RESULTS.md`, B2). Two places gain
most from a kernel of their own:

- `decode_attention`: a layer's whole attention step after the q/k/v projections. It rotates
  the queries and the new key, writes the new key and value into the cache, and attends with
  a KV head's grouped queries in one pass (an online softmax, as flash attention), reading only
  the slots written so far: the loop ends at the step's slot, read from the device, so one
  CUDA graph serves every step. It replaces the rotary and cache-write kernels around it and
  the matmul attention, which ran two batched matmuls and a softmax over the whole cache.
- `sample`: the draw by inverse CDF with one uniform number per row. One pass over the logits,
  split into chunks across the GPU, sums each chunk's mass (and the log-sum-exp for the
  token's logprob); the draw picks a chunk from those sums, and a second kernel scans only that
  chunk. The Gumbel-max draw that `rollouts.draw.pick` makes needs a uniform number and two
  logarithms per vocabulary entry: as a kernel making its own random numbers it took 235 us a
  step at batch 256 on an H200, about five times this (44.9 us, compiled with its torch
  glue). Greedy decoding (temperature 0) takes the first largest logit, as `argmax` does.

Both run only on CUDA with Triton installed and torch >= 2.6 (`load`); elsewhere
the decoder keeps its torch code (`rollouts/static_decode.py`). The kernels themselves are in
`rollouts/decode_triton.py`, registered as custom ops, so `torch.compile` keeps them inside
the compiled step and CUDA graphs capture them.

Test: `pytest -m gpu tests/test_decode_kernels.py` (on a GPU machine).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

_ops: ModuleType | None = None
"""`rollouts.decode_triton` once `load` imported it."""
_load_failed = False


def load(device: torch.device) -> bool:
    """Import the kernels for a CUDA `device` (once; called eagerly by the decoder, outside
    compiled code). False without CUDA, or when Triton or torch's `triton_op` (torch >= 2.6)
    cannot be imported: the decoder then keeps its torch code."""
    global _ops, _load_failed
    if device.type != "cuda":
        return False
    if _ops is None and not _load_failed:
        try:
            from rollouts import decode_triton
        except Exception:  # no Triton, a broken one, or torch < 2.6
            _load_failed = True
        else:
            _ops = decode_triton
    return _ops is not None


def attention_supported(head_dim: int, group: int) -> bool:
    """The kernel keeps a head's dimensions in one block (a power of two, 16-256) and the
    group's queries in one MMA tile (at most 64 query heads per KV head)."""
    return head_dim in (16, 32, 64, 128, 256) and group <= 64


def decode_attention(
    q_BHD: Tensor, k_new_BKD: Tensor, v_new_BKD: Tensor, cos_BD: Tensor, sin_BD: Tensor,
    keys_BKSD: Tensor, values_BKSD: Tensor, valid_BS: Tensor, slot: Tensor, scale: float,
) -> Tensor:  # fmt: skip
    """One decode step's attention for one layer, from its projections (before the rotary
    embedding) to the heads' outputs: rotates the queries and the new key
    (`x * cos + rotate_half(x) * sin`, as transformers' Llama-family models), writes the new
    key and value at cache slot `slot` (in place), and attends over the earlier slots that
    `valid_BS` marks and the new one. Returns `[B, H, D]` in the queries' dtype."""
    D = q_BHD.shape[-1]
    parts = (q_BHD, k_new_BKD, v_new_BKD, cos_BD, sin_BD, keys_BKSD, values_BKSD)
    if any(t.stride(-1) != 1 for t in parts):
        raise ValueError("decode_attention needs the head dimension contiguous")
    if cos_BD.shape[-1] != D or sin_BD.shape != cos_BD.shape or sin_BD.stride() != cos_BD.stride():
        raise ValueError(f"decode_attention needs cos and sin of one layout, {D} wide (no "
                         f"partial rotary); got {tuple(cos_BD.shape)}, {tuple(sin_BD.shape)}")  # fmt: skip
    if valid_BS.stride(-1) != 1:
        raise ValueError("decode_attention needs each row of valid_BS contiguous")
    return _ops._decode_attention(
        q_BHD, k_new_BKD, v_new_BKD, cos_BD, sin_BD, keys_BKSD, values_BKSD, valid_BS, slot, scale
    )


def sample(logits_BV: Tensor, uniform_B: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """One token per row from `softmax(logits / temperature)` (the first largest logit at
    temperature 0) and its logprob under the untempered model, as `rollouts.draw.pick` returns
    them, by inverse CDF: `uniform_B` (one uniform number on [0, 1) per row) picks a chunk of
    the vocabulary by the chunks' tempered masses, then a token inside it."""
    if logits_BV.stride(-1) != 1:
        raise ValueError("sample needs contiguous rows of logits")
    maxes, sums, tempered, best, index = _ops._chunk_partials(logits_BV, float(temperature))
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
    mass_BC = tempered_BC * scale_BC
    cum_BC = mass_BC.cumsum(-1)
    total_B1 = cum_BC[:, -1:]
    draw_B1 = torch.minimum(
        uniform_B[:, None] * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1))
    )
    chunk_B1 = (cum_BC <= draw_B1).sum(-1, keepdim=True).clamp(max=cum_BC.shape[1] - 1)
    below_B1 = cum_BC.gather(-1, chunk_B1) - mass_BC.gather(-1, chunk_B1)
    residual_B = ((draw_B1 - below_B1).clamp(min=0) / scale_BC.gather(-1, chunk_B1)).squeeze(-1)
    chunk_max_B = maxes_BC.gather(-1, chunk_B1).squeeze(-1)
    chunk_B = chunk_B1.squeeze(-1).to(torch.int32)
    return _ops._scan_chunk(logits_BV, chunk_B, residual_B, chunk_max_B, float(temperature)).long()
