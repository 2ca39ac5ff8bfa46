"""Which filters must go together, and which convs must stay whole.

torch-pruning's DependencyGraph links every conv's output channels to the layers they
feed (BN, residual adds, concat, depthwise convs, the next conv's inputs). This module
reads that graph into pruning *units* and refuses, with a reason, every coupling that a
cut would get wrong: channels that reach the model's output, residual streams (unless
asked), and channel splits, slices and reshapes whose sizes are fixed in the model's own
forward code (ShuffleNet's shuffle, GhostNet's slice, MixConv's split), which the graph
cannot rewrite.
"""
from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn
from torch.utils._pytree import tree_leaves

from .inputs import Inputs, call, map_tensors
from .layers import Conv, width
from .remapping import cut_layer_norm, drop_all, end_collapsed_channels, find_norm_dims, group_statistics
from .tracing import ShapeRecorder, autograd_kept, channel_dim
from .handlers import heads_handler, split_handler

OPTYPE = tp.ops.OPTYPE
@dataclass
class Unit:
    """Filters that are removed together: one torch-pruning group rooted at a conv.

    ``channel_groups`` G > 1 when a grouped conv is coupled, or when the root's channels
    are G tied copies (GhostNet's halves): the cut is then mirrored across G equal channel
    groups so every group keeps the same width and tied channels go together.

    ``parts``: root channels that one layer holds only some of (the convs whose outputs a
    concat joins, as MixConv's projection feeding a residual stream; the convs a split
    feeds), each of which must keep one channel, or that layer would be left with none.

    ``multiple``: the kept width must be a multiple of it (the heads of an attention that
    reads the channels: afie_fast.handlers.register_heads).

    ``block``: B > 1 when B consecutive root channels become one channel downstream (a
    pixel shuffle, upscale r: B = r²): they are cut whole, block by block.
    """

    root: nn.Module
    handler: Any
    members: list[tuple[str, list[int], list[int]]]  # (conv name, its idxs, matching root idxs)
    width: int
    channel_groups: int = 1
    touched: list[tuple[nn.Module, str, int]] = field(default_factory=list)  # (module, "out"|"in", channels)
    group: Any = None  # Torch-Pruning's, for all the root's channels
    fixed: bool = False  # whether no other unit's cut can change the group's index mapping
    parts: list[frozenset[int]] = field(default_factory=list)
    multiple: int = 1
    block: int = 1  # root channels go in whole blocks of this many (a pixel shuffle's r² into one)

    @property
    def keep(self) -> int:
        """The fewest root channels a cut may leave: one per channel group, part and head,
        and one block."""
        return max(self.channel_groups, len(self.parts), self.multiple, self.block)


def _keeps_channels(shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> bool:
    """Whether a reshape leaves channel j of its input as channel j of its output (or as
    the j-th block of a flatten into a Linear, which torch-pruning maps)."""
    if len(shape_in) < 2 or len(shape_out) < 2 or shape_in[0] != shape_out[0]:
        return False
    if shape_in[1] == shape_out[1]:
        return True
    return len(shape_out) == 2 and shape_out[1] == math.prod(shape_in[1:])


_TIED = ("its channels are tied to each other in a pattern no mirrored cut follows (GhostNet's halves, a channel "
         "concatenated with a depthwise conv of it, are cut as pairs): a cut would take more filters than planned")


@contextlib.contextmanager
def _watching_ties():
    """For each group built inside, the pairs of its root channels that reach one channel
    of some layer (a concat of x and a depthwise conv of x, gated or added as one tensor,
    as in GhostNet). Torch-Pruning merges the paths into a layer keeping each channel's
    first root, so such a group looks like independent channels, yet cutting one root
    channel takes the other along."""
    real, roots, ties = tp.dependency.Group.add_and_merge, {}, {}

    def watching(group, dep, idxs):
        key = (group, dep.target, dep.handler)
        if key not in roots and len({i.idx for i in idxs}) == len(idxs):
            roots[key] = idxs  # the common case: reached once so far, one root per channel
        else:
            earlier = roots.get(key, [])
            seen = earlier if isinstance(earlier, dict) else {i.idx: i.root_idx for i in reversed(earlier)}
            for i in idxs:
                first = seen.setdefault(i.idx, i.root_idx)
                if first != i.root_idx:
                    ties.setdefault(group, set()).add((first, i.root_idx))
            roots[key] = seen
        real(group, dep, idxs)

    tp.dependency.Group.add_and_merge = watching
    try:
        yield ties
    finally:
        tp.dependency.Group.add_and_merge = real


def _mirrors(ties: set[tuple[int, int]], width: int) -> int | None:
    """G when every tie joins root channels a multiple of width/G apart, so that a cut
    mirrored across G channel groups (the same positions in each) takes tied channels
    together: GhostNet's halves (j, j + width/2), a Res2Net-style hierarchy over parts of a
    stream (j, j + width/G, j + 2·width/G, … of some parts; the rest are mirrored alike).
    None when only G = width would do, i.e. no cut short of all channels."""
    step = width
    for a, b in ties:
        step = math.gcd(step, abs(a - b))
    return width // step if step > 1 or not ties else None


def _blocks(ties: set[tuple[int, int]], width: int) -> int | None:
    """B when every tie joins root channels of one block of B consecutive ones (a pixel
    shuffle's r² channels that become one), the smallest such B that divides the width;
    None when there is none short of the whole width."""
    reach = max((abs(a - b) for a, b in ties), default=0)
    for b in range(reach + 1, width):
        if width % b == 0 and all(x // b == y // b for x, y in ties):
            return b
    return None


class _BlockMapping:
    """Through a pixel shuffle (N, C·B, H, W) → (N, C, rH, rW), B = r²: channel k is
    channel k // B after it, and channel c after it is the block c·B … c·B + B − 1 before
    (``expand``); a pixel unshuffle the other way round."""

    def __init__(self, block: int, expand: bool) -> None:
        self.block, self.expand = block, expand

    def __call__(self, idxs):
        hybrid = tp._helpers._HybridIndex
        if self.expand:
            mapped = {hybrid(i.idx * self.block + t, i.root_idx) for i in idxs for t in range(self.block)}
        else:
            mapped = {hybrid(i.idx // self.block, i.root_idx) for i in idxs}
        return sorted(mapped)  # sorted and unique, as _GroupsMapping's


def _map_shuffle(node, recorder: "ShapeRecorder") -> bool:
    """Index mapping of a pixel shuffle or unshuffle (an elementwise node to Torch-Pruning,
    which then maps channels one to one across a change of width): True when ``node`` is one."""
    kind = type(node.grad_fn).__name__
    if not kind.startswith(("PixelShuffleBackward", "PixelUnshuffleBackward")) or node.grad_fn not in recorder.io:
        return False
    shape_in, shape_out = recorder.io[node.grad_fn]
    unshuffle = kind.startswith("PixelUnshuffle")
    block = shape_out[-3] // shape_in[-3] if unshuffle else shape_in[-3] // shape_out[-3]
    _map_inputs(node, _BlockMapping(block, expand=unshuffle), _BlockMapping(block, expand=not unshuffle))
    return True


def _size_concats_after(dg: tp.DependencyGraph, shuffles: list, recorder: "ShapeRecorder") -> None:
    """A concat of channels one of whose inputs comes from a pixel shuffle through
    elementwise ops: its input widths as traced. Torch-Pruning infers them from the layer
    that made each input, whose width a shuffle changed, and its offsets then sent other
    inputs' channels into the shuffle's branch."""
    for node in dg.module2node.values():
        dim, sizes = recorder.cats.get(node.grad_fn, (None, []))
        if node.type != OPTYPE.CONCAT or dim != 1 or len(sizes) != len(node.inputs):
            continue
        for source in node.inputs:
            seen = 0
            while source not in shuffles and source.type == OPTYPE.ELEMENTWISE and len(source.inputs) == 1 and seen < 8:
                source, seen = source.inputs[0], seen + 1
            if source in shuffles:
                node.module.concat_sizes = list(sizes)
                tp.dependency.index_mapping.update_concat_index_mapping(dg, node)
                break


def _split_part(node, out) -> int | None:
    """Which part of the split ``node`` its output node ``out`` reads: from the autograd
    edge between them (Torch-Pruning assumes its outputs come in split order, which the
    order it finds them in need not be). None when ``out`` reads several parts or none."""
    parts = {k for fn, k in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn}
    return parts.pop() if len(parts) == 1 else None


class _GroupsMapping:
    """Through a reshape (N, G·C, …) → (N, G, C, …) whose G axis is reduced later: channel
    k is channel k mod C of the C axis, and channel c is each of the G channels g·C + c."""

    def __init__(self, groups: int, channels: int, reverse: bool) -> None:
        self.groups, self.channels, self.reverse = groups, channels, reverse

    def __call__(self, idxs):
        hybrid = tp._helpers._HybridIndex
        if self.reverse:
            mapped = {hybrid(g * self.channels + i.idx, i.root_idx) for i in idxs for g in range(self.groups)}
        else:
            mapped = {hybrid(i.idx % self.channels, i.root_idx) for i in idxs}
        # Sorted and unique: Torch-Pruning stops propagating when it meets the same index list
        # again, which a many-to-one mapping in a cycle would otherwise never produce.
        return sorted(mapped)


def _map_groups(graph, node) -> None:
    """Index mapping of a reshape into groups (see _GroupsMapping), at its traced sizes: the
    channels through it belong to one unit and are cut once."""
    groups, channels = node.afie_groups
    flatten = tp.dependency.index_mapping._FlattenIndexMapping
    for out in node.outputs:  # Torch-Pruning may have read the reshape as a flatten
        for dep in [*node.dependencies, *out.dependencies]:
            if {dep.source, dep.target} == {node, out} and isinstance(dep.index_mapping[0], flatten):
                dep.index_mapping[0] = None
    _map_inputs(node, _GroupsMapping(groups, channels, reverse=False), _GroupsMapping(groups, channels, reverse=True))


def _merged_with_positions(node, recorder: ShapeRecorder, seen: tuple) -> bool:
    """Mark a reshape that merges the channels, on a dim other than 1, with the dims after
    them into one (a CRNN's (W, N, C, H) → (W, N, C·H) before its LSTM): channel c becomes
    features c·s … c·s + s − 1, s the merged dims' size. Torch-Pruning maps such a flatten
    only from dim 1 of a 4-D tensor, and its LSTM then lost a channel's count of features
    instead of s times it. Whether it was marked."""
    shape_in, shape_out = seen[0], seen[1]
    d = channel_dim(node.inputs[0], recorder, {}) if len(node.inputs) == 1 else None
    if d is None or d == 1 or d >= len(shape_in) - 1 or shape_in[:d] != shape_out[:d] or len(shape_out) <= d:
        return False
    for m in range(2, len(shape_in) - d + 1):
        if shape_out[d] == math.prod(shape_in[d:d + m]) and shape_out[d + 1:] == shape_in[d + m:]:
            node.afie_flatten = shape_out[d] // shape_in[d]
            return True
    return False


def _map_flatten(node) -> None:
    flatten = tp.dependency.index_mapping._FlattenIndexMapping
    _map_inputs(node, flatten(stride=node.afie_flatten), flatten(stride=node.afie_flatten, reverse=True))


def _map_inputs(node, into: Callable, back: Callable) -> None:
    """Channel indices from each input of ``node`` into it go through ``into``, and from
    it back to the input through ``back``."""
    for source in node.inputs:
        for dep in source.dependencies:
            if dep.target is node:
                dep.index_mapping = [into, None]
        for dep in node.dependencies:
            if dep.target is source:
                dep.index_mapping = [back, None]


def _into_groups(node, shapes: tuple, reduced: set) -> bool:
    """Whether a reshape splits the channels into groups, (N, G·C, …) → (N, G, C, …), whose
    axis every use reduces (a sum or mean over dim 1, through elementwise ops only: selective
    kernels' path attention); then the C axis carries the channels."""
    shape_in, shape_out = shapes[0], shapes[1]
    if not (len(shape_out) == len(shape_in) + 1 >= 4 and shape_out[0] == shape_in[0]
            and shape_out[1] * shape_out[2] == shape_in[1] and shape_out[3:] == shape_in[2:]):
        return False
    frontier, seen = list(node.outputs), set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.grad_fn in reduced:
            continue
        if n.type != OPTYPE.ELEMENTWISE or not n.outputs or len(seen) > 32:
            return False
        frontier.extend(n.outputs)
    if not seen:
        return False
    node.afie_groups = (shape_out[1], shape_out[2])
    return True


# Ops that keep a tensor's shape but move its elements, which Torch-Pruning reads as
# elementwise: no chain through one leaves the channels in place.
_MOVERS = ("Flip", "Roll", "Rot90", "Gather", "Index", "Scatter", "Sort", "Take")


def _channel_chain(start, recorder: ShapeRecorder) -> tuple[list, bool] | None:
    """For a reshape that moves the channels off dim 1 (ResNeSt's radix softmax: a view to
    (cardinality, radix, C), a transpose, a softmax, a view back), the nodes up to the
    reshape that brings back the first two dims, and whether every element is then where
    it was (found by replaying the layout ops on element numbers: true whatever dim holds
    the channels). None when the chain branches, or has an op that changes the shape and
    is not a layout op."""
    shape_in = recorder.io.get(start.grad_fn, ((),))[0]
    if len(shape_in) < 2:
        return None
    idx = torch.arange(math.prod(shape_in), dtype=torch.float64).view(shape_in)
    chain, node = [], start
    while len(chain) < 16:
        chain.append(node)
        if node.grad_fn in recorder.layout:
            func, args, kwargs = recorder.layout[node.grad_fn]
            try:
                idx = func(idx, *args, **kwargs)
            except (RuntimeError, TypeError, ValueError):  # it did not act on this tensor alone
                return None
        elif node.grad_fn in recorder.io and len(set(recorder.io[node.grad_fn])) != 1:
            return None
        # (a node neither recorded is inside a recorded op: the copy a reshape makes)
        if node is not start and node.type == OPTYPE.RESHAPE and tuple(idx.shape[:2]) == shape_in[:2]:
            return chain, bool(torch.equal(idx.reshape(-1), torch.arange(idx.numel(), dtype=torch.float64)))
        if len(node.outputs) != 1 or type(node.grad_fn).__name__.startswith(_MOVERS):
            return None
        node = node.outputs[0]
        if len(node.inputs) != 1 or node.type not in (OPTYPE.RESHAPE, OPTYPE.ELEMENTWISE):
            return None
    return None


def _map_identity(node) -> None:
    """A node of a chain that leaves every channel in place (see _channel_chain,
    group_statistics): what Torch-Pruning read as a flatten (a reshape) or a repeat (a
    5-D expand, its mapping for grouped-query attention) to or from it maps channels one
    to one."""
    mappings = tp.dependency.index_mapping
    ours = (mappings._FlattenIndexMapping, mappings._GQAIndexMapping)
    deps = [*node.dependencies, *(d for n in [*node.inputs, *node.outputs] for d in n.dependencies if d.target is node)]
    for dep in deps:
        dep.index_mapping = [None if isinstance(m, ours) else m for m in dep.index_mapping]


def _map_split(graph, node) -> None:
    """Index mapping of a split whose sizes a handler reads from its module (afie_fast.handlers):
    each output sees its part's channels, at the module's current sizes."""
    mappings = tp.dependency.index_mapping
    sizes = node.afie_split.sizes(node.afie_owner)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    parts = [_split_part(node, out) for out in node.outputs]
    # Torch-Pruning infers a concat's input widths from these, listed in its outputs' order.
    node.module.split_sizes = [sizes[k] for k in parts]
    for out, k in zip(node.outputs, parts):
        for dep in node.dependencies:
            if dep.target is out:
                dep.index_mapping[0] = mappings._SplitIndexMapping(offsets[k:k + 2])
        for dep in out.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = mappings._SplitIndexMapping(offsets[k:k + 2], reverse=True)
        if out.type == OPTYPE.CONCAT:
            out.module.concat_sizes = None  # its widths are inferred anew, this part's from sizes[k]
            mappings.update_concat_index_mapping(graph, out)


def _concat_first(cat, split) -> None:
    """A split's part fed straight into a concat (Res2Net's last part): from the concat back
    to the split, the concat's mapping (to the part) must run before the split's (to the
    split's channels). Torch-Pruning puts each in its own slot, the split's first."""
    mappings = tp.dependency.index_mapping
    for dep in cat.dependencies:
        if dep.target is split:
            slots = dep.index_mapping
            concat = next((m for m in slots if isinstance(m, mappings._ConcatIndexMapping)), None)
            part = next((m for m in slots if isinstance(m, mappings._SplitIndexMapping)), None)
            if concat is not None and part is not None:
                dep.index_mapping = [concat, part]


_UPDATERS = {OPTYPE.CONCAT: "update_concat_index_mapping", OPTYPE.SPLIT: "update_split_index_mapping",
             OPTYPE.RESHAPE: "update_reshape_index_mapping", OPTYPE.UNBIND: "update_unbind_index_mapping",
             OPTYPE.EXPAND: "update_expand_index_mapping", OPTYPE.SLICE: "update_slice_index_mapping"}


@contextlib.contextmanager
def _index_mapping(failed: list, nodes: list | None = None):
    """Torch-Pruning's index mapping, made tolerant and, with ``nodes``, local.

    Its updates fail on couplings it cannot infer (a reshape dividing by a channel count
    of 0 for a 5-D view, as a channel shuffle makes; a concat whose inputs' widths it
    cannot find, as in DPN): such a node goes to ``failed`` instead of raising. And every
    get_pruning_group re-maps every node of the graph first (quadratic in its size:
    DenseNet-121 spent half of prune() there); with ``nodes``, only those are re-mapped:
    the ones a group passes through, or none while groups are read between cuts."""
    mapping = tp.dependency.index_mapping
    real = {name: getattr(mapping, name) for name in (*_UPDATERS.values(), "update_index_mapping")}

    def tolerant(update):
        def run(graph, node):
            try:
                if hasattr(node, "afie_split"):  # a split whose sizes a handler knows
                    _map_split(graph, node)
                    return
                if hasattr(node, "afie_groups"):  # a reshape into groups that are reduced
                    _map_groups(graph, node)
                    return
                if hasattr(node, "afie_flatten"):  # channels merged with the dims after them
                    _map_flatten(node)
                    return
                if hasattr(node, "afie_identity"):  # a layout chain that leaves the channels in place
                    _map_identity(node)
                    return
                update(graph, node)
                for split in node.inputs if node.type == OPTYPE.CONCAT else ():
                    if hasattr(split, "afie_split"):
                        _concat_first(node, split)
            except (ZeroDivisionError, TypeError, ValueError, IndexError):
                failed.append(node)
        return run

    def local(graph):
        for node in nodes:
            getattr(mapping, _UPDATERS[node.type])(graph, node)

    for name in _UPDATERS.values():
        setattr(mapping, name, tolerant(real[name]))
    if nodes is not None:
        mapping.update_index_mapping = local
    try:
        yield
    finally:
        for name, update in real.items():
            setattr(mapping, name, update)


@contextlib.contextmanager
def _bounded_indices(limit: int):
    """Torch-Pruning's traversal of one group stopped once it holds ``limit`` indices
    (``reset()`` starts the count for the next group). Its flatten mapping (channel i →
    indices i·s … i·s + s − 1) reads an attention's head split (C → heads × C/heads) as a
    flatten, and on a residual stream through many blocks the indices multiply at each one:
    prune() on Swin-T filled 24 GiB and was killed, on MaxViT-T as much, in a Python list.
    A real group, a flatten into a Linear included, holds far fewer."""
    flatten, group = tp.dependency.index_mapping._FlattenIndexMapping, tp.dependency.Group
    real_flatten, real_add = flatten.__call__, group.add_dep
    held = [0]

    def refuse():
        raise RuntimeError(f"its channel indices multiply past {limit:,} through reshapes it reads as flattens "
                           f"(an attention's heads, block after block)")

    def mapped(self, idxs):
        if not self.reverse and len(idxs) * self._stride > limit:
            refuse()
        return real_flatten(self, idxs)

    def add(self, dep, idxs):
        held[0] += len(idxs)
        if held[0] > limit:
            refuse()
        return real_add(self, dep, idxs)

    flatten.__call__, group.add_dep = mapped, add
    try:
        yield types.SimpleNamespace(reset=lambda: held.__setitem__(0, 0))
    finally:
        flatten.__call__, group.add_dep = real_flatten, real_add


@contextlib.contextmanager
def _own_parameters_follow():
    """A layer's own parameters and buffers of one entry per channel, which Torch-Pruning's
    pruners (weight and bias only) leave alone, cut with its channels: the gain of weight
    standardisation (timm's ScaledStdConv2d in NF-Nets, (out, 1, 1, 1)), a per-filter
    scale, an InstanceNorm's running statistics (track_running_stats=True); and a
    LayerNorm's channels on the dim that holds them (find_norm_dims)."""
    real = tp.dependency.Dependency.__call__

    def call(dep, idxs):
        layer = dep.target.module
        if hasattr(dep.target, "afie_norm_dim"):  # a LayerNorm whose channels are not its last dim
            cut_layer_norm(layer, dep.target.afie_norm_dim, tp._helpers.to_plain_idxs(idxs))
            return layer
        before = _own_width(layer)
        result = real(dep, idxs)
        if before is not None and _own_width(layer) < before:
            gone = set(tp._helpers.to_plain_idxs(idxs))
            keep = torch.tensor([i for i in range(before) if i not in gone], dtype=torch.long)
            for name, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
                if name not in ("weight", "bias") and t is not None and t.dim() > 0 and t.shape[0] == before:
                    cut = t.data.index_select(0, keep.to(t.device))
                    if isinstance(t, nn.Parameter):
                        setattr(layer, name, nn.Parameter(cut, requires_grad=t.requires_grad))
                    else:
                        layer.register_buffer(name, cut, persistent=name not in layer._non_persistent_buffers_set)
        return result

    tp.dependency.Dependency.__call__ = call
    try:
        yield
    finally:
        tp.dependency.Dependency.__call__ = real


def _own_width(layer: nn.Module) -> int | None:
    """The channel count Torch-Pruning's pruner of ``layer`` changes, for the layers whose
    other per-channel tensors _own_parameters_follow cuts."""
    if isinstance(layer, Conv) and not layer.transposed:
        return layer.out_channels
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm):
        return layer.num_features
    return None


@contextlib.contextmanager
def _each_channel_once():
    """Layers cut with each index once. A layer reached from several root channels (a
    selective kernel's paths, from each path's copy of the attention) holds an index per
    root, and Torch-Pruning's pruners subtract the count of indices, repeats included, from
    the layer's width."""
    real = tp.dependency.Dependency.__call__

    def call(dep, idxs):
        return real(dep, list(dict.fromkeys(tp._helpers.to_plain_idxs(idxs))))

    tp.dependency.Dependency.__call__ = call
    try:
        yield
    finally:
        tp.dependency.Dependency.__call__ = real


class _RecurrentInputs(tp.pruner.function.BasePruningFunc):
    """nn.GRU and nn.RNN, for which Torch-Pruning has no pruner (a CRNN's conv channels
    feeding one were left whole): the first layer's input features are cut; the hidden
    size never is (_recurrent_hidden refuses a group that reaches it)."""

    def prune_in_channels(self, layer: nn.RNNBase, idxs: list) -> nn.Module:
        keep = sorted(set(range(layer.input_size)) - set(idxs))
        for name in ("weight_ih_l0", "weight_ih_l0_reverse")[: 1 + layer.bidirectional]:
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        return layer

    def prune_out_channels(self, layer: nn.RNNBase, idxs: list) -> nn.Module:
        raise RuntimeError("prune does not cut the hidden size of a recurrent layer")

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size * (1 + layer.bidirectional)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size


_RECURRENT = _RecurrentInputs()


class _OneOp(torch.autograd.Function):
    """A module's forward as one autograd op of its input (never differentiated: only traced)."""

    @staticmethod
    def forward(ctx, run, x):
        return run(x)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("traced only")


@contextlib.contextmanager
def _recurrent_as_one_op(model: nn.Module):
    """Every nn.GRU and nn.RNN of ``model`` traced as one op from its input to its outputs.
    On the CPU their forward is many autograd ops (a matmul and a gate split per step),
    which the trace followed inside, past the layer _RecurrentInputs cuts, into a split it
    cannot map."""
    patched = [m for m in model.modules() if type(m) in (nn.GRU, nn.RNN)]
    for m in patched:
        real = type(m).forward
        m.forward = lambda x, hx=None, m=m, real=real: (
            _OneOp.apply(lambda t: real(m, t, hx), x) if isinstance(x, torch.Tensor) else real(m, x, hx))
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@dataclass
class Graph:
    """A traced dependency graph and the nodes whose channel coupling cannot be cut."""

    dg: tp.DependencyGraph
    opaque: dict[Any, str]  # node -> why a cut through it would be wrong

    @property
    def names(self) -> dict[nn.Module, str]:
        return self.dg._module2name  # torch-pruning keeps module names only here

    def groups(self, ignored: list[nn.Module], tick: Callable[[], object] = lambda: None
               ) -> list[tuple[nn.Module, Any, str | None, int, int]]:
        """(conv, its group or None, why not, G, B) for every conv's output channels, each
        coupled set once: torch-pruning's get_all_groups, with an error inside one group
        confined to that group. G > 1 when the root's channels are G mirrored copies (see
        _mirrors), B > 1 when they go in blocks of B (see _blocks). ``tick`` is called once
        per conv or linear layer."""
        dg, visited, found = self.dg, set(), []
        with _index_mapping([]):
            tp.dependency.index_mapping.update_index_mapping(dg)  # once: nothing is cut meanwhile
        widest = max((max(width(m), m.in_channels if isinstance(m, Conv) else m.in_features)
                      for m in dg.module2node if isinstance(m, (Conv, nn.Linear))), default=1)
        bounded = _bounded_indices(max(1 << 20, 16 * widest))
        with _index_mapping([], nodes=[]), _watching_ties() as ties, bounded as held:
            for module in _split_producers_first(dg):
                tick()
                if module in visited:
                    continue
                held.reset()
                try:
                    group = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels,
                                                 list(range(width(module))))
                except (IndexError, KeyError, ZeroDivisionError, ValueError, TypeError, RuntimeError) as exc:
                    found.append((module, None, f"Torch-Pruning cannot map its coupling ({type(exc).__name__}: {exc})", 1, 1))
                    continue
                outs = [item.dep.target.module for item in group if dg.is_out_channel_pruning_fn(item.dep.handler)]
                visited.update(outs)
                mirrors = _mirrors(ties[group], width(module)) if group in ties else 1
                blocks = (_blocks(ties[group], width(module)) or 1) if mirrors is None else 1
                reason = ("ignored_layers (or coupled to one)" if any(m in ignored for m in outs) else
                          _TIED if mirrors is None and blocks == 1 else None)
                found.append((module, group, reason, mirrors or 1, blocks))
        return found

    def prune(self, unit: Unit, idxs: list[int]) -> None:
        """Remove the unit's filters ``idxs`` (root indexing) and all they feed."""
        if not unit.fixed:
            # Torch-Pruning rebuilds the group for the current widths (concat offsets move as
            # other units are cut), re-mapping only the nodes the group passes through.
            nodes = list(dict.fromkeys(item.dep.target for item in unit.group if item.dep.target.type in _UPDATERS))
            with _index_mapping([], nodes=nodes), _own_parameters_follow(), _each_channel_once():
                self.dg.get_pruning_group(unit.root, unit.handler, idxs).prune()
            return
        # Every member maps the root's channels one to one, so the cut is the whole group
        # narrowed to idxs: what get_pruning_group would rebuild, without re-mapping the graph.
        keep, group = set(idxs), tp.dependency.Group()
        group._DG = self.dg
        for item in unit.group:
            cut = [i for i in item.idxs if i in keep]
            if cut:
                group.add_dep(item.dep, cut)
        with _own_parameters_follow(), _each_channel_once():
            group.prune()

    def replay(self, history: list) -> None:
        """Redo a pruning history (save/load) on a fresh copy of the model."""
        with _index_mapping([]), _own_parameters_follow(), _each_channel_once():
            self.dg.load_pruning_history(history)


def _split_producers_first(dg: tp.DependencyGraph) -> list[nn.Module]:
    """Every conv and linear layer, those whose outputs an equal split divides first. A
    group is found from its root: rooted at a layer that holds one part of such a split
    (the bottleneck added to it in YOLOv8's C2f), it would hold only that part, and a cut
    could not keep the parts equal; rooted at the producer it holds them all."""
    first = []
    for node in dg.module2node.values():
        if getattr(node, "afie_split", None) is None or not node.afie_split.equal or len(node.inputs) != 1:
            continue
        source = node.inputs[0]
        while not isinstance(source.module, (Conv, nn.Linear)) and len(source.inputs) == 1:
            source = source.inputs[0]  # through its norm and activation
        if isinstance(source.module, (Conv, nn.Linear)):
            first.append(source.module)
    return list(dict.fromkeys([*first, *(m for m in dg.module2node if isinstance(m, (Conv, nn.Linear)))]))


def build_graph(model: nn.Module, example_inputs: Inputs) -> Graph:
    """Trace ``model`` (in eval mode, BN statistics untouched) into a dependency graph."""
    recorder, failed, returned = ShapeRecorder(), [], set()

    def forward(m, x):
        with recorder, recorder.watching_modules(), autograd_kept(), _recurrent_as_one_op(m):
            out = call(m, x)
        returned.update(t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None)
        return out

    # Torch-Pruning traces through autograd: a caller's no_grad or inference_mode would hide
    # every edge (and an inference tensor cannot enter autograd: hence the clone).
    with _index_mapping(failed), torch.inference_mode(False), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=map_tensors(example_inputs, torch.clone),
                                                   forward_fn=forward, verbose=False,
                                                   customized_pruners={nn.GRU: _RECURRENT, nn.RNN: _RECURRENT})
    _drop_parameter_paths(dg)
    for node in dg.module2node.values():
        # Torch-Pruning adds an output node only where the output's op has no module and
        # was not met before (a detector returning its neck's features beside its boxes).
        node.afie_returned = node.grad_fn in returned
    _whole_splits_into_concats(dg, recorder)
    _map_channel_concats(dg, recorder)
    chained = _layout_chains(dg, recorder)
    chained.update(group_statistics(dg, recorder))
    opaque: dict[Any, str] = {n: f"a channel {_KIND.get(n.type, 'coupling')} Torch-Pruning cannot map"
                              for n in failed if n not in chained}
    opaque.update((n, why) for n, why in chained.items() if why)
    handled, grouped, flattened = [], [], []
    shuffles = [node for node in dg.module2node.values() if _map_shuffle(node, recorder)]
    _size_concats_after(dg, shuffles, recorder)
    for node in dg.module2node.values():
        if node in shuffles:
            continue
        kind = _channel_change(node, recorder, dg)
        if kind == "groups":
            grouped.append(node)
        elif kind == "flatten":
            flattened.append(node)
        elif kind == "split":
            handled.append(node)
        elif kind == "identity":
            opaque.pop(node, None)
            chained.setdefault(node, "")
        elif kind is not None:
            opaque.setdefault(node, kind)
    remapped: list = []
    with _index_mapping(remapped):
        for node in chained:
            if hasattr(node, "afie_identity"):
                _map_identity(node)
        for node in handled:
            _map_split(dg, node)
            # A concat of its parts that Torch-Pruning could not size while the split's
            # sizes were unknown (CS3DarkNet's one-block stages), mapped now: no longer opaque.
            for out in node.outputs:
                if out.type == OPTYPE.CONCAT and out in failed and out not in remapped:
                    opaque.pop(out, None)
        for node in grouped:
            _map_groups(dg, node)
        for node in flattened:
            _map_flatten(node)
    opaque.update((n, f"a channel {_KIND.get(n.type, 'coupling')} Torch-Pruning cannot map")
                  for n in remapped if n not in chained and n not in opaque)
    end_collapsed_channels(dg, recorder)
    find_norm_dims(dg, recorder)
    # A group reaches an opaque node (and is refused for it) but goes no further: through
    # it the channel mapping is unknown, and an identity mapping would join whole networks
    # into one huge group.
    for node in opaque:
        node.enable_index_mapping = False
        for dep in node.dependencies:
            dep.index_mapping = [None, drop_all]
        for neighbour in [*node.inputs, *node.outputs]:
            for dep in neighbour.dependencies:
                if dep.target is node:
                    dep.index_mapping = [None, None]
    return Graph(dg, opaque)


def _whole_splits_into_concats(dg: tp.DependencyGraph, recorder: ShapeRecorder) -> None:
    """A concat that takes every part of one split side by side, in order (YOLOv8's C2f and
    YOLOv7's ELAN: ``torch.cat([*x.chunk(2, 1), m(y)], 1)``), takes the split's input whole:
    those edges become one edge from the split's producer. Torch-Pruning's graph holds one
    split node whose outputs are listed once per part they read, and its split and concat
    mappings then inferred widths such as [48, 48, -16, 16] for a 32-wide chunk."""
    by_fn = {node.grad_fn: node for node in dg.module2node.values()}
    for cat in list(dg.module2node.values()):
        dim, sizes = recorder.cats.get(cat.grad_fn, (None, []))
        edges = [(by_fn.get(fn), k) for fn, k in getattr(cat.grad_fn, "next_functions", ())]
        if cat.type != OPTYPE.CONCAT or dim != 1 or len(sizes) != len(edges):
            continue
        for split in dict.fromkeys(n for n, _ in edges if n is not None and n.type == OPTYPE.SPLIT):
            at = [i for i, (n, _) in enumerate(edges) if n is split]
            shape_in = recorder.shapes.get(split.grad_fn, ((),))[0]
            whole = (at == list(range(at[0], at[0] + len(at))) and [edges[i][1] for i in at] == list(range(len(at)))
                     and len(shape_in) > 1 and sum(sizes[i] for i in at) == shape_in[1]
                     and getattr(split.grad_fn, "_saved_dim", 1) % len(shape_in) == 1 and len(split.inputs) == 1)
            producer = split.inputs[0] if whole else None
            if producer is None or producer in cat.inputs:
                continue
            edges[at[0]:at[-1] + 1] = [(producer, 0)]
            cat.inputs = [n for n, _ in edges if n is not None]
            split.outputs = [n for n in split.outputs if n is not cat]
            producer.outputs.append(cat)
            split.dependencies = [d for d in split.dependencies if d.target is not cat]
            cat.dependencies = [d for d in cat.dependencies if d.target is not split]
            pruner = lambda node: dg.get_pruner_of_module(node.module)
            cat.dependencies.append(tp.dependency.Dependency(pruner(cat).prune_in_channels,
                                                             pruner(producer).prune_out_channels, cat, producer))
            producer.dependencies.append(tp.dependency.Dependency(pruner(producer).prune_out_channels,
                                                                  pruner(cat).prune_in_channels, producer, cat))
            cat.module.concat_sizes = None  # inferred anew from its inputs


def _map_channel_concats(dg: tp.DependencyGraph, recorder: ShapeRecorder) -> None:
    """Torch-Pruning turns off the index mapping of every concat and split downstream of a
    3-D parameter (its guard for ViT's class token, concatenated along the tokens), which
    EdgeNeXt's attention temperature (heads, 1, 1) also is: concats and splits of channels
    on dim 1, as a conv makes them, are mapped again."""
    memo: dict = {}
    for node in dg.module2node.values():
        if node.type in (OPTYPE.CONCAT, OPTYPE.SPLIT) and not node.enable_index_mapping:
            dims = {channel_dim(n, recorder, memo) for n in node.inputs} - {None}  # a split's part: not known
            node.enable_index_mapping = dims == {1}


def _drop_parameter_paths(dg: tp.DependencyGraph) -> None:
    """Remove the operation nodes that no activation reaches: ops on a layer's own
    parameters on their way into its forward, as weight standardisation writes them
    (timm's ScaledStdConv2d in NF-Nets: the weight reshaped to (1, out, -1), normalised,
    reshaped back). Torch-Pruning traces them like activations, so their reshape looked
    like a channel reshape it cannot map and left every such conv whole; the parameters
    are the layer's own and shrink with it. An operation node without inputs starts such
    a path (a parameter Torch-Pruning does not track itself, or the model's input, whose
    channels are never cut either); every operation fed only by such nodes joins it.
    Layers and the parameters Torch-Pruning tracks (layer scales) are never removed."""
    def is_op(node) -> bool:
        return type(node.module).__module__.startswith("torch_pruning") and node.type != OPTYPE.PARAMETER

    dropped: set = set()
    frontier = [n for n in dg.module2node.values() if is_op(n) and not n.inputs]
    while frontier:
        node = frontier.pop()
        if node in dropped or not is_op(node) or any(i not in dropped for i in node.inputs):
            continue
        dropped.add(node)
        frontier.extend(node.outputs)
    if not dropped:
        return
    for node in dg.module2node.values():
        node.inputs = [n for n in node.inputs if n not in dropped]
        node.outputs = [n for n in node.outputs if n not in dropped]
        node.dependencies = [d for d in node.dependencies if d.target not in dropped and d.source not in dropped]
    for module in [m for m, n in dg.module2node.items() if n in dropped]:
        del dg.module2node[module]


def _layout_chains(dg: tp.DependencyGraph, recorder: ShapeRecorder) -> dict[Any, str]:
    """The nodes of layout chains that move the channels off dim 1 and back (see
    _channel_chain), each with "" where the chain leaves every channel in place (mapped one
    to one: ResNeSt's radix softmax at cardinality 1) or why it cannot be cut."""
    found: dict[Any, str] = {}
    for node in dg.module2node.values():
        seen = recorder.shapes.get(node.grad_fn)
        if node.type != OPTYPE.RESHAPE or node in found or seen is None or _keeps_channels(seen[0], seen[1]):
            continue
        chain = _channel_chain(node, recorder)
        if chain is None:
            continue
        nodes, in_place = chain
        why = "" if in_place else ("a channel permutation (a view, a transpose and a view back: a channel shuffle, "
                                   "ResNeSt's radix softmax at cardinality > 1) Torch-Pruning cannot map")
        for n in nodes:
            found[n] = why
            n.afie_chain = True
            if not why:
                n.afie_identity = True
    return found


def _only_unit_dims(shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> bool:
    """Whether a reshape only adds or drops size-1 dims after the first two, or views a
    vector of one entry per channel (a parameter: EvoNorm's v, (C,) → (1, C, 1, 1)) as channels."""
    if len(shape_in) == 1 and len(shape_out) >= 2:
        return shape_out[1] == shape_in[0] == math.prod(shape_out)
    return (len(shape_in) >= 2 and shape_in[:2] == shape_out[:2] and shape_in != shape_out
            and [d for d in shape_in[2:] if d != 1] == [d for d in shape_out[2:] if d != 1])


def _channel_change(node, recorder: ShapeRecorder, dg: tp.DependencyGraph) -> str | None:
    """What a traced reshape or split does to the channels: None (nothing, or not such a
    node), "identity" (a reshape that only adds or drops unit dims), "groups" (a reshape into
    groups, mapped), "split" (a split a handler knows), or why Torch-Pruning cannot map it."""
    seen = recorder.shapes.get(node.grad_fn)
    if hasattr(node, "afie_chain"):  # see _layout_chains
        return None
    if node.type == OPTYPE.RESHAPE:
        # Views inside other ops (F.linear on a 4-D input) are not seen: they keep the last dim.
        if seen is not None and _only_unit_dims(seen[0], seen[1]):
            # (N, C) → (N, C, 1, 1) and back: every element stays where it is, whatever widths
            # Torch-Pruning infers around it (before a reshape into groups it read one as a flatten)
            node.afie_identity = True
            return "identity"
        if seen is not None and _merged_with_positions(node, recorder, seen):
            return "flatten"
        if seen is None or _keeps_channels(seen[0], seen[1]):
            return None
        if _into_groups(node, seen, recorder.reduced):
            return "groups"
        if _moves_channels_whole(node, recorder):
            node.afie_identity = True
            return "identity"
        return "a channel reshape (e.g. a channel shuffle) Torch-Pruning cannot map"
    if node.type in (OPTYPE.SPLIT, OPTYPE.SLICE, OPTYPE.UNBIND):
        # Split sizes and slice bounds are constants of the forward code: cutting the
        # channels they divide breaks them (or silently moves channels across parts),
        # unless a handler knows where the module keeps them (afie_fast.handlers).
        (shape_in, shape_out, _) = seen if seen is not None else ((), (), "")
        if len(shape_in) >= 2 and len(shape_out) >= 2 and shape_out[1] == shape_in[1]:
            return None
        if _handled_split(node, recorder.owners.get(node.grad_fn), shape_in) or _chunked(node, seen, dg):
            return "split"
        return ("a channel split or slice fixed in the model's forward code "
                "(afie_fast.register_split teaches prune where its sizes live)")
    if type(node.grad_fn).__name__.startswith("GluBackward") and node.grad_fn in recorder.io:
        (shape_in, shape_out) = recorder.io[node.grad_fn]
        if len(shape_in) >= 2 and shape_in[1] == 2 * shape_out[1] and shape_in[2:] == shape_out[2:]:
            node.afie_groups = (2, shape_out[1])  # F.glu(x, 1): channel c gates channel c of the other half
            return "groups"
    return None


def _moves_channels_whole(node, recorder: ShapeRecorder) -> bool:
    """Whether a reshape keeps every channel whole wherever its input holds them: tokens
    (N, H·W, C) → (N, H, W, C), channels last, as EdgeNeXt writes them. Found by replaying
    the reshape on each element's channel number, the channels' dim read back to the layer
    that made them (a conv's: dim 1; a Linear's: the last) through layout and elementwise ops."""
    return node.grad_fn in recorder.layout and channel_dim(node, recorder, {}) is not None


def _handled_split(node, owner: nn.Module | None, shape_in: tuple[int, ...]) -> bool:
    """Mark a split whose module has a handler (whose sizes it can read, and whose every
    output reads one part) to be mapped part by part; whether it was."""
    handler = split_handler(owner) if owner is not None else None
    if handler is None or node.type != OPTYPE.SPLIT or len(shape_in) < 2:
        return False
    if sum(handler.sizes(owner)) != shape_in[1] or any(_split_part(node, out) is None for out in node.outputs):
        return False
    node.afie_split, node.afie_owner = handler, owner
    return True


@dataclass(frozen=True)
class _Chunks:
    """``x.chunk(n, 1)`` as a split handler: n equal parts of whatever width it gets
    (WaveNet's gated activation, YOLOv8's C2f), so every part is cut alike."""

    parts: int
    dg: Any
    equal: bool = True

    def sizes(self, node) -> list[int]:
        width = tp.dependency.shape_infer.infer_out_channels_recursively(self.dg, node.inputs[0], [0])
        return [(width or 0) // self.parts] * self.parts


def _chunked(node, seen: tuple | None, dg: tp.DependencyGraph) -> bool:
    """Mark a ``chunk`` of the channels into equal parts, each output reading one, to be
    mapped part by part (see _Chunks); whether it was."""
    if seen is None or seen[2] != "chunk" or node.type != OPTYPE.SPLIT or len(node.inputs) != 1:
        return False
    shape_in, shape_out = seen[0], seen[1]
    if len(shape_in) < 2 or shape_in[2:] != shape_out[2:] or shape_in[1] % shape_out[1]:
        return False
    chunks = _Chunks(shape_in[1] // shape_out[1], dg)
    if sum(chunks.sizes(node)) != shape_in[1] or any(_split_part(node, out) is None for out in node.outputs):
        return False
    node.afie_split, node.afie_owner = chunks, node
    return True


_KIND = {OPTYPE.RESHAPE: "reshape (e.g. a channel shuffle)", OPTYPE.CONCAT: "concat", OPTYPE.SPLIT: "split"}


def is_out_conv(dg: tp.DependencyGraph, dep) -> bool:
    """Whether the dependency cuts the outputs of a conv or linear layer (its filters)."""
    return isinstance(dep.target.module, (Conv, nn.Linear)) and dg.is_out_channel_pruning_fn(dep.handler)


def _changes_output(dg: tp.DependencyGraph, item) -> bool:
    """Whether this cut changes a model output's width: it reaches an output node (or a
    module whose result is returned) other than as the input side of a conv or linear."""
    node = item.dep.target
    if node.type == OPTYPE.OUTPUT:
        return True
    absorbed = isinstance(node.module, (Conv, nn.Linear)) and dg.is_in_channel_pruning_fn(item.dep.handler)
    return (not node.outputs or getattr(node, "afie_returned", False)) and not absorbed


def _channel_groups(node) -> int:
    """G of a grouped conv (not depthwise, whose channels pair one to one), of a GroupNorm
    or of group statistics in a model's own code (group_statistics: their channels must
    stay a multiple of G, and each channel in its group: a cut mirrored across them keeps
    both), else 1."""
    module = node.module
    if hasattr(node, "afie_channel_groups"):
        return node.afie_channel_groups
    if isinstance(module, Conv) and 1 < module.groups and not (module.groups == module.in_channels == module.out_channels):
        return module.groups
    if isinstance(module, nn.GroupNorm) and 1 < module.num_groups:
        return module.num_groups
    return 1


def _touched(dg: tp.DependencyGraph, group) -> list[tuple[nn.Module, str, int]]:
    out = []
    for item in group:
        module = item.dep.target.module
        if isinstance(module, (Conv, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            side = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            out.append((module, side, len(set(item.idxs))))  # an index once, however many roots reach it
    return out


RESIDUAL = "residual stream"  # the reason a residual stream stays whole begins so


def find_units(graph: Graph, groups: list, layers: Iterable[str], prune_residual: bool
               ) -> tuple[list[Unit], dict[str, str]]:
    """The prunable units among ``groups`` (from :meth:`Graph.groups`), and every layer of
    ``layers`` left whole with the reason."""
    dg, names, layers = graph.dg, graph.names, set(layers)
    heads = _attention_layers(dg.model)
    units, skipped = [], {names[m]: _UNTRACED for m in names if names[m] in layers and m not in dg.module2node}
    for root, group, reason, mirrors, blocks in groups:
        if group is None:
            if names[root] in layers:
                skipped[names[root]] = reason
            continue
        members = _members(graph, group, layers)
        if not members:
            continue
        touched = _touched(dg, group)
        multiple, heads_why = _heads_follow(touched, heads)
        reason = heads_why or reason  # the heads' own channels: whatever else their graph shows
        if reason == _TIED:  # a cause found on the way (an opaque node: the ties' origin) says more
            reason = _why_whole(graph, group, members, layers, prune_residual) or _TIED
        reason = reason or _why_whole(graph, group, members, layers, prune_residual)
        g = 0
        if reason is None:
            g, reason = _mirrored(group, mirrors)
        if reason is None and len(group[0].idxs) == 1:
            reason = "a single filter"
        elif reason is None and g >= len(group[0].idxs):
            reason = _ONE_PER_GROUP
        parts = _parts(group)
        if reason is None and blocks > 1 and (g > 1 or parts or multiple > 1):
            reason = _TIED  # blocks and another layout at once: no cut keeps both
        if reason is not None:
            skipped.update((m[0], reason) for m in members if m[0] in layers)
            continue
        units.append(Unit(group[0].dep.target.module, group[0].dep.handler, members, len(group[0].idxs), g,
                          touched, group, _fixed_mapping(group), parts, multiple, blocks))
    return units, skipped


def _attention_layers(model: nn.Module) -> dict[nn.Module, tuple[str, nn.Module, int, nn.Module]]:
    """The projections of every attention with a heads handler: layer -> ("qkv" or
    "proj", the other projection, the heads, the attention)."""
    found = {}
    for module in model.modules():
        handler = heads_handler(module)
        if handler is not None:
            qkv, proj, h = handler.qkv(module), handler.proj(module), handler.heads(module)
            found[qkv], found[proj] = ("qkv", proj, h, module), ("proj", qkv, h, module)
    return found


def _heads_follow(touched: list, heads: dict) -> tuple[int, str | None]:
    """For a group that an attention's input or output (``heads``, from _attention_layers)
    is part of: the multiple of its heads its kept width must be, with the heads' own
    layers added to ``touched`` (they narrow with it: afie_fast.handlers.HeadsHandler);
    or why it stays whole (the heads themselves, which follow the input's width)."""
    multiple = 1
    for module, side, n in list(touched):
        role, other, h, attention = heads.get(module, (None, None, 1, None))
        if (role, side) in (("qkv", "out"), ("proj", "in")):
            return 1, "an attention's heads (they follow the width it reads: afie_fast.register_heads)"
        if role is not None:
            multiple = math.lcm(multiple, h)
        if (role, side) == ("qkv", "in"):  # the heads' matmuls too (counting.Counting), as one layer
            touched += [(module, "out", n * module.out_features // module.in_features), (other, "in", n),
                        (attention, "out", n)]
    return multiple, None


def _members(graph: Graph, group, layers: set[str]) -> list[tuple[str, list[int], list[int]]]:
    """The group's filters: (layer, indices, root indices) of each layer cut on its outputs.
    A Linear's outputs are filters only when the report scored it (score(linear=True));
    otherwise it is cut along like any coupled layer (an SE block's excitation)."""
    names = graph.names
    return [(names[item.dep.target.module], list(item.idxs), list(item.root_idxs))
            for item in group if is_out_conv(graph.dg, item.dep)
            and (isinstance(item.dep.target.module, Conv) or names[item.dep.target.module] in layers)]


def _mirrored(group, mirrors: int) -> tuple[int, str | None]:
    """In how many mirrored copies the group is cut (a grouped conv's groups, tied copies,
    a split's equal parts: each loses the same positions), or why it cannot be."""
    g = max(_channel_groups(item.dep.target) for item in group)
    parts = _equal_parts(group)
    # G mirrored copies and G channel groups are one layout (ResNeSt's radix convs: copy r is group r)
    if mirrors > 1 and g not in (1, mirrors) or parts is None or parts > 1 and g not in (1, parts):
        return 0, _TIED if parts is not None else _UNEQUAL
    return max(g, mirrors, parts), None


_UNTRACED = ("not in the traced graph: autograd, which Torch-Pruning's trace follows, records no path from it to "
             "the output (it runs inside a custom autograd Function's forward, or under torch.inference_mode)")
_ONE_PER_GROUP = ("its channels are groups of one (a conv with a channel multiplier, groups=in_channels < "
                  "out_channels, or a GroupNorm with a group per channel reads them): a cut would empty a group")
_UNEQUAL = ("a split into equal parts (Res2Net's width) whose parts do not line up with the coupled channels: a "
            "cut could not keep them equal")


def _equal_parts(group) -> int | None:
    """P when the group passes a handled split into P equal parts that its root's channels
    fill one to one (a mirrored cut keeps them equal), 1 when it passes none, None when the
    parts do not line up with the root's channels."""
    width, parts = len(group[0].idxs), 1
    for item in group:
        split = getattr(item.dep.target, "afie_split", None)
        if split is None or not split.equal:
            continue
        sizes = split.sizes(item.dep.target.afie_owner)
        if sum(sizes) != width or list(item.idxs) != list(item.root_idxs) or parts not in (1, len(sizes)):
            return None
        parts = len(sizes)
    return parts


def _parts(group) -> list[frozenset[int]]:
    """The root channels of each layer (conv, linear, BN) that holds only some of them."""
    width, parts = len(group[0].idxs), set()
    for item in group:
        if isinstance(item.dep.target.module, (Conv, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            held = frozenset(item.root_idxs)
            if len(held) < width:
                parts.add(held)
    return sorted(parts, key=min)


# Nodes whose index mapping Torch-Pruning recomputes from other inputs' current widths
# (concat and split offsets): a group through one must be rebuilt for each cut. A
# reshape's mapping (a flatten's stride) depends on the group's own widths: one that maps
# one to one stays so.
_REMAPPED = (OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.UNBIND, OPTYPE.EXPAND, OPTYPE.SLICE)


def _fixed_mapping(group) -> bool:
    """Whether every member of the group sees the root's channels one to one, through no
    node whose mapping another unit's cut could change."""
    return all(item.dep.target.type not in _REMAPPED and list(item.idxs) == list(item.root_idxs) for item in group)


def _why_whole(graph: Graph, group, members: list, layers: set[str], prune_residual: bool) -> str | None:
    """Why a group must stay whole, or None when it can be cut: the first of the checks
    below that finds a reason."""
    nodes = [item.dep.target for item in group]
    opaque = next((graph.opaque[n] for n in nodes if n in graph.opaque), None)
    return (_reaches_output(graph.dg, group) or opaque or _residual(nodes, members, prune_residual)
            or _outside(members, layers) or _grouped_transposed(nodes) or _misaligned_groups(group)
            or _recurrent_hidden(graph.dg, group))


def _recurrent_hidden(dg: tp.DependencyGraph, group) -> str | None:
    if any(isinstance(item.dep.target.module, nn.RNNBase) and dg.is_out_channel_pruning_fn(item.dep.handler)
           for item in group):
        return "the hidden size of a recurrent layer (GRU, LSTM, RNN), which prune does not cut"
    return None


def _reaches_output(dg: tp.DependencyGraph, group) -> str | None:
    return "its channels reach the model's output" if any(_changes_output(dg, item) for item in group) else None


def _residual(nodes: list, members: list, prune_residual: bool) -> str | None:
    """A residual stream: two or more convs' outputs added (or subtracted) together (not one
    shared conv's two calls: CBAM's MLP on the average and on the max)."""
    added = any(n.type == OPTYPE.ELEMENTWISE and type(n.grad_fn).__name__.startswith(("Add", "Sub"))
                and len(set(n.inputs)) > 1 for n in nodes)
    return f"{RESIDUAL} (prune_residual=False)" if not prune_residual and len(members) > 1 and added else None


def _outside(members: list, layers: set[str]) -> str | None:
    return "coupled to a conv outside the report" if any(m[0] not in layers for m in members) else None


def _grouped_transposed(nodes: list) -> str | None:
    if any(isinstance(n.module, Conv) and n.module.transposed and n.module.groups > 1 for n in nodes):
        return "a grouped transposed conv (Torch-Pruning cuts its weight as if ungrouped)"
    return None


def _misaligned_groups(group) -> str | None:
    """Mirrored cuts index channels by their position in the root's group layout: a grouped
    conv's groups must line up with the root's channels (channel i of the conv at the
    position within its group of root channel r: one to one, or a mirrored copy as in
    ResNeSt, whose radix copy k is group k of its conv)."""
    g = max(_channel_groups(item.dep.target) for item in group)
    if g == 1:
        return None
    size = len(group[0].idxs) // g
    aligned = all(i % size == r % size for item in group if _channel_groups(item.dep.target) > 1
                  for i, r in zip(item.idxs, item.root_idxs))
    if len(group[0].idxs) % g or not aligned:
        return "a grouped conv whose groups do not align with the coupled channels"
    return None
