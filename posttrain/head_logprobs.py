"""The LM head and the log-softmax of the target token, fused and chunked, with a hand-written
backward.

`head_logprobs(h_ND, weight_VD, targets_N)` returns `logit[target] - logsumexp(logits)` per
position, where `logits = h @ weight.T`, without ever holding the `[N, vocab]` logits of every
position, or any float32 copy of them, for the backward:

- forward: per chunk of `chunk` positions, the logits (in the model's dtype), then their
  logsumexp and the target's logit in one pass; kept for the backward: `h`, the targets and the
  logsumexp (`N` floats);
- backward: per chunk, the logits again (one more head matmul), then the gradient of the logits,
  `g * (onehot(target) - softmax)`, in one pass, written in the model's dtype, and the two
  matmuls that carry it to `h` and to the head's weight (summed over chunks in float32).

Autograd through `logsumexp` would keep a float32 copy of each chunk's logits and run several
full-size elementwise kernels over them, forward and backward; at a 152k vocabulary those
passes cost more than the head's matmuls. On CUDA the two elementwise steps are compiled
(`torch.compile`, one fused kernel each); elsewhere they run eagerly.

`lm_head_logprobs(head, h_ND, targets_N)` runs a model's head module: through
`head_logprobs` when it is a plain bias-free `nn.Linear`, else (LoRA on the head, hooks)
through autograd, chunk by chunk, under activation checkpointing.

Test: `pytest tests/test_logprobs.py` (values and gradients equal to autograd's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def lm_head_logprobs(head: nn.Module, h_ND: Tensor, targets_N: Tensor, chunk: int) -> Tensor:
    """Float32 `[N]` log-probabilities of `targets_N` after the head module `head`, computed
    `chunk` positions at a time."""
    if type(head) is nn.Linear and head.bias is None and not head._forward_hooks:
        return head_logprobs(h_ND, head.weight, targets_N, chunk)
    parts = []
    for s in range(0, h_ND.shape[0], chunk):
        args = (head, h_ND[s : s + chunk], targets_N[s : s + chunk])
        if torch.is_grad_enabled():
            parts.append(checkpoint(_autograd_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_autograd_logprobs(*args))
    return torch.cat(parts) if parts else h_ND.new_zeros(0).float()


def _autograd_logprobs(head: nn.Module, h_ND: Tensor, targets_N: Tensor) -> Tensor:
    logits = head(h_ND).float()
    picked = logits.gather(-1, targets_N.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def head_logprobs(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, chunk: int) -> Tensor:
    """Float32 `[N]` log-probabilities of `targets_N` under the head `weight_VD`."""
    return _HeadLogprobs.apply(h_ND, weight_VD, targets_N, chunk)


def _lse_and_target(logits_NV: Tensor, targets_N: Tensor) -> tuple[Tensor, Tensor]:
    x = logits_NV.float()
    lse = torch.logsumexp(x, dim=-1)
    return x.gather(-1, targets_N[:, None]).squeeze(-1) - lse, lse


def _logits_grad(logits_NV: Tensor, lse_N: Tensor, g_N: Tensor, targets_N: Tensor) -> Tensor:
    """d(sum g * logp) / d logits = g * (onehot(target) - softmax), in the logits' dtype."""
    softmax = torch.exp(logits_NV.float() - lse_N[:, None])
    vocab = torch.arange(logits_NV.shape[-1], device=logits_NV.device)
    onehot = (vocab[None, :] == targets_N[:, None]).float()
    return (g_N[:, None] * (onehot - softmax)).to(logits_NV.dtype)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def _kernel(fn: Callable, device: torch.device) -> Callable:
    """The elementwise step `fn`, compiled on CUDA (once per process), eager elsewhere."""
    return _compiled(fn) if device.type == "cuda" else fn


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, chunk: int) -> Tensor:
        N = h_ND.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        lse = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        step = _kernel(_lse_and_target, h_ND.device)
        for s in range(0, N, chunk):
            logits = F.linear(h_ND[s : s + chunk], weight_VD)
            out[s : s + chunk], lse[s : s + chunk] = step(logits, targets_N[s : s + chunk])
        ctx.save_for_backward(h_ND, weight_VD, targets_N, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g_N: Tensor):
        h_ND, weight_VD, targets_N, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = None
        if need_w:
            grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
        step = _kernel(_logits_grad, h_ND.device)
        g_N = g_N.float()
        for s in range(0, h_ND.shape[0], ctx.chunk):
            h = h_ND[s : s + ctx.chunk]
            dlogits = step(F.linear(h, weight_VD), lse[s : s + ctx.chunk], g_N[s : s + ctx.chunk],
                           targets_N[s : s + ctx.chunk])  # fmt: skip
            if need_h:
                grad_h[s : s + ctx.chunk] = dlogits @ weight_VD
            if need_w:
                grad_w += (dlogits.T @ h).float()
        return grad_h, grad_w.to(weight_VD.dtype) if need_w else None, None, None
