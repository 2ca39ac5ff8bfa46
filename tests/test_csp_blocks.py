"""YOLO-style CSP blocks: a conv's output chunked in two, one half through a chain of
bottlenecks, and every part concatenated back (YOLOv8's C2f, YOLOv7/v9's ELAN). The concat
takes both halves of one chunk at once, which Torch-Pruning's graph holds as one edge and
mapped to nonsense widths; and the chunk's conv, reached first from a bottleneck added to
one half, held only that half. Each block must now be cut, its halves alike, and be the
original with the removed filters zeroed (SiLU(0) = 0: a zeroed filter adds nothing)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import afie_fast as af


def _conv(c1, c2, k=1):
    return nn.Sequential(nn.Conv2d(c1, c2, k, padding=k // 2), nn.SiLU())


class _Bottleneck(nn.Module):
    def __init__(self, c, shortcut):
        super().__init__()
        self.cv1, self.cv2, self.add = _conv(c, c, 3), _conv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C2f(nn.Module):
    """As ultralytics writes it (``order`` reverses the halves: not a slice of cv1)."""

    def __init__(self, c=32, n=1, shortcut=True, order=1):
        super().__init__()
        self.c, self.order = c // 2, order
        self.cv1, self.cv2 = _conv(c, 2 * self.c), _conv((2 + n) * self.c, c)
        self.m = nn.ModuleList(_Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))[::self.order]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class _ELAN(nn.Module):
    """YOLOv9's RepNCSPELAN4, its branches plain convs."""

    def __init__(self, c=32, c4=16):
        super().__init__()
        self.cv1, self.cv2, self.cv3 = _conv(c, c), _conv(c // 2, c4, 3), _conv(c4, c4, 3)
        self.cv4 = _conv(c + 2 * c4, c)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in [self.cv2, self.cv3])
        return self.cv4(torch.cat(y, 1))


def _kept(old, new):
    return [int((old.bias == b).nonzero()) for b in new.bias]


def _cut(block, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(_conv(3, 32, 3), block, nn.Conv2d(32, 10, 1)).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.bias)  # distinct: which filters survived, and where
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # whole filters of a small model: "the closest … get to"
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1], progress=False, **kw)
    zeroed = copy.deepcopy(model)
    for name, conv in zeroed.named_modules():
        if isinstance(conv, nn.Conv2d):
            gone = sorted(set(range(conv.out_channels)) - set(_kept(conv, pruned.get_submodule(name))))
            conv.weight.data[gone], conv.bias.data[gone] = 0, 0
    torch.testing.assert_close(pruned(x), zeroed(x))
    return model, pruned, stats


@pytest.mark.parametrize("block, kw", [(lambda: _C2f(n=2, shortcut=True), {"prune_residual": True}),
                                       (lambda: _C2f(n=1, shortcut=False), {}), (_ELAN, {})],
                         ids=["c2f-shortcut", "c2f-head", "elan"])
def test_a_chunk_concatenated_whole_is_cut_in_equal_halves(block, kw):
    model, pruned, stats = _cut(block(), **kw)
    assert set(stats.skipped) == {"2"}, stats.skipped  # the output conv only
    kept = _kept(model[1].cv1[0], pruned[1].cv1[0])
    half = len(kept) // 2
    assert 0 < half < 16 and [k + 16 for k in kept[:half]] == kept[half:]  # the same filters of both halves
    assert pruned(torch.randn(1, 3, 16, 16)).shape == (1, 10, 16, 16)


def test_halves_concatenated_out_of_order_stay_whole_and_say_why():
    model, pruned, stats = _cut(_C2f(shortcut=False, order=-1))
    assert pruned[1].cv1[0].out_channels == 32 and "split" in stats.skipped["1.cv1.0"]
    assert stats.reached > 0.4  # the rest is cut


class _ReturnsFeatures(nn.Module):
    """A YOLOv8 Detect head's eval output: its predictions and, beside them, the neck's
    features it read (also the input of its convs)."""

    def __init__(self):
        super().__init__()
        self.stem, self.neck = _conv(3, 16, 3), _conv(16, 24, 3)
        self.head = nn.Sequential(_conv(24, 24, 3), nn.Conv2d(24, 10, 1))

    def forward(self, x):
        feats = self.neck(self.stem(x))
        return self.head(feats), {"feats": [feats]}


def test_features_returned_beside_the_predictions_keep_their_width():
    """Torch-Pruning marks an output only where its op has no module and was not met
    before, so these features were cut, and only the run check (halving the cuts on fresh
    copies) kept them whole, under another reason."""
    torch.manual_seed(0)
    model, x = _ReturnsFeatures().eval(), torch.randn(4, 3, 16, 16)
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=0.3, example_inputs=x[:1], progress=False)
    assert stats.skipped["neck.0"] == "its channels reach the model's output"
    assert pruned.neck[0].out_channels == 24 and pruned.stem[0].out_channels < 16
    assert pruned(x)[1]["feats"][0].shape == model(x)[1]["feats"][0].shape


class _Conv(nn.Module):
    """Ultralytics' Conv: the layer is ``.conv``."""

    def __init__(self, c1, c2):
        super().__init__()
        self.conv, self.act = nn.Conv2d(c1, c2, 1), nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x))


class C2f(_C2f):
    """Ultralytics' C2f by its registered name: export swaps in forward_split, which splits
    by ``self.c``; the built-in handler keeps ``c`` in step with the cut."""

    __module__ = "ultralytics.nn.modules.block"

    def __init__(self, c=32, n=1, shortcut=False):
        super().__init__(c, n, shortcut)
        self.cv1 = _Conv(c, 2 * self.c)

    def forward_split(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def test_ultralytics_c2f_keeps_its_split_width_in_step():
    model, pruned, stats = _cut(C2f(n=1, shortcut=False))
    block, h = pruned[1], torch.randn(2, pruned[0][0].out_channels, 8, 8)
    assert 2 * block.c == block.cv1.conv.out_channels < 32
    torch.testing.assert_close(block.forward_split(h), block(h))
