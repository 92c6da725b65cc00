"""One-token decode attention for rows that share a prompt, reading the prompt's keys once.

The `n` samples of a prompt all attend to the same prompt keys and values. Copying them to each
row's cache (as a plain batch would) makes every decode step read them `n` times; here they stay
in one `[U, kv_heads, P, head_dim]` cache per distinct prompt, and each row's own cache holds
only its generated tokens. A step attends to the two parts separately and merges them exactly
(softmax over the union: each part's maximum, exponentials and sum, rescaled to the common
maximum), so the result equals attention over the concatenated keys up to rounding.

The queries of a prompt's rows (and of the heads that share a KV head) are laid side by side,
so the prompt part is one `[n * G, D] x [D, P]` product per prompt and KV head instead of `n`
thin ones. Rows must come in equal, contiguous groups (`grouped_rows`), as the HF engine lays
out its samples.

Test: `pytest tests/test_static_decode.py -k grouped` (logits equal to the transformers forward).
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_rows(rows_B: Tensor, prompts: int) -> bool:
    """True when row b decodes prompt `b // n` for one `n` (equal, contiguous groups)."""
    B = rows_B.shape[0]
    if B % prompts:
        return False
    expected = torch.arange(prompts, device=rows_B.device).repeat_interleave(B // prompts)
    return bool(torch.equal(rows_B, expected))


def attend_grouped(
    q_BHTD: Tensor,
    prompt_k_UKPD: Tensor,
    prompt_v_UKPD: Tensor,
    prompt_valid_UP: Tensor | None,
    k_BKSD: Tensor,
    v_BKSD: Tensor,
    scale: float,
) -> Tensor:
    """Attention of one new token per row over its prompt (shared by the `B // U` rows of each
    prompt; `prompt_valid_UP` False at left padding, None when there is none) and its own keys
    `k_BKSD` (every slot written). Scores in the model's dtype (the queries scaled first),
    softmax statistics in float32. Returns `[B, H, 1, D]`."""
    B, H, T, D = q_BHTD.shape
    U, K, P, _ = prompt_k_UKPD.shape
    if T != 1:
        raise ValueError(f"grouped attention takes one query per row, got {T}")
    n, G = B // U, H // K
    q_BKGD = (q_BHTD * scale).reshape(B, K, G, D)
    q_UKMD = q_BKGD.view(U, n, K, G, D).transpose(1, 2).reshape(U, K, n * G, D)
    prompt_UKM = _part(q_UKMD, prompt_k_UKPD, prompt_v_UKPD, prompt_valid_UP)
    own_BKG = _part(q_BKGD, k_BKSD, v_BKSD, None)

    def by_row(x_UKM: Tensor) -> Tensor:
        return x_UKM.view(U, K, n, G, -1).transpose(1, 2).reshape(B, K, G, -1)

    (o1, m1, l1), (o2, m2, l2) = (by_row(x) for x in prompt_UKM), own_BKG
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    out = (o1 * a1 + o2 * a2) / (l1 * a1 + l2 * a2)
    return out.to(q_BHTD.dtype).reshape(B, H, 1, D)


def _part(
    q_XKMD: Tensor, k_XKSD: Tensor, v_XKSD: Tensor, valid_XS: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised attention over one part of the keys: the exp-weighted values (float32),
    the scores' maximum and the sum of the exponentials."""
    scores = torch.matmul(q_XKMD, k_XKSD.transpose(-1, -2)).float()
    if valid_XS is not None:
        scores.masked_fill_(~valid_XS[:, None, None, :], float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = scores.sub_(top).exp_()  # `scores` is a fresh tensor: overwrite it
    values = torch.matmul(weights.to(v_XKSD.dtype), v_XKSD).float()
    return values, top, weights.sum(-1, keepdim=True)
