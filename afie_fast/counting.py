"""What a model costs: FLOPs as ``torch.utils.flop_counter.FlopCounterMode`` counts them
(conv, linear, matmul, attention; elementwise ops, norms and pooling are free), params,
and per conv/linear layer the same MACs, for prune()'s cost model.

FlopCounterMode itself also tracks the module tree, which cost MobileNet v2 four times
its forward; :class:`Counting` dispatches through the same formulas (its registry) without
that, so its totals equal FlopCounterMode's exactly. MACs are FLOPs / 2, per input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .layers import Conv

_aten = torch.ops.aten
# Metadata queries FlopCounterMode leaves to the tensor (answered without dispatch).
_METADATA = {_aten.sym_is_contiguous.default, _aten.is_contiguous.default, _aten.is_contiguous.memory_format,
             _aten.is_strides_like_format.default, _aten.is_non_overlapping_and_dense.default, _aten.size.default,
             _aten.sym_size.default, _aten.stride.default, _aten.sym_stride.default, _aten.storage_offset.default,
             _aten.sym_storage_offset.default, _aten.numel.default, _aten.sym_numel.default, _aten.dim.default,
             torch.ops.prim.layout.default}


class _Flops(TorchDispatchMode):
    """FlopCounterMode's count (its formulas, its decomposition of ops it has no formula
    for) as one running total."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return NotImplemented
        packet = func._overloadpacket
        if packet not in flop_registry and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = flop_registry.get(packet)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def conv_macs(conv: Conv, x: torch.Tensor, out: torch.Tensor) -> int:
    """FlopCounterMode's conv count / 2 (no bias): per output position, or per input
    position for a transposed conv, which spreads each over a kernel-sized patch."""
    positions = x.shape[0] * math.prod((x if conv.transposed else out).shape[2:])
    return positions * conv.weight.numel()


def linear_macs(linear: nn.Linear, out: torch.Tensor) -> int:
    """FlopCounterMode's (add)mm count / 2 for a Linear layer (no bias)."""
    return out.numel() * linear.in_features


@dataclass
class Measured:
    """One instrumented forward: MACs and params (totals, and per conv/linear/BN layer by
    name), the output's shape, and how often each conv or linear layer ran."""

    macs: int
    params: int
    layers: dict[str, tuple[float, float]]
    shape: Any  # of the output, see shapes()
    calls: dict[str, int]


def shapes(out: Any) -> Any:
    """The shapes of a model output: a tensor, or tuples, lists and dicts of them."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(shapes(o) for o in out)
    if isinstance(out, dict):
        return tuple((k, shapes(v)) for k, v in out.items())
    return type(out).__name__


class Counting:
    """Counts what the forwards run inside it do, on the model itself (no copy).
    ``measured`` holds the result after a clean exit, and the model is left as it was
    found (hooks removed). ``per_layer=False`` counts the totals and the shape only."""

    def __init__(self, model: nn.Module, per_layer: bool = True) -> None:
        self.model, self.per_layer = model, per_layer
        self.measured: Measured | None = None

    def __enter__(self) -> "Counting":
        self.calls: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        self.shape, self.inputs, self.hooks = [], [], []
        if self.per_layer:
            for name, m in self.model.named_modules():
                if isinstance(m, (Conv, nn.Linear)):
                    self.calls[name] = self.macs[name] = 0
                    self.hooks.append(m.register_forward_hook(self._layer_hook(name)))

        def top(_m, args, out):
            self.inputs.append(len(args[0]) if args and hasattr(args[0], "__len__") else 1)
            self.shape.append(shapes(out))

        self.hooks.append(self.model.register_forward_hook(top))
        self.flops = _Flops()
        self.flops.__enter__()
        return self

    def _layer_hook(self, name: str):
        def hook(module, args, out):
            self.calls[name] += 1
            if isinstance(module, Conv):
                self.macs[name] += conv_macs(module, args[0], out)
            elif isinstance(out, torch.Tensor):
                self.macs[name] += linear_macs(module, out)
        return hook

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.flops.__exit__(exc_type, *exc)
            if exc_type is None:
                per_input = 1.0 / max(sum(self.inputs), 1)
                layers = {}
                if self.per_layer:
                    for n, m in self.model.named_modules():
                        if isinstance(m, (Conv, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                            layers[n] = (self.macs.get(n, 0) * per_input, float(sum(p.numel() for p in m.parameters())))
                params = sum(p.numel() for p in self.model.parameters())
                self.measured = Measured(round(self.flops.total / 2 * per_input), int(params), layers, self.shape[0],
                                         self.calls)
        finally:
            for h in self.hooks:
                h.remove()
