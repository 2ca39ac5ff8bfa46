"""Which modules afie_fast scores and prunes: the filters of every nn.Conv2d (the paper)
and, when asked, the output width of every nn.Linear (the hidden layers of MLPs, as in
ConvNeXt blocks). The one place that enumerates them."""
from __future__ import annotations

from torch import nn

Layer = nn.Conv2d | nn.Linear


def width(module: nn.Module) -> int:
    """Filters of a conv (output channels), outputs of a linear layer."""
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def layers_of(model: nn.Module, linear: bool = True) -> dict[str, Layer]:
    """The model's Conv2d (and, with ``linear``, Linear) modules by qualified name, in order."""
    kinds = (nn.Conv2d, nn.Linear) if linear else (nn.Conv2d,)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
