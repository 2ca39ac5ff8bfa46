"""Which spatial positions of a conv's output feed its covariance: all of them, or a
seeded lattice (every s-th row and column from a per-batch offset), taken as a strided
view that the core reads in place (no copy). Outputs with one or three position axes
are seen as planes first (accumulator.planar): a signal as one row, a volume's depth
and height as one axis of rows."""
from __future__ import annotations

import math
import random

import torch

# "auto": up to this many positions per image in any layer (a 32×32 lattice). Neighbouring
# positions are strongly correlated: on ResNet-50, MobileNet v2, EfficientNet-B0 and
# DenseNet-121 it moved AFIE by ≤ 1.6e-4 relative and never the allocation, where 256
# changed the allocation (benchmarks/positions.py).
AUTO_POSITIONS = 1024


def resolve(positions: str | int) -> int | None:
    """The per-image budget for ``score(positions=...)``: None for "all"."""
    if positions == "all":
        return None
    if positions == "auto":
        return AUTO_POSITIONS
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ValueError(f'positions must be "all", "auto" or a positive int, got {positions!r}')
    return positions


def stride_for(h: int, w: int, budget: int | None) -> int:
    """The lattice step s (the same in both directions) that leaves ⌈h/s⌉·⌈w/s⌉ ≤ budget
    positions per image; 1 when the map already fits."""
    if budget is None or h * w <= budget:
        return 1
    s = max(1, math.isqrt(h * w // budget))
    while math.ceil(h / s) * math.ceil(w / s) > budget:
        s += 1
    return s


class Lattice:
    """Per layer and batch, the positions (oy + s·i, ox + s·j): over s² batches a layer's
    offsets run through a seeded permutation of all s² of them, so long runs see every
    position equally often."""

    def __init__(self, budget: int | None, seed: int = 0) -> None:
        self.budget, self.seed = budget, seed
        self._offsets: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def view(self, y: torch.Tensor, layer: int, batch: int) -> torch.Tensor:
        """y (N, C, H, W), or a strided view of it holding the layer's positions for this batch."""
        h, w = y.shape[2], y.shape[3]
        s = stride_for(h, w, self.budget)
        if s == 1:
            return y
        # An axis shorter than s (the unit axis of a 1-D signal) has only that many offsets.
        key = (layer, s, min(s, h), min(s, w))
        if key not in self._offsets:
            grid = [(i, j) for i in range(min(s, h)) for j in range(min(s, w))]
            random.Random(self.seed * 1_000_003 + layer * 7919 + s).shuffle(grid)
            self._offsets[key] = grid
        grid = self._offsets[key]
        oy, ox = grid[batch % len(grid)]
        return y[:, :, oy::s, ox::s]
