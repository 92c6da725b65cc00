"""`torch.compile` of a policy's decoder layers for training (`train.compile`).

Each decoder layer is compiled in place (`nn.Module.compile`): parameter names, the state dict
and checkpoints are unchanged, and every layer reuses the first one's compiled code. Inductor
fuses the layer's small kernels (norms, rotary embedding, SiLU-and-multiply, residual adds),
which at a hidden size of about 1k take as long as the matmuls; `bench/RESULTS.md` has the
measured gain. The rollout engine's static decoder calls the layers' submodules, not the
compiled layer forward, so decoding is unaffected.

`train.compile: null` (the default) compiles on CUDA, in a single process, for the model types
the static decoder knows (`rollouts.static_decode.SUPPORTED`); `true` compiles any model whose
layers sit at `model.layers`; `false` never compiles.

Compile after any `copy.deepcopy` of the model (a frozen reference): a compiled layer holds a
compiled bound method of itself, which a deep copy would share with the original.
"""

from __future__ import annotations

from torch import nn

from posttrain import distributed
from rollouts.static_decode import causal_lm, unsupported


def layers_compiled(model: nn.Module) -> bool:
    """Whether `model`'s decoder layers are compiled (by `compile_layers`)."""
    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None) or []
    return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)


def compile_layers(model: nn.Module, enabled: bool | None) -> bool:
    """Compile `model`'s decoder layers when `enabled` (None: decide as the module says).
    Returns whether they are compiled."""
    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None)
    if enabled is None:
        device = next(model.parameters()).device
        enabled = (
            device.type == "cuda"
            and not distributed.is_distributed()
            and unsupported(model) is None
        )
    if not enabled:
        return False
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            "train.compile: true needs a model whose decoder layers are at model.layers "
            f"(a transformers *ForCausalLM); {type(causal_lm(model)).__name__} has none"
        )
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile()
    return True
