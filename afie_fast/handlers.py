"""Modules whose ``forward`` fixes channel widths that no graph sees, and how each stays
consistent when its channels are cut. Two kinds, each registered for a module type:

**Splits** (:func:`register_split`): a module splits its channels in ``forward`` by sizes
kept in its attributes. Torch-Pruning's graph sees the split (``torch.split(x,
self.splits, 1)``) but not where its sizes come from: a cut through it would leave the
attribute stale and the next forward would split at the old sizes. A split handler says

- ``sizes(module)``: the sizes the split must use now, read from the module's own layers
  (which every cut narrows consistently), e.g. each branch conv's ``in_channels``;
- ``update(module, sizes)``: writes them where ``forward`` reads them;
- ``equal``: the split is by one size (``torch.split(x, self.width, 1)``), so every part
  must keep the same width: its channels are cut at the same positions in every part.

With one, the channels that pass the split are mapped part by part and cut like any
others (afie_fast.coupling); without one, the module stays whole and ``prune`` says so.

**Heads** (:func:`register_heads`): an attention whose fused ``qkv`` projection is read
as (parts, heads, head width) and whose heads' output is reshaped back to its *input's*
width, read from ``x.shape`` (EdgeNeXt's cross-covariance attention). The input is a
residual stream the planner cuts; the heads must then narrow by the same count, which
no graph sees. A heads handler names the heads and the two projections: the stream's
kept width is held to a multiple of the heads, and after the cut each head keeps the
same number of positions (those whose q, k, v rows and ``proj`` column weigh most),
cut from ``qkv``'s outputs and ``proj``'s inputs alike.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

Sizes = Callable[[nn.Module], list[int]]
Update = Callable[[nn.Module, list[int]], None]
Layer = Callable[[nn.Module], nn.Linear]


@dataclass(frozen=True)
class SplitHandler:
    """How one module type's channel split stays consistent when its channels are cut."""

    sizes: Sizes
    update: Update
    equal: bool = False


@dataclass(frozen=True)
class HeadsHandler:
    """How one attention type's heads follow its input width (see the module's docstring)."""

    heads: Callable[[nn.Module], int]
    qkv: Layer
    proj: Layer

    def follow(self, module: nn.Module) -> None:
        """Narrow the heads to the input width ``qkv`` reads now: every head keeps the same
        positions in each of q, k and v (a valid cut whether the attention contracts over
        the head's channels, as ViT's, or its tokens, as XCA's) and in ``proj``'s inputs."""
        h, qkv, proj = self.heads(module), self.qkv(module), self.proj(module)
        inner, width = proj.in_features, qkv.in_features
        if inner == width or width % h or width > inner:
            return  # nothing to do, or no equal heads fit: the forward then fails and prune refuses that cut
        parts, d = qkv.out_features // inner, inner // h
        with torch.no_grad():
            weight = (qkv.weight.view(parts, h, d, -1).pow(2).sum((0, 3))
                      + proj.weight.view(-1, h, d).pow(2).sum(0))
        # lowest weight first, ties by position (a stable sort)
        drop = [head * d + i for head in range(h)
                for i in sorted(torch.sort(weight[head], stable=True).indices[:d - width // h].tolist())]
        tp.prune_linear_out_channels(qkv, [p * inner + i for p in range(parts) for i in drop])
        tp.prune_linear_in_channels(proj, drop)


# Keyed by "module.QualName": built-ins need not import the libraries that define them.
_HANDLERS: dict[str, SplitHandler | HeadsHandler] = {}


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_split(module_type: type | str, sizes: Sizes, update: Update, equal: bool = False) -> None:
    """Teach ``prune`` a module that splits its input channels in ``forward``.

    Args:
        module_type: the module class (or its ``"package.module.ClassName"``); subclasses
            are covered too.
        sizes: ``sizes(module) -> list[int]``, the channel sizes of the split's parts as they
            must be now, read from the module's layers (e.g. ``[c.in_channels for c in
            module.branches]``); called after cuts, when those layers are narrower.
        update: ``update(module, sizes)`` writes them into the attributes ``forward`` reads.
        equal: the split is by one size (all parts equal): cut every part alike.
    """
    if not callable(sizes) or not callable(update):
        raise TypeError("sizes and update must be callables: sizes(module) -> list[int], update(module, sizes)")
    _register(module_type, SplitHandler(sizes, update, equal))


def register_heads(module_type: type | str, heads: Callable[[nn.Module], int], qkv: Layer, proj: Layer) -> None:
    """Teach ``prune`` an attention whose heads' output is reshaped to its input's width.

    Args:
        module_type: the module class (or its ``"package.module.ClassName"``); subclasses
            are covered too.
        heads: ``heads(module) -> int``, its number of heads (e.g. ``m.num_heads``).
        qkv: ``qkv(module) -> nn.Linear``, the fused projection whose outputs ``forward``
            reads as (parts, heads, head width): ``.reshape(B, N, 3, heads, -1)``.
        proj: ``proj(module) -> nn.Linear``, the projection of the heads' joined output.

    The stream the module reads is then cut to a multiple of ``heads``, and its heads
    narrowed to match (see this module's docstring).
    """
    if not all(callable(f) for f in (heads, qkv, proj)):
        raise TypeError("heads, qkv and proj must be callables of the module: heads(m) -> int, qkv(m) / proj(m) -> "
                        "nn.Linear")
    _register(module_type, HeadsHandler(heads, qkv, proj))


def _register(module_type: type | str, handler: SplitHandler | HeadsHandler) -> None:
    if not (isinstance(module_type, str) or (isinstance(module_type, type) and issubclass(module_type, nn.Module))):
        raise TypeError(f"module_type must be an nn.Module subclass or its qualified name, got {module_type!r}")
    _HANDLERS[module_type if isinstance(module_type, str) else _key(module_type)] = handler
    _handler_for_type.cache_clear()


def handler_for(module: nn.Module) -> SplitHandler | HeadsHandler | None:
    """The handler registered for the module's type or one of its bases, if any."""
    return _handler_for_type(type(module))


@functools.lru_cache(maxsize=None)
def _handler_for_type(cls: type) -> SplitHandler | HeadsHandler | None:
    # Cached: the trace asks for every module call; registering clears it.
    return next((_HANDLERS[_key(c)] for c in cls.__mro__ if _key(c) in _HANDLERS), None)


def split_handler(module: nn.Module) -> SplitHandler | None:
    handler = handler_for(module)
    return handler if isinstance(handler, SplitHandler) else None


def heads_handler(module: nn.Module) -> HeadsHandler | None:
    handler = handler_for(module)
    return handler if isinstance(handler, HeadsHandler) else None


def refresh(model: nn.Module) -> None:
    """Bring every handled module up to date with its (cut) layers: split sizes, heads."""
    for module in model.modules():
        handler = handler_for(module)
        if isinstance(handler, SplitHandler):
            handler.update(module, handler.sizes(module))
        elif handler is not None:
            handler.follow(module)


# ---- built-in handlers ---------------------------------------------------------------------

def _mixed_conv_update(m: nn.Module, sizes: list[int]) -> None:
    m.splits = sizes
    m.in_channels = sum(sizes)
    m.out_channels = sum(conv.out_channels for conv in m.values())


# timm's MixedConv2d (MixNet, MixConv): the input split among convs of different kernel sizes.
register_split("timm.layers.mixed_conv2d.MixedConv2d", lambda m: [conv.in_channels for conv in m.values()],
               _mixed_conv_update)


def _res2net_update(m: nn.Module, sizes: list[int]) -> None:
    m.width = sizes[0]


# timm's Res2Net bottleneck: conv1's output split into `scale` parts of `width` channels.
register_split("timm.models.res2net.Bottle2neck", lambda m: [m.convs[0].in_channels] * m.scale, _res2net_update,
               equal=True)


def _selective_kernel_update(m: nn.Module, sizes: list[int]) -> None:
    m.in_channels = sum(sizes) if m.split_input else sizes[0]
    m.out_channels = m.paths[0].conv.out_channels


# timm's SelectiveKernel (SKNet): the input split equally among the kernel paths.
register_split("timm.layers.selective_kernel.SelectiveKernel", lambda m: [p.conv.in_channels for p in m.paths],
               _selective_kernel_update, equal=True)


# timm's EdgeNeXt SplitTransposeBlock: the input chunked into len(convs) + 1 parts, Res2Net's
# hierarchy over them (``x.chunk`` splits whatever width it gets; only `width` is kept).
# Equal parts only: a width the parts do not divide (88 in 3) leaves the split unhandled.
register_split("timm.models.edgenext.SplitTransposeBlock", lambda m: [m.convs[0].in_channels] * (len(m.convs) + 1),
               _res2net_update, equal=True)


def _cross_stage_update(m: nn.Module, sizes: list[int]) -> None:
    m.expand_chs = sum(sizes)


def _half_update(m: nn.Module, sizes: list[int]) -> None:
    m.c = sizes[0]


# timm's CSPNet stages (CSPDarkNet, CS3DarkNet): conv_exp's output split in two halves by
# ``self.expand_chs // 2``, one through the blocks, concatenated back.
for _name in ("CrossStage", "CrossStage3"):
    register_split(f"timm.models.cspnet.{_name}", lambda m: [m.conv_exp.conv.out_channels // 2] * 2,
                   _cross_stage_update, equal=True)
# Ultralytics' C2f (and C3k2) and RepNCSPELAN4: cv1's output chunked in two halves, or
# split by ``self.c`` in the forward_split that export swaps in; ``c`` must follow the cut.
# (PSA and C2PSA split by ``c`` too, but their attention reshapes the half to the width it
# had, so they stay whole.)
for _name in ("C2f", "RepNCSPELAN4"):
    register_split(f"ultralytics.nn.modules.block.{_name}", lambda m: [m.cv1.conv.out_channels // 2] * 2,
                   _half_update, equal=True)


# timm's EdgeNeXt CrossCovarianceAttn: q, k, v read as (3, heads, C / heads), the heads'
# output reshaped to the input's C.
register_heads("timm.models.edgenext.CrossCovarianceAttn", lambda m: m.num_heads, lambda m: m.qkv, lambda m: m.proj)
