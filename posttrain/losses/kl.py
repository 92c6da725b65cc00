"""Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
Divergence", 2020).

With a token y sampled from pi and the log-ratio r = log pi_ref(y) - log pi(y):

    k1 = -r                      unbiased, high variance, can be negative per token
    k2 = r**2 / 2                biased, low variance, always >= 0
    k3 = exp(r) - r - 1          unbiased, low variance, always >= 0 (GRPO, DeepSeekMath eq. 4)

All functions are elementwise on same-shaped tensors ([B, T] per-token log-probabilities);
masking and aggregation belong to the caller. Tests: `tests/test_grpo_variants.py`.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log pi(y) - log pi_ref(y): the naive log-ratio (the per-token KL of Ziegler et al.
    2019 eq. 2 and of RLOO, Ahmadian et al. 2024)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log pi_ref(y) - log pi(y))**2 / 2 (Schulman 2020)."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = pi_ref/pi - log(pi_ref/pi) - 1 (Schulman 2020; DeepSeekMath eq. 4)."""
    r = ref_logprobs - logprobs
    return r.exp() - r - 1


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token KL estimate by name; raises ValueError for an unknown estimator."""
    if estimator not in _ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(_ESTIMATORS)}, got {estimator!r}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "must have the same shape"
        )
    return _ESTIMATORS[estimator](logprobs, ref_logprobs)
