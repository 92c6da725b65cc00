"""Per-token log-probabilities of a batch under a causal LM.

`logp(x_t | x_<t) = logit[x_t] - logsumexp(logits)`. The result is aligned with the input:
position 0 (no prediction) is 0.

Three things keep this cheap. Columns that are padding in every row are cut before the forward
and padded back after (on CUDA the width is rounded up to a multiple of 128, see
`CUDA_WIDTH_MULTIPLE`). A right-padded batch runs without its attention mask: causal attention
already keeps each real token from the padding after it, and the attention kernels take their
fast causal path. For Llama-family models (`rollouts.static_decode.unsupported` is None)
the LM head and the log-softmax run on `CHUNK_TOKENS` positions at a time
(`posttrain/head_logprobs.py`: fused, with its own backward that recomputes one chunk's logits
at a time), so the `[B, T, vocab]` logits and their float32 copy never exist at once (at a 152k
vocabulary they outweigh the rest of a step). A head that is not a plain `nn.Linear` (LoRA on
the head) runs the same chunks through autograd under activation checkpointing. Other models,
and every model under several processes (DDP and FSDP2 hook the model's own forward), take the
plain path: the whole forward, then the log-softmax.

Test: `pytest tests/test_logprobs.py`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from posttrain import shared_prefix
from posttrain.compile_layers import layers_compiled
from posttrain.distributed import is_distributed
from posttrain.head_logprobs import lm_head_logprobs
from rollouts.static_decode import causal_lm, unsupported

CHUNK_TOKENS = 4096
"""Positions whose logits are held at once on the chunked path."""
CUDA_WIDTH_MULTIPLE = 128
"""On CUDA the trimmed width is rounded up to a multiple of this: few distinct shapes, so
compiled layers and cuDNN attention (which builds a plan per shape, hundreds of
milliseconds each) see each shape once."""


def token_logprobs(
    model: nn.Module,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    loss_mask_BT: Tensor | None = None,
) -> Tensor:
    """`[B, T]` float32 logprobs of a batch. With `loss_mask_BT`, only positions from each
    row's first loss position on are computed (others hold 0), and rows that share the tokens
    before it may run them once (`posttrain/shared_prefix.py`)."""
    device = next(model.parameters()).device
    full = input_ids_BT.shape[1]
    chunked = unsupported(model) is None and not is_distributed()
    # Compiled layers are left out: a KV cache in a compiled layer recompiles it per layer.
    if (
        chunked
        and loss_mask_BT is not None
        and _right_padded(attention_mask_BT)
        and not layers_compiled(model)
    ):
        plan = shared_prefix.plan(input_ids_BT, attention_mask_BT, loss_mask_BT)
        if plan is not None:
            head = partial(lm_head_logprobs, chunk=CHUNK_TOKENS)
            return shared_prefix.shared_logprobs(
                causal_lm(model), input_ids_BT.to(device), attention_mask_BT, plan, head,
                width_multiple=CUDA_WIDTH_MULTIPLE if device.type == "cuda" else 1,
            )  # fmt: skip
    # Read the mask where it lives (the batch is built on the host): no wait for the device.
    width = _round_width(_used_width(attention_mask_BT), device)
    mask = _fit(attention_mask_BT, width)
    # Right padding: causal attention alone keeps every real token from the padding after it,
    # so the mask can go (the attention kernels then take their causal fast path).
    attention = None if _right_padded(mask) else mask.to(device)
    ids = _fit(input_ids_BT, width).to(device)
    if chunked:
        out = _chunked_logprobs(model, ids, attention)
    else:
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        out = logprobs_from_logits(logits, ids)
    return nn.functional.pad(out, (0, full - width)) if width <= full else out[:, :full]


def logprobs_from_logits(logits_BTV: Tensor, input_ids_BT: Tensor) -> Tensor:
    logits = logits_BTV[:, :-1].float()
    targets = input_ids_BT[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(out, (1, 0))


def _round_width(width: int, device: torch.device) -> int:
    if device.type != "cuda":
        return width
    return -(-width // CUDA_WIDTH_MULTIPLE) * CUDA_WIDTH_MULTIPLE


def _fit(x_BT: Tensor, width: int) -> Tensor:
    """The first `width` columns of `x_BT`, zero-padded on the right when it is narrower."""
    if width <= x_BT.shape[1]:
        return x_BT[:, :width]
    return nn.functional.pad(x_BT, (0, width - x_BT.shape[1]))


def _right_padded(mask_BT: Tensor) -> bool:
    """Every row: ones, then zeros."""
    return bool((mask_BT[:, 1:] <= mask_BT[:, :-1]).all())


def _used_width(attention_mask_BT: Tensor) -> int:
    """One past the last column that holds a token in some row (at least 1)."""
    used = attention_mask_BT.any(0).nonzero()
    return int(used.max()) + 1 if used.numel() else 1


def _chunked_logprobs(model: nn.Module, ids_BT: Tensor, mask_BT: Tensor | None) -> Tensor:
    lm = causal_lm(model)
    hidden_BTD = lm.model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)[0]
    B, T, D = hidden_BTD.shape
    h_ND = hidden_BTD[:, :-1].reshape(-1, D)
    targets_N = ids_BT[:, 1:].reshape(-1)
    out = lm_head_logprobs(lm.lm_head, h_ND, targets_N, CHUNK_TOKENS)
    return nn.functional.pad(out.view(B, T - 1), (1, 0))
