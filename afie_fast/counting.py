"""What a model costs: FLOPs as ``torch.utils.flop_counter.FlopCounterMode`` counts them
(conv, linear, matmul, attention; elementwise ops, norms and pooling are free), params,
and per conv/linear layer the same MACs, for prune()'s cost model.

FlopCounterMode itself also tracks the module tree, which cost MobileNet v2 four times
its forward; :class:`Counting` dispatches through the same formulas (its registry) without
that, so its totals equal FlopCounterMode's exactly. Even so, a dispatch mode costs tens
of microseconds an op, a third of MNASNet's forward: where one counted forward showed
that the conv and linear layers' own counts (forward hooks, the same formulas) add up to
FlopCounterMode's total, as in most CNNs, later forwards of the same code count with the
hooks alone. MACs are FLOPs / 2, per input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from .handlers import heads_handler
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

    # Ops without a formula that do not decompose (FlopCounterMode tries every time): the
    # elementwise ops, norms and pools of a CNN, run straight through after their first call.
    _opaque: set = set()

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._opaque:
            return func(*args, **kwargs)
        if func in _METADATA:
            return NotImplemented
        formula = flop_registry.get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
            self._opaque.add(func)
        out = func(*args, **kwargs)
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
    name), the output's shape, how often each conv or linear layer ran, and whether those
    layers' own counts made up the whole total (``by_layers``; None when not checked)."""

    macs: int
    params: int
    layers: dict[str, tuple[float, float]]
    shape: Any  # of the output, see shapes()
    calls: dict[str, int]
    by_layers: bool | None = None


def shapes(out: Any) -> Any:
    """The shapes of a model output: a tensor, or tuples, lists and dicts of them."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(shapes(o) for o in out)
    if isinstance(out, dict):
        return tuple((k, shapes(v)) for k, v in out.items())
    return type(out).__name__


def loosen(shape: Any, other: Any) -> Any:
    """``shape`` (from :func:`shapes`) with each size that ``other`` has different as None,
    and each part whose structure differs as ``...``: what of a model's output depends on
    its data (a detector's kept boxes), from the shapes of two outputs."""
    if shape == other:
        return shape
    if isinstance(shape, tuple) and isinstance(other, tuple) and len(shape) == len(other):
        return tuple(loosen(a, b) for a, b in zip(shape, other))
    if isinstance(shape, int) and isinstance(other, int):
        return None
    return ...


def matches(pattern: Any, shape: Any) -> bool:
    """Whether an output's ``shape`` fits ``pattern`` (see :func:`loosen`)."""
    if pattern is ...:
        return True
    if pattern is None:
        return isinstance(shape, int)
    if isinstance(pattern, tuple):
        return (isinstance(shape, tuple) and len(shape) == len(pattern)
                and all(matches(p, s) for p, s in zip(pattern, shape)))
    return pattern == shape


class Counting:
    """Counts what the forwards run inside it do, on the model itself (no copy).
    ``measured`` holds the result after a clean exit, and the model is left as it was
    found (hooks removed). ``per_layer=False`` leaves out the per-layer costs;
    ``dispatch=False`` sums the conv and linear layers' counts instead of counting every
    op, which equals FlopCounterMode's total where an earlier count found ``by_layers``."""

    def __init__(self, model: nn.Module, per_layer: bool = True, dispatch: bool = True) -> None:
        self.model, self.per_layer, self.dispatch = model, per_layer, dispatch
        self.measured: Measured | None = None

    def __enter__(self) -> "Counting":
        self.calls: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        self.shape, self.inputs, self.hooks = [], [], []
        self.own: dict[str, float] = {}  # attention heads' own matmuls (see _heads_hooks)
        for name, m in self.model.named_modules():
            if isinstance(m, (Conv, nn.Linear)):
                self.calls[name] = self.macs[name] = 0
                self.hooks.append(m.register_forward_hook(self._layer_hook(name)))
            elif self.per_layer and self.dispatch and heads_handler(m) is not None:
                self.hooks += self._heads_hooks(name, m)

        def top(_m, args, kwargs, out):
            first = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
            self.inputs.append(len(first) if first is not None and first.dim() > 0 else 1)  # the batch size
            self.shape.append(shapes(out))

        self.hooks.append(self.model.register_forward_hook(top, with_kwargs=True))
        self.flops = _Flops() if self.dispatch else None
        if self.flops is not None:
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

    def _heads_hooks(self, name: str, module: nn.Module) -> list:
        """An attention with a heads handler: the FLOPs of its forward beyond its own conv
        and linear layers (the heads' matmuls, which narrow with them), as one more layer."""
        inside = [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, (Conv, nn.Linear))]
        start: list[float] = []

        def before(_m, _args):
            start.append(self.flops.total - 2 * sum(self.macs[n] for n in inside))

        def after(_m, _args, _out):
            own = self.flops.total - 2 * sum(self.macs[n] for n in inside) - start.pop()
            self.own[name] = self.own.get(name, 0.0) + own / 2
        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if self.flops is not None:
                self.flops.__exit__(exc_type, *exc)
            if exc_type is None:
                self.measured = self._result()
        finally:
            for h in self.hooks:
                h.remove()

    def _result(self) -> Measured:
        per_input = 1.0 / max(sum(self.inputs), 1)
        layers = {}
        if self.per_layer:
            for n, m in self.model.named_modules():
                if isinstance(m, (Conv, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                    layers[n] = (self.macs.get(n, 0) * per_input, float(sum(p.numel() for p in m.parameters())))
            layers.update((n, (macs * per_input, 0.0)) for n, macs in self.own.items())
        by_layers = 2 * sum(self.macs.values())
        flops = self.flops.total if self.flops is not None else by_layers
        params = sum(p.numel() for p in self.model.parameters())
        return Measured(round(flops / 2 * per_input), int(params), layers, self.shape[0],
                        self.calls if self.per_layer else {}, flops == by_layers if self.flops is not None else None)
