"""Modules that split their channels in ``forward`` by sizes kept in their attributes.

Torch-Pruning's graph sees such a split (``torch.split(x, self.splits, 1)``) but not where
its sizes come from: a cut through it would leave the attribute stale and the next forward
would split at the old sizes. A handler, registered for a module type, says

- ``sizes(module)``: the sizes the split must use now, read from the module's own layers
  (which every cut narrows consistently), e.g. each branch conv's ``in_channels``;
- ``update(module, sizes)``: writes them where ``forward`` reads them;
- ``equal``: the split is by one size (``torch.split(x, self.width, 1)``), so every part
  must keep the same width: its channels are cut at the same positions in every part.

With a handler, the channels that pass the split are mapped part by part and cut like any
others (afie_fast.coupling); without one, the module stays whole and ``prune`` says so.
Register one for your own module with :func:`register_split`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn

Sizes = Callable[[nn.Module], list[int]]
Update = Callable[[nn.Module, list[int]], None]


@dataclass(frozen=True)
class SplitHandler:
    """How one module type's channel split stays consistent when its channels are cut."""

    sizes: Sizes
    update: Update
    equal: bool = False


# Keyed by "module.QualName": built-ins need not import the libraries that define them.
_HANDLERS: dict[str, SplitHandler] = {}


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
    if not (isinstance(module_type, str) or (isinstance(module_type, type) and issubclass(module_type, nn.Module))):
        raise TypeError(f"module_type must be an nn.Module subclass or its qualified name, got {module_type!r}")
    if not callable(sizes) or not callable(update):
        raise TypeError("sizes and update must be callables: sizes(module) -> list[int], update(module, sizes)")
    _HANDLERS[module_type if isinstance(module_type, str) else _key(module_type)] = SplitHandler(sizes, update, equal)
    _handler_for_type.cache_clear()


def handler_for(module: nn.Module) -> SplitHandler | None:
    """The handler registered for the module's type or one of its bases, if any."""
    return _handler_for_type(type(module))


@functools.lru_cache(maxsize=None)
def _handler_for_type(cls: type) -> SplitHandler | None:
    # Cached: the trace asks for every module call; register_split clears it.
    return next((_HANDLERS[_key(c)] for c in cls.__mro__ if _key(c) in _HANDLERS), None)


def refresh(model: nn.Module) -> None:
    """Bring every handled module's split sizes up to date with its (cut) layers."""
    for module in model.modules():
        handler = handler_for(module)
        if handler is not None:
            handler.update(module, handler.sizes(module))


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
