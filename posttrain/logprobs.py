"""Per-token log-probabilities of a batch under a causal LM.

`logp(x_t | x_<t) = logit[x_t] - logsumexp(logits)`, computed without materialising the full
log-softmax. The result is aligned with the input: position 0 (no prediction) is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def token_logprobs(model: nn.Module, input_ids_BT: Tensor, attention_mask_BT: Tensor) -> Tensor:
    device = next(model.parameters()).device
    input_ids_BT, attention_mask_BT = input_ids_BT.to(device), attention_mask_BT.to(device)
    logits = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).logits
    return logprobs_from_logits(logits, input_ids_BT)


def logprobs_from_logits(logits_BTV: Tensor, input_ids_BT: Tensor) -> Tensor:
    logits = logits_BTV[:, :-1].float()
    targets = input_ids_BT[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(out, (1, 0))
