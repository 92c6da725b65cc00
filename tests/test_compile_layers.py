"""`train.compile`: compiled decoder layers train exactly like eager ones (float32, CPU), the
state dict keeps its names, and the default compiles only on CUDA."""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms import sft
from posttrain.compile_layers import compile_layers
from posttrain.config.base import OptimConfig
from posttrain.learner import Learner
from tests.small_models import random_lm


def _batch():
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (12, 7, 9, 12)]
    return sft.make_batch([([], r) for r in rows], 0, train_on_prompt=True)


def test_compiled_layers_train_like_eager_ones():
    eager, compiled = random_lm(), random_lm()
    assert compile_layers(compiled, True)
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    cfg = OptimConfig(lr=1e-2, micro_batch_size=2)
    learners = [Learner(m, cfg.model_copy(update={"compile": c}), 3)
                for m, c in ((eager, False), (compiled, True))]  # fmt: skip
    for _ in range(2):
        got = [learner.update(_batch(), sft.loss) for learner in learners]
        assert got[1]["loss"] == pytest.approx(got[0]["loss"], rel=1e-5)
        assert got[1]["grad_norm"] == pytest.approx(got[0]["grad_norm"], rel=1e-4)
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # Adam magnifies rounding


def test_default_compiles_on_cuda_only():
    model = random_lm()
    assert not compile_layers(model, None)  # CPU
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    assert not compile_layers(model, False)


def test_compile_needs_decoder_layers():
    with pytest.raises(ValueError, match="model.layers"):
        compile_layers(torch.nn.Linear(2, 2), True)
