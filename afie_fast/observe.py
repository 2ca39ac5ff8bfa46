"""What a layer's output covariance is accumulated from: the output itself, or, for a layer
that maps a narrower input linearly at the same positions, that input.

A pointwise conv of any rank (1, 1×1 or 1×1×1; unpadded, ungrouped) or a Linear layer
computes y = W x + b position by position, so Σ_y = W Σ_x Wᵀ exactly: bias and mean drop out of a covariance. When x has
fewer channels than y, accumulating x costs (C_in / C_out)² of accumulating y, and the
mapping runs once after the pass. Bottleneck expansions (ResNet's 64 → 256 … 512 → 2048)
and inverted-residual expansions (MobileNet, EfficientNet: C → 6C) are such layers; on
ResNet-50 they held four fifths of the co-moment work.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _ext
from .layers import Conv, Layer, width


def through_input(layer: Layer) -> bool:
    """Whether ``layer``'s output covariance is computed from its input's (see the module doc)."""
    if isinstance(layer, Conv):
        base = _stock_conv(layer)
        pointwise = all(k == 1 for k in layer.kernel_size)
        unpadded = layer.padding in ("valid", "same") or all(p == 0 for p in layer.padding)
        linear = (base is not None and type(layer).forward is base.forward
                  and type(layer)._conv_forward is base._conv_forward
                  and pointwise and unpadded and layer.groups == 1)
        narrower = layer.in_channels < layer.out_channels
    else:
        linear = type(layer).forward is nn.Linear.forward
        narrower = layer.in_features < layer.out_features
    # A stock forward only (a subclass may transform its weight, as weight-standardised convs
    # do), and finite weights, so that a NaN weight still surfaces as NaN outputs.
    return linear and narrower and bool(torch.isfinite(layer.weight).all())


def _stock_conv(layer: Conv) -> type | None:
    """The torch class whose forward a (non-transposed) conv runs position by position:
    Conv1d, Conv2d or Conv3d. A transposed conv spreads each input position over a
    kernel-sized patch, so its outputs are no linear map of its inputs at the same positions."""
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(layer, cls):
            return cls
    return None


class Observed:
    """One layer's observations: which tensor its hook accumulates, and how that
    tensor's covariance becomes the covariance of the layer's output."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.via_input = through_input(layer)
        if not self.via_input:
            self.channels = width(layer)
        else:
            self.channels = layer.in_channels if isinstance(layer, Conv) else layer.in_features

    def tensor(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """What the forward hook accumulates: the output, or the input at the output's positions."""
        if not self.via_input:
            return output
        x = args[0] if args else kwargs["input"]
        if isinstance(self.layer, Conv) and x.dim() == 2 + len(self.layer.stride):
            # a 1×1 kernel at stride s reads exactly these, on every position axis
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.layer.stride))]
        return x

    def weight(self) -> torch.Tensor:
        """W (C_out, C_in), float64 on the CPU."""
        return self.layer.weight.detach().to("cpu", torch.float64).reshape(width(self.layer), -1)

    def output_covariance(self, cov: torch.Tensor) -> torch.Tensor:
        """The layer's output covariance (C_out, C_out) from the covariance of what it observed."""
        return _ext.congruence(cov, self.weight()) if self.via_input else cov


def output_moments(observed: dict[str, Observed], covs: dict[str, torch.Tensor],
                   single: bool = False) -> dict[str, tuple[torch.Tensor, int, torch.Tensor]]:
    """Per layer (S, zeros, variances), from the covariance of what it observed: its output
    covariance has the eigenvalues of the symmetric S and ``zeros`` zeros more, and the
    diagonal ``variances``. S is that covariance itself, or for a layer observed through
    its C_in-wide input the C_in × C_in matrix XᵀX (X = W L, Σ_x = L Lᵀ; all such layers in
    one core call, formed in float32 when ``single``): an eigensolve of C_in², not C_out²."""
    out = {name: (cov, 0, cov.diagonal().clone()) for name, cov in covs.items() if not observed[name].via_input}
    routed = [name for name in covs if observed[name].via_input]
    reduced = _ext.congruence_reduced([(covs[n], observed[n].weight()) for n in routed], single)
    for name, (s, variances) in zip(routed, reduced):
        out[name] = (s, width(observed[name].layer) - observed[name].channels, variances)
    return {name: out[name] for name in covs}
