"""Decode steps with the projections that read the same input fused into one matmul: q, k and v
of each attention, gate and up of each MLP.

At a few hundred rows, a decode step's matmuls are bound by how many kernels run, not by the
weights they read (on an H200 at batch 256, each of a 0.5B model's 7 projections per layer took
4-10 us where its weights stream in 0.1-2 us; `bench/RESULTS.md`, B2). Fusing them needs the
weights side by side, which the model does not keep. `fuse_layers` concatenates each group once
per generate call and points the modules' own parameters at their rows of it (`.data` views:
the same `Parameter` objects, values unchanged), so no second copy of the weights is held;
`unfuse` gives every parameter its own storage back when the call ends, one layer at a time,
before the trainer (or a checkpoint save, which refuses tensors sharing storage) sees them.
Peak memory grows by one layer's group at a time, not by a copy of the model.

Only plain `nn.Linear` modules are fused; LoRA-wrapped or otherwise replaced projections keep
their own forward (a LoRA on q and v leaves the MLP fused).

Test: `pytest tests/test_static_decode.py -k fused` (logits equal to the unfused steps'; the
parameters restored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class FusedLayer:
    qkv_weight: Tensor | None
    """`[q + k + v outputs, hidden]`, or None when q/k/v are not all plain linears."""
    qkv_bias: Tensor | None
    qkv_sizes: tuple[int, ...]
    gate_up_weight: Tensor | None
    """`[2 * intermediate, hidden]` (gate rows first), or None."""
    gate_up_bias: Tensor | None
    modules: list[nn.Linear] = field(default_factory=list)
    """The fused modules, whose parameters are views of the tensors above until `unfuse`."""


@torch.inference_mode(False)  # parameters must stay usable by autograd afterwards
def fuse_layers(layers: nn.ModuleList) -> list[FusedLayer]:
    """Each layer's q/k/v and gate/up weights (and biases) side by side, the modules'
    parameters turned into views of them (undo with `unfuse`)."""
    fused: list[FusedLayer] = []
    try:
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up = [mlp.gate_proj, mlp.up_proj] if _standard_mlp(mlp) else []
            sizes = tuple(m.out_features for m in qkv)
            qkv_w, qkv_b = _concat(qkv)
            # Listed before gate/up fuses, so a failure there unfuses q/k/v too.
            fused.append(
                FusedLayer(qkv_w, qkv_b, sizes, None, None, qkv if qkv_w is not None else [])
            )
            gate_up_w, gate_up_b = _concat(gate_up)
            if gate_up_w is not None:
                fused[-1].gate_up_weight, fused[-1].gate_up_bias = gate_up_w, gate_up_b
                fused[-1].modules += gate_up
    except BaseException:  # e.g. out of memory: no parameter may stay a view
        unfuse(fused)
        raise
    return fused


@torch.inference_mode(False)
def unfuse(fused: list[FusedLayer]) -> None:
    """Give every fused parameter its own storage again (a copy of its rows), layer by layer,
    and drop the fused tensors."""
    for layer in fused:
        for module in layer.modules:
            for param in (module.weight, module.bias):
                if param is not None:
                    param.data = param.data.clone()
        layer.modules = []
        layer.qkv_weight = layer.qkv_bias = layer.gate_up_weight = layer.gate_up_bias = None


def project_qkv(attn: nn.Module, fused: FusedLayer | None, x: Tensor) -> tuple[Tensor, ...]:
    """`(q_proj(x), k_proj(x), v_proj(x))`, in one matmul when `fused` has them."""
    if fused is None or fused.qkv_weight is None:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    qkv = nn.functional.linear(x, fused.qkv_weight, fused.qkv_bias)
    return qkv.split(fused.qkv_sizes, dim=-1)


def mlp_forward(mlp: nn.Module, fused: FusedLayer | None, x: Tensor) -> Tensor:
    """`mlp(x)` (`down(act(gate(x)) * up(x))`), gate and up in one matmul when fused."""
    if fused is None or fused.gate_up_weight is None:
        return mlp(x)
    gate, up = nn.functional.linear(x, fused.gate_up_weight, fused.gate_up_bias).chunk(2, -1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _standard_mlp(mlp: nn.Module) -> bool:
    """transformers' own `down(act(gate(x)) * up(x))` MLP (not a module put in its place)."""
    kind = type(mlp)
    return kind.__module__.startswith("transformers.models.") and kind.__name__.endswith("MLP")


def _concat(modules: list[nn.Module]) -> tuple[Tensor | None, Tensor | None]:
    if not modules or any(type(m) is not nn.Linear for m in modules):
        return None, None
    biases = [m.bias for m in modules]
    if len({b is None for b in biases}) > 1:  # some with a bias, some without
        return None, None
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    sizes = [m.out_features for m in modules]
    for name, joined in (("weight", weight), ("bias", bias)):
        if joined is not None:  # the old storages go once nothing else holds them
            for module, rows in zip(modules, joined.split(sizes), strict=True):
                getattr(module, name).data = rows
    return weight, bias
