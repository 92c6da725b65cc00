"""The static decoder's attention in torch code (CPU, eager steps, the prefill): the mask of the
slots each query may see, attention that reads each KV head once for its grouped queries, the
rotary embedding and the cache writes. On CUDA the fixed-shape one-token steps use the Triton
kernel instead (`rollouts/decode_kernels.py`).

Test: `pytest tests/test_static_decode.py` (logits equal to the transformers forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def write_slots(cache_BKSD: Tensor, slots: Any, new_BKTD: Tensor) -> None:
    """Write `[B, K, T, D]` keys or values at cache `slots` (a slice, or an index tensor)."""
    if isinstance(slots, slice):
        cache_BKSD[:, :, slots] = new_BKTD
    else:
        cache_BKSD.index_copy_(2, slots, new_BKTD)


def allowed_slots(valid_BS: Tensor, slots: Any, T: int) -> Tensor:
    """`[B, T, S]`: query t may see the written, real slots up to its own. Each query also sees
    itself, so left-padding rows stay finite."""
    S = valid_BS.shape[1]
    if isinstance(slots, slice):
        query_slot = torch.arange(slots.start, slots.start + T, device=valid_BS.device)
    else:
        valid_BS.index_fill_(1, slots, True)
        query_slot = slots
    key_slot = torch.arange(S, device=valid_BS.device)
    causal_TS = key_slot[None, :] <= query_slot[:, None]
    own_TS = key_slot[None, :] == query_slot[:, None]
    return (valid_BS[:, None, :] & causal_TS[None]) | own_TS[None]


def attend(
    q_BHTD: Tensor, k_BKSD: Tensor, v_BKSD: Tensor, allowed_BTS: Tensor, scale: float,
    mode: str = "matmul",
) -> Tensor:  # fmt: skip
    """Attention with the G query heads of each KV head folded into the query length, so the
    KV heads are read as they are (no repeat to H heads). `mode` for one-token steps: `matmul`
    or `sdpa` (`rollouts.static_decode.DECODE_ATTENTION`). Returns `[B, H, T, D]`."""
    B, H, T, D = q_BHTD.shape
    K = k_BKSD.shape[1]
    G = H // K
    q = q_BHTD.reshape(B, K, G * T, D)
    mask = allowed_BTS[:, None, None].expand(B, 1, G, T, allowed_BTS.shape[-1])
    mask = mask.reshape(B, 1, G * T, -1)
    if T == 1 and mode == "matmul":
        # Scores in the model's dtype (as transformers' eager attention), softmax in float32.
        scores = torch.matmul(q, k_BKSD.transpose(-1, -2)) * scale
        scores = scores.float().masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1).to(v_BKSD.dtype), v_BKSD)
    else:
        out = F.scaled_dot_product_attention(q, k_BKSD, v_BKSD, attn_mask=mask, scale=scale)
    return out.reshape(B, H, T, D)


def rotate(x_BTHD: Tensor, cos_BTD: Tensor, sin_BTD: Tensor) -> Tensor:
    """transformers' Llama-family rotary embedding, on `[B, T, heads, D]`."""
    return x_BTHD * cos_BTD[:, :, None] + rotate_half(x_BTHD) * sin_BTD[:, :, None]


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
