"""The draw of the next token inside a static-decoder step: Gumbel-max on uniform noise
(`pick`, torch code, any device) or, on CUDA, the Triton kernels' inverse CDF
(`rollouts/decode_kernels.py`: one uniform number per row).

Test: `pytest tests/test_static_decode.py -k pick` (and `-m gpu tests/test_decode_kernels.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rollouts import decode_kernels


def pick(logits_BV: Tensor, uniform_BV: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """One token per row from `softmax(logits / temperature)` (argmax at temperature 0) and its
    log-probability under the untempered model (`log_softmax(logits)`), as the sampler in
    `rollouts/hf.py` returns it. The draw is the Gumbel-max trick: `argmax(logp / T + g)` with
    `g = -log(-log(u))`, `u` uniform on [0, 1), is an exact sample of the tempered softmax; it
    takes one pass over the logits with no sort, cumulative sum or search, so it fuses into the
    compiled decode step."""
    logp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    if temperature == 0:
        token_B = logp_BV.argmax(-1)
    else:
        token_B = (logp_BV / temperature - torch.log(-torch.log(uniform_BV))).argmax(-1)
    return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(-1)


def pick_in_row_chunks(
    logits_BV: Tensor, uniform_BV: Tensor, temperature: float, rows: int = 32
) -> tuple[Tensor, Tensor]:
    """`pick` run eagerly `rows` rows at a time, with the same result (every row is drawn on
    its own): its float32 temporaries are `[rows, vocab]`, not `[B, vocab]`. For the first token,
    drawn outside the compiled step: at batch 256 with a 151,936-token vocabulary, 116 MiB of
    temporaries instead of 597 (peak RSS of the two on CPU)."""
    chunks = zip(logits_BV.split(rows), uniform_BV.split(rows), strict=True)
    parts = [pick(lg, u, temperature) for lg, u in chunks]
    return torch.cat([t for t, _ in parts]), torch.cat([lp for _, lp in parts])


def draw(logits_BV: Tensor, noise: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """`pick` on a `[B, vocab]` uniform buffer (or its `[B, 1]` stand-in at temperature 0), or
    the kernels' draw on `[B]` uniform numbers: (tokens, untempered logprobs)."""
    if noise.dim() == 1:
        return decode_kernels.sample(logits_BV, noise, temperature)
    return pick(logits_BV, noise, temperature)
