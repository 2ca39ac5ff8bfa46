"""What prune's trace records beside Torch-Pruning's graph, and where each tensor keeps its
channels: the shapes and arguments of the ops a forward runs (ShapeRecorder), the dim of
a traced tensor that carries a layer's channels (channel_dim), and a forward traced whole
(autograd_kept: through detach, no_grad blocks and reentrant checkpoints)."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from .handlers import split_handler

OPTYPE = tp.ops.OPTYPE
# torch functions whose output shape decides whether channels keep their meaning.
_SHAPE_FUNCS = {"view", "reshape", "flatten", "unflatten", "split", "chunk", "split_with_sizes", "unbind",
                "__getitem__", "narrow", "tensor_split", "unsafe_split", "_reshape_alias"}
# Reductions, whose dims the recorder notes: over the channels, they end the channels' coupling.
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nansum",
               "nanmean", "median", "nanmedian"}
# Ops that only move elements, replayed on channel indices to follow a chain of them.
_LAYOUT_FUNCS = {"view", "reshape", "flatten", "unflatten", "transpose", "permute", "swapaxes", "swapdims", "movedim",
                 "contiguous", "squeeze", "unsqueeze", "_reshape_alias"}


class ShapeRecorder(TorchFunctionMode):
    """Records, for every reshape/split-like op of a forward pass, the grad_fn of its
    output with the input and output shapes: torch-pruning's graph knows the op but not
    what it did to the channel dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[Any, tuple[tuple[int, ...], tuple[int, ...], str]] = {}
        self.owners: dict[Any, nn.Module] = {}  # grad_fn of a split → the innermost module with a split handler
        self.reductions: dict[Any, tuple[tuple[int, ...], int]] = {}  # grad_fn → (dims reduced, input rank)
        self.io: dict[Any, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # grad_fn → shapes of every op's first input and output
        self.layout: dict[Any, tuple[Callable, tuple, dict]] = {}  # grad_fn → a layout op, to replay on channel indices
        self.handled: list[nn.Module] = []  # the stack of such modules whose forward is running
        self.cats: dict[Any, tuple[int, list[int]]] = {}  # grad_fn of a concat → (its dim, each input's size on it)

    @contextlib.contextmanager
    def watching_modules(self):
        """Keep ``handled`` current with global module hooks while the model runs."""
        def enter(module, _args):
            if split_handler(module) is not None:
                self.handled.append(module)

        def leave(module, _args, _out):
            if self.handled and self.handled[-1] is module:
                self.handled.pop()

        hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
                 nn.modules.module.register_module_forward_hook(leave)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "detach" and args and isinstance(args[0], torch.Tensor):
            return args[0].clone()  # a copy autograd records: see autograd_kept
        out = func(*args, **kwargs)
        if args and isinstance(args[0], (list, tuple)) and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            if getattr(func, "__name__", "") in ("cat", "concat", "concatenate") and out.dim() > 0:
                dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % out.dim()
                self.cats.setdefault(out.grad_fn, (dim, [t.shape[dim] for t in args[0] if t.dim() == out.dim()]))
                self.io.setdefault(out.grad_fn, (tuple(args[0][0].shape), tuple(out.shape)))
        if not args or not isinstance(args[0], torch.Tensor):
            return out
        name = getattr(func, "__name__", "")
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            self._note_op(name, func, args, kwargs, out)
        elif name in ("max", "min") and isinstance(out, tuple) and getattr(out[0], "grad_fn", None) is not None:
            self._note_op(name, func, args, kwargs, out[0])  # (values, indices) of a reduction
        if name in _SHAPE_FUNCS:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.grad_fn is not None:
                    self.shapes.setdefault(o.grad_fn, (tuple(args[0].shape), tuple(o.shape), name))
                    if self.handled:
                        self.owners.setdefault(o.grad_fn, self.handled[-1])
        return out

    def _note_op(self, name: str, func: Callable, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        """Shapes of every op, the arguments of layout ops, and the dims of reductions."""
        self.io.setdefault(out.grad_fn, (tuple(args[0].shape), tuple(out.shape)))
        if name in _LAYOUT_FUNCS:
            self.layout.setdefault(out.grad_fn, (func, args[1:], dict(kwargs)))
        if name in _REDUCTIONS:
            rank, at = args[0].dim(), 2 if name == "norm" else 1  # norm(x, p, dim)
            dim = kwargs.get("dim", args[at] if len(args) > at else None)
            is_dim = lambda d: isinstance(d, int) and not isinstance(d, bool)  # std(x, True): unbiased
            if is_dim(dim) or isinstance(dim, (tuple, list)) and dim and all(map(is_dim, dim)):
                dims = (dim,) if isinstance(dim, int) else tuple(dim)
                self.reductions.setdefault(out.grad_fn, (tuple(sorted(d % max(rank, 1) for d in dims)), rank))
            elif dim is None:  # over every dim (max(x, other) is elementwise: its second argument is a tensor)
                self.reductions.setdefault(out.grad_fn, (tuple(range(rank)), rank))

    @property
    def reduced(self) -> set:
        """grad_fns of reductions over dim 1 of a 5-D or wider tensor (selective kernels'
        sum over the paths)."""
        return {fn for fn, (dims, rank) in self.reductions.items() if dims == (1,) and rank >= 5}


@contextlib.contextmanager
def autograd_kept():
    """The trace records the whole forward: ``torch.no_grad()`` blocks inside it (a frozen
    backbone's features) run with grad, a reentrant ``torch.utils.checkpoint`` runs its
    function in place, and the recorder turns ``detach()`` (a stop-gradient) into a copy.
    Torch-Pruning's graph is autograd's, so a conv past any of them was not in it and was
    silently never cut."""
    from torch.utils.checkpoint import CheckpointFunction

    real = torch.no_grad.__enter__
    torch.no_grad.__enter__ = lambda self: setattr(self, "prev", torch.is_grad_enabled())
    CheckpointFunction.apply = staticmethod(lambda function, _preserve, *args: function(*args))  # shadows Function's
    try:
        yield
    finally:
        torch.no_grad.__enter__ = real
        del CheckpointFunction.apply


# Layers whose output carries the channels on dim 1 (a Linear's are on the last dim).
_CHANNELS_FIRST = (OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.GN, OPTYPE.IN, OPTYPE.PRELU)
# Nodes whose output carries the channels where their input does.
_CHANNELS_KEPT = (OPTYPE.ELEMENTWISE, OPTYPE.LN, OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.SLICE)


def channel_dim(node, recorder: ShapeRecorder, memo: dict, depth: int = 0) -> int | None:
    """The dim of node's output that carries its channels, or None where unknown."""
    if node in memo:
        return memo[node]
    memo[node] = None  # a cycle or a long walk ends unknown
    shape = recorder.io.get(node.grad_fn, (None, None))[1]
    if shape is None or depth > 48:
        return None
    if node.type in _CHANNELS_FIRST:
        dim = 1
    elif node.type == OPTYPE.LINEAR:
        dim = len(shape) - 1
    elif node.grad_fn in recorder.layout and len(node.inputs) == 1:
        dim = _replayed_channel_dim(node, recorder, channel_dim(node.inputs[0], recorder, memo, depth + 1),
                                    recorder.io[node.grad_fn][0])
    elif node.type in _CHANNELS_KEPT:  # as an input of the same rank has them
        dims = [channel_dim(n, recorder, memo, depth + 1) for n in node.inputs
                if len(recorder.io.get(n.grad_fn, (None, ()))[1] or ()) == len(shape)]
        dim = next((d for d in dims if d is not None), None)
    else:
        dim = None
    memo[node] = dim
    return dim


def _replayed_channel_dim(node, recorder: ShapeRecorder, dim_in: int | None, shape_in: tuple[int, ...]) -> int | None:
    """The dim of a layout op's output along which its input's channel dim ``dim_in`` runs
    whole and in order, or None."""
    if dim_in is None or not 0 <= dim_in < len(shape_in) or math.prod(shape_in) > 1 << 24:
        return None
    func, args, kwargs = recorder.layout[node.grad_fn]
    channels = shape_in[dim_in]
    numbers = torch.arange(math.prod(shape_in)) // math.prod(shape_in[dim_in + 1:]) % channels
    try:
        out = func(numbers.view(shape_in), *args, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # it did not act on this tensor alone
        return None
    for d, size in enumerate(out.shape):
        if size == channels:
            along = torch.arange(size).view([-1 if i == d else 1 for i in range(out.dim())])
            if torch.equal(out, along.expand_as(out)):
                return d
    return None
