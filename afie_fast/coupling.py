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
from torch.overrides import TorchFunctionMode

from .inputs import Inputs, call, map_tensors
from .layers import Conv, width
from .handlers import heads_handler, split_handler

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


class _ShapeRecorder(TorchFunctionMode):
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
            return args[0].clone()  # a copy autograd records: see _autograd_kept
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


def _map_shuffle(node, recorder: "_ShapeRecorder") -> bool:
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


def _size_concats_after(dg: tp.DependencyGraph, shuffles: list, recorder: "_ShapeRecorder") -> None:
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


def _channel_chain(start, recorder: _ShapeRecorder) -> tuple[list, bool] | None:
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
    _group_statistics): what Torch-Pruning read as a flatten (a reshape) or a repeat (a
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
    LayerNorm's channels on the dim that holds them (_find_norm_dims)."""
    real = tp.dependency.Dependency.__call__

    def call(dep, idxs):
        layer = dep.target.module
        if hasattr(dep.target, "afie_norm_dim"):  # a LayerNorm whose channels are not its last dim
            _cut_layer_norm(layer, dep.target.afie_norm_dim, tp._helpers.to_plain_idxs(idxs))
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
            for module in list(dg.module2node):
                if not isinstance(module, (Conv, nn.Linear)):
                    continue
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


def build_graph(model: nn.Module, example_inputs: Inputs) -> Graph:
    """Trace ``model`` (in eval mode, BN statistics untouched) into a dependency graph."""
    recorder, failed = _ShapeRecorder(), []

    def forward(m, x):
        with recorder, recorder.watching_modules(), _autograd_kept():
            return call(m, x)

    # Torch-Pruning traces through autograd: a caller's no_grad or inference_mode would hide
    # every edge (and an inference tensor cannot enter autograd: hence the clone).
    with _index_mapping(failed), torch.inference_mode(False), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=map_tensors(example_inputs, torch.clone),
                                                   forward_fn=forward, verbose=False)
    _drop_parameter_paths(dg)
    _map_channel_concats(dg, recorder)
    chained = _layout_chains(dg, recorder)
    chained.update(_group_statistics(dg, recorder))
    opaque: dict[Any, str] = {n: f"a channel {_KIND.get(n.type, 'coupling')} Torch-Pruning cannot map"
                              for n in failed if n not in chained}
    opaque.update((n, why) for n, why in chained.items() if why)
    handled, grouped = [], []
    shuffles = [node for node in dg.module2node.values() if _map_shuffle(node, recorder)]
    _size_concats_after(dg, shuffles, recorder)
    for node in dg.module2node.values():
        if node in shuffles:
            continue
        kind = _channel_change(node, recorder, dg)
        if kind == "groups":
            grouped.append(node)
        elif kind == "split":
            handled.append(node)
        elif kind == "identity":
            opaque.pop(node, None)
            chained.setdefault(node, "")
        elif kind is not None:
            opaque.setdefault(node, kind)
    with _index_mapping(failed):
        for node in chained:
            if hasattr(node, "afie_identity"):
                _map_identity(node)
        for node in handled:
            _map_split(dg, node)
        for node in grouped:
            _map_groups(dg, node)
    _end_collapsed_channels(dg, recorder)
    _find_norm_dims(dg, recorder)
    # A group reaches an opaque node (and is refused for it) but goes no further: through
    # it the channel mapping is unknown, and an identity mapping would join whole networks
    # into one huge group.
    for node in opaque:
        node.enable_index_mapping = False
        for dep in node.dependencies:
            dep.index_mapping = [None, _cut]
        for neighbour in [*node.inputs, *node.outputs]:
            for dep in neighbour.dependencies:
                if dep.target is node:
                    dep.index_mapping = [None, None]
    return Graph(dg, opaque)


@contextlib.contextmanager
def _autograd_kept():
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


def _map_channel_concats(dg: tp.DependencyGraph, recorder: _ShapeRecorder) -> None:
    """Torch-Pruning turns off the index mapping of every concat and split downstream of a
    3-D parameter (its guard for ViT's class token, concatenated along the tokens), which
    EdgeNeXt's attention temperature (heads, 1, 1) also is: concats and splits of channels
    on dim 1, as a conv makes them, are mapped again."""
    memo: dict = {}
    for node in dg.module2node.values():
        if node.type in (OPTYPE.CONCAT, OPTYPE.SPLIT) and not node.enable_index_mapping:
            dims = {_channel_dim(n, recorder, memo) for n in node.inputs} - {None}  # a split's part: not known
            node.enable_index_mapping = dims == {1}


def _end_collapsed_channels(dg: tp.DependencyGraph, recorder: _ShapeRecorder) -> None:
    """Where a tensor's channels are not what Torch-Pruning maps one to one onto the next
    node's, no channel index crosses (the channels' dim is found from the trace, see
    _channel_dim). Three cases, each of which coupled a conv's channels with something
    else: a reduction over the channel dim (CBAM's and triplet attention's mean and max
    over channels); a layer that reads them on another dim (ECA's Conv1d, whose length
    runs over a conv's channels); and an elementwise op's input of one channel broadcast
    over many, or with its channels on another dim (CBAM's spatial attention map, ECA's
    gate made by that Conv1d). A cut changes their values (a mean over fewer channels, a
    shorter Conv1d), never their shapes."""
    memo: dict = {}
    dim = lambda n: _channel_dim(n, recorder, memo)
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
                dep.index_mapping[1] = _cut


def _find_norm_dims(dg: tp.DependencyGraph, recorder: _ShapeRecorder) -> None:
    """For each nn.LayerNorm, which dim of its normalized_shape holds the channels, as
    ``node.afie_norm_dim`` (None: none does) where it is not the last: GCNet's
    LayerNorm([C, 1, 1]) on (N, C, 1, 1). Torch-Pruning cuts the last, and crashed there.
    Subclasses (timm's LayerNorm2d, which permutes inside) keep Torch-Pruning's own cut."""
    memo: dict = {}
    for node in dg.module2node.values():
        if type(node.module) is not nn.LayerNorm or len(node.inputs) != 1 or node.grad_fn not in recorder.io:
            continue
        d, rank = _channel_dim(node.inputs[0], recorder, memo), len(recorder.io[node.grad_fn][0])
        if d is not None and d - rank != -1:
            node.afie_norm_dim = d - rank if d - rank >= -len(node.module.normalized_shape) else None


def _cut_layer_norm(layer: nn.LayerNorm, dim: int | None, idxs: list[int]) -> None:
    """Cut a LayerNorm's channels ``idxs`` on its normalized dim ``dim`` (see _find_norm_dims)."""
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


def _layout_chains(dg: tp.DependencyGraph, recorder: _ShapeRecorder) -> dict[Any, str]:
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


# Ops a region of group statistics may hold (by grad_fn): elementwise maths, reductions
# (held to the trailing dims by the shapes), and views that keep the memory order. Anything
# else (a transpose, a flip, a gather) could move channels between the reshapes.
_GROUP_STATISTICS_OPS = ("Var", "Std", "Mean", "Sum", "Amax", "Amin", "Norm", "LinalgVectorNorm", "Add", "Sub",
                         "Mul", "Div", "Sqrt", "Rsqrt", "Pow", "Square", "Exp", "Log", "Abs", "Clamp", "Neg",
                         "Reciprocal", "Sigmoid", "ToCopy", "Clone", "Expand", "View", "UnsafeView", "Reshape",
                         "Squeeze", "Unsqueeze", "Alias")


def _group_statistics(dg: tp.DependencyGraph, recorder: _ShapeRecorder) -> dict[Any, str]:
    """The nodes of regions that compute statistics over G channel groups in the model's
    own code: a reshape (N, C, …) → (N, G, …), ops that keep the G axis (reductions over
    the trailing dims, elementwise maths, expands), and reshapes back to (N, C, …). timm's
    EvoNorm-S0 (its group std), a GroupNorm written by hand (x.view(N, G, -1), normalised,
    viewed back). Every channel comes back where it was, so the region maps them one to
    one; its G groups of C/G consecutive channels are kept as a GroupNorm's are
    (_channel_groups: a cut mirrored across them)."""
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


def _into_grouped(node, recorder: _ShapeRecorder) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
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


def _grouped_region(start, recorder: _ShapeRecorder) -> tuple[set, int] | None:
    """The nodes from the reshape into groups ``start`` to the reshapes back (see
    _group_statistics) and G; None when ``start`` begins no such region. The region is
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


def _only_unit_dims(shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> bool:
    """Whether a reshape only adds or drops size-1 dims after the first two, or views a
    vector of one entry per channel (a parameter: EvoNorm's v, (C,) → (1, C, 1, 1)) as channels."""
    if len(shape_in) == 1 and len(shape_out) >= 2:
        return shape_out[1] == shape_in[0] == math.prod(shape_out)
    return (len(shape_in) >= 2 and shape_in[:2] == shape_out[:2] and shape_in != shape_out
            and [d for d in shape_in[2:] if d != 1] == [d for d in shape_out[2:] if d != 1])


def _channel_change(node, recorder: _ShapeRecorder, dg: tp.DependencyGraph) -> str | None:
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


# Layers whose output carries the channels on dim 1 (a Linear's are on the last dim).
_CHANNELS_FIRST = (OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.GN, OPTYPE.IN, OPTYPE.PRELU)
# Nodes whose output carries the channels where their input does.
_CHANNELS_KEPT = (OPTYPE.ELEMENTWISE, OPTYPE.LN, OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.SLICE)


def _moves_channels_whole(node, recorder: _ShapeRecorder) -> bool:
    """Whether a reshape keeps every channel whole wherever its input holds them: tokens
    (N, H·W, C) → (N, H, W, C), channels last, as EdgeNeXt writes them. Found by replaying
    the reshape on each element's channel number, the channels' dim read back to the layer
    that made them (a conv's: dim 1; a Linear's: the last) through layout and elementwise ops."""
    return node.grad_fn in recorder.layout and _channel_dim(node, recorder, {}) is not None


def _channel_dim(node, recorder: _ShapeRecorder, memo: dict, depth: int = 0) -> int | None:
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
        dim = _replayed_channel_dim(node, recorder, _channel_dim(node.inputs[0], recorder, memo, depth + 1),
                                    recorder.io[node.grad_fn][0])
    elif node.type in _CHANNELS_KEPT:  # as an input of the same rank has them
        dims = [_channel_dim(n, recorder, memo, depth + 1) for n in node.inputs
                if len(recorder.io.get(n.grad_fn, (None, ()))[1] or ()) == len(shape)]
        dim = next((d for d in dims if d is not None), None)
    else:
        dim = None
    memo[node] = dim
    return dim


def _replayed_channel_dim(node, recorder: _ShapeRecorder, dim_in: int | None, shape_in: tuple[int, ...]) -> int | None:
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


def _cut(idxs: list) -> list:
    return []


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
    return not node.outputs and not absorbed


def _channel_groups(node) -> int:
    """G of a grouped conv (not depthwise, whose channels pair one to one), of a GroupNorm
    or of group statistics in a model's own code (_group_statistics: their channels must
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
            or _outside(members, layers) or _grouped_transposed(nodes) or _misaligned_groups(group))


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
