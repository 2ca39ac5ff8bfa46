"""Where Torch-Pruning's reading of an op, channel k to channel k, is wrong, and what is right
instead: regions of group statistics that map channels one to one in G aligned groups,
couplings that end where channels collapse or change axis, and LayerNorms whose channels
are not their last dim."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .layers import Conv
from .tracing import OPTYPE, ShapeRecorder, channel_dim

# Ops a region of group statistics may hold (by grad_fn): elementwise maths, reductions
# (held to the trailing dims by the shapes), and views that keep the memory order. Anything
# else (a transpose, a flip, a gather) could move channels between the reshapes.
_GROUP_STATISTICS_OPS = ("Var", "Std", "Mean", "Sum", "Amax", "Amin", "Norm", "LinalgVectorNorm", "Add", "Sub",
                         "Mul", "Div", "Sqrt", "Rsqrt", "Pow", "Square", "Exp", "Log", "Abs", "Clamp", "Neg",
                         "Reciprocal", "Sigmoid", "ToCopy", "Clone", "Expand", "View", "UnsafeView", "Reshape",
                         "Squeeze", "Unsqueeze", "Alias")


def group_statistics(dg: tp.DependencyGraph, recorder: ShapeRecorder) -> dict[Any, str]:
    """The nodes of regions that compute statistics over G channel groups in the model's
    own code: a reshape (N, C, …) → (N, G, …), ops that keep the G axis (reductions over
    the trailing dims, elementwise maths, expands), and reshapes back to (N, C, …). timm's
    EvoNorm-S0 (its group std), a GroupNorm written by hand (x.view(N, G, -1), normalised,
    viewed back). Every channel comes back where it was, so the region maps them one to
    one; its G groups of C/G consecutive channels are kept as a GroupNorm's are
    (coupling._channel_groups: a cut mirrored across them)."""
    found: dict[Any, str] = {}
    for node in dg.module2node.values():
        if node in found or getattr(node, "afie_chain", False):
            continue
        region = _grouped_region(node, recorder)
        if region is None:
            continue
        nodes, groups = region
        for n in nodes:
            found[n] = ""
            n.afie_chain = n.afie_identity = True
        node.afie_channel_groups = groups
    return found


def _into_grouped(node, recorder: ShapeRecorder) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(shape in, shape out) of a reshape (N, C, …) → (N, G, …) that keeps the memory
    order, 1 < G < C, G dividing C; None for any other node."""
    seen = recorder.shapes.get(node.grad_fn)
    if node.type != OPTYPE.RESHAPE or seen is None or node.grad_fn not in recorder.layout:
        return None
    shape_in, shape_out = seen[0], seen[1]
    if len(shape_in) < 3 or len(shape_out) < 3 or shape_in[0] != shape_out[0] or seen[2] not in (
            "view", "reshape", "flatten", "unflatten", "_reshape_alias"):
        return None
    channels, groups = shape_in[1], shape_out[1]
    if not (1 < groups < channels and channels % groups == 0):
        return None
    return shape_in, shape_out


def _grouped_region(start, recorder: ShapeRecorder) -> tuple[set, int] | None:
    """The nodes from the reshape into groups ``start`` to the reshapes back (see
    group_statistics) and G; None when ``start`` begins no such region. The region is
    closed both ways: what its ops read comes from it, or from the same input read into
    the same groups again (a mean and a variance each from its own view)."""
    entry = _into_grouped(start, recorder)
    if entry is None or len(start.inputs) != 1:
        return None
    shape_in, shape_out = entry
    nodes, exits, frontier = set(), 0, [start]
    while frontier:
        n = frontier.pop()
        if n in nodes:
            continue
        if len(nodes) > 64:
            return None
        nodes.add(n)
        if _into_grouped(n, recorder) == entry and n.inputs == start.inputs:
            frontier.extend(n.outputs)
            continue
        shapes = recorder.io.get(n.grad_fn)
        if n.type == OPTYPE.RESHAPE and shapes is not None and tuple(shapes[1]) == shape_in:
            exits += 1  # channels again, each where it was
            frontier.extend(n.inputs)
            continue
        if not type(n.grad_fn).__name__.startswith(_GROUP_STATISTICS_OPS) or not n.outputs or not n.inputs:
            return None
        trailing = tuple(shapes[1][2:]) if shapes is not None else shape_out[2:]
        if shapes is not None and (tuple(shapes[1][:2]) != shape_out[:2] or not (
                math.prod(trailing) == 1 or len(trailing) == len(shape_out) - 2
                and all(t in (1, s) for t, s in zip(trailing, shape_out[2:])))):
            return None  # the groups mixed, the trailing dims reordered, or not a grouped tensor at all
        frontier.extend([*n.outputs, *n.inputs])
    return (nodes, shape_out[1]) if exits else None


def end_collapsed_channels(dg: tp.DependencyGraph, recorder: ShapeRecorder) -> None:
    """Where a tensor's channels are not what Torch-Pruning maps one to one onto the next
    node's, no channel index crosses (the channels' dim is found from the trace, see
    channel_dim). Three cases, each of which coupled a conv's channels with something
    else: a reduction over the channel dim (CBAM's and triplet attention's mean and max
    over channels); a layer that reads them on another dim (ECA's Conv1d, whose length
    runs over a conv's channels); and an elementwise op's input of one channel broadcast
    over many, or with its channels on another dim (CBAM's spatial attention map, ECA's
    gate made by that Conv1d). A cut changes their values (a mean over fewer channels, a
    shorter Conv1d), never their shapes."""
    memo: dict = {}
    dim = lambda n: channel_dim(n, recorder, memo)
    for node in dg.module2node.values():
        if node.grad_fn in recorder.reductions and len(node.inputs) == 1:
            if dim(node.inputs[0]) in recorder.reductions[node.grad_fn][0]:
                _sever(node.inputs[0], node)
        elif isinstance(node.module, (Conv, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            shape = recorder.io.get(node.grad_fn, ((),))[0]
            expected = len(shape) - 1 if isinstance(node.module, nn.Linear) else 1
            across = [i for i in node.inputs if dim(i) not in (None, expected)]
            for i in across:
                _sever(i, node)
            if across and isinstance(node.module, Conv):
                _sever_where_combined(node)
        elif node.type == OPTYPE.ELEMENTWISE and len(node.inputs) > 1:
            out = recorder.io.get(node.grad_fn, ((), ()))[1]
            seen = [(i, dim(i), recorder.io.get(i.grad_fn, ((), ()))[1]) for i in node.inputs]
            seen = [(i, d, shape) for i, d, shape in seen if d is not None and len(shape) == len(out) > d]
            if len(seen) < 2:
                continue
            widest = max(seen, key=lambda t: t[2][t[1]])[1]  # the dim of the most channels
            for i, d, shape in seen:
                if d != widest or shape[d] == 1 < out[d]:
                    _sever(i, node)


def _sever_where_combined(layer) -> None:
    """A conv run along another conv's channels (ECA's Conv1d) makes a map whose positions
    are those channels: where its own chain of single-input ops (a transpose back, a
    sigmoid, an expand) meets another tensor, its channels are not that tensor's."""
    frontier, seen = [(layer, n) for n in layer.outputs], set()
    while frontier:
        prev, node = frontier.pop()
        if node in seen or isinstance(node.module, (Conv, nn.Linear)) or node.type == OPTYPE.CONCAT:
            continue
        seen.add(node)
        if len(node.inputs) > 1:
            _sever(prev, node)
        else:
            frontier.extend((node, n) for n in node.outputs)


def _sever(a, b) -> None:
    """No channel index crosses between nodes ``a`` and ``b`` (the second slot: the first is
    what Torch-Pruning's updaters rewrite)."""
    for x, y in ((a, b), (b, a)):
        for dep in x.dependencies:
            if dep.target is y:
                dep.index_mapping[1] = drop_all


def find_norm_dims(dg: tp.DependencyGraph, recorder: ShapeRecorder) -> None:
    """For each nn.LayerNorm, which dim of its normalized_shape holds the channels, as
    ``node.afie_norm_dim`` (None: none does) where it is not the last: GCNet's
    LayerNorm([C, 1, 1]) on (N, C, 1, 1). Torch-Pruning cuts the last, and crashed there.
    Subclasses (timm's LayerNorm2d, which permutes inside) keep Torch-Pruning's own cut."""
    memo: dict = {}
    for node in dg.module2node.values():
        if type(node.module) is not nn.LayerNorm or len(node.inputs) != 1 or node.grad_fn not in recorder.io:
            continue
        d, rank = channel_dim(node.inputs[0], recorder, memo), len(recorder.io[node.grad_fn][0])
        if d is not None and d - rank != -1:
            node.afie_norm_dim = d - rank if d - rank >= -len(node.module.normalized_shape) else None


def cut_layer_norm(layer: nn.LayerNorm, dim: int | None, idxs: list[int]) -> None:
    """Cut a LayerNorm's channels ``idxs`` on its normalized dim ``dim`` (see find_norm_dims)."""
    if dim is None:
        return
    gone = set(idxs)
    keep = torch.tensor([i for i in range(layer.normalized_shape[dim]) if i not in gone], dtype=torch.long)
    for name in ("weight", "bias"):
        t = getattr(layer, name)
        if t is not None:
            setattr(layer, name, nn.Parameter(t.data.index_select(dim, keep.to(t.device)), requires_grad=t.requires_grad))
    shape = list(layer.normalized_shape)
    shape[dim] = len(keep)
    layer.normalized_shape = tuple(shape)


def drop_all(idxs: list) -> list:
    return []
