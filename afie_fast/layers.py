"""Which modules afie_fast scores and prunes: the filters of every convolution — Conv1d,
Conv2d (the paper), Conv3d and the transposed convs, grouped or depthwise — and, when
asked, the output width of every nn.Linear (the hidden layers of MLPs, as in ConvNeXt
blocks). The one place that enumerates them and knows their weight layouts."""
from __future__ import annotations

import torch
from torch import nn

Conv = nn.modules.conv._ConvNd  # Conv1d/2d/3d and ConvTranspose1d/2d/3d
Layer = Conv | nn.Linear
KINDS = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")


def eager(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (it shares its parameters): hooks on the
    compiled model make Dynamo break its graph at each one and recompile. A TorchScript
    module runs no Python hooks and has no layers to cut: a TypeError saying so."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"a TorchScript module ({type(model).__name__}) runs no forward hooks and its layers cannot be "
                        "cut: pass the nn.Module it was scripted or traced from")
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def width(module: nn.Module) -> int:
    """Filters of a conv (output channels), outputs of a linear layer."""
    return module.out_channels if isinstance(module, Conv) else module.out_features


def kind(module: nn.Module) -> str:
    """The torch.nn class a layer is (a subclass, such as timm's Conv2dSame, is its base's kind)."""
    for cls in type(module).__mro__:
        if cls.__name__ in KINDS and cls.__module__.startswith("torch.nn"):
            return cls.__name__
    raise TypeError(f"{type(module).__name__} is not a conv or linear layer")


def layers_of(model: nn.Module, linear: bool = True) -> dict[str, Layer]:
    """The model's convs (and, with ``linear``, Linear) modules by qualified name, in order."""
    kinds = (Conv, nn.Linear) if linear else (Conv,)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def filter_weights(layer: Layer) -> torch.Tensor:
    """The weight with one row per filter: (c_out, in/groups, *kernel) for every conv kind,
    (out, in) for a Linear. A transposed conv stores (in, out/groups, *kernel); its
    filter j is column j of its group's block."""
    w = layer.weight.detach()
    if isinstance(layer, Conv) and layer.transposed:
        # (in, out/g, *k) -> (g, in/g, out/g, *k) -> (g, out/g, in/g, *k) -> (out, in/g, *k)
        w = w.unflatten(0, (layer.groups, -1)).transpose(1, 2).flatten(0, 1)
    return w
