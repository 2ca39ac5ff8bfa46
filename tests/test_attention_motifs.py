"""Attention blocks people add to CNNs, written as their papers' code writes them, and
convs shared between calls. Torch-Pruning maps every elementwise op channel k to channel
k, which is wrong where the channels collapse (CBAM's and triplet attention's mean and max
over channels, a one-channel map broadcast over them) or sit on another dim (ECA's Conv1d
runs along the channels); and its LayerNorm pruner cut GCNet's LayerNorm([C, 1, 1]) on
the wrong dim (a TypeError). Shared convs (CBAM's MLP, a detection head on every FPN
level) were refused. Each block must now be cut, and be the original on the kept channels."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import afie_fast as af


class _CBAM(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.ReLU(), nn.Conv2d(c // r, c, 1))  # shared: two calls
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        x = x * torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))
        s = torch.cat([x.mean(1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], 1)
        return x * torch.sigmoid(self.spatial(s))


class _ECA(nn.Module):
    """ECA-Net's code: a Conv1d along the channels of the pooled map."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, 1)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * y.sigmoid().expand_as(x)


class _Triplet(nn.Module):
    """Triplet attention, two branches: channel-pooled maps through one shared conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def gate(self, x):
        return x * torch.sigmoid(self.conv(torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)))

    def forward(self, x):
        return (self.gate(x) + self.gate(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)) / 2


class _GlobalContext(nn.Module):
    """GCNet's transform, LayerNorm over (C/4, 1, 1)."""

    def __init__(self, c):
        super().__init__()
        self.t = nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.LayerNorm([c // 4, 1, 1]), nn.ReLU(), nn.Conv2d(c // 4, c, 1))

    def forward(self, x):
        return x + self.t(F.adaptive_avg_pool2d(x, 1))


BLOCKS = {"cbam": _CBAM, "eca": _ECA, "triplet attention": _Triplet, "global context": _GlobalContext}


def _distinct_biases(model):
    for m in model.modules():  # which filters survived, and where
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.normal_(m.bias)


def _kept(old, new):
    return [int((old.bias == b).nonzero()) for b in new.bias]


def _pruned(model, x, **kw):
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # whole filters of a small model: "the closest … get to"
        return af.prune(model, report, example_inputs=x[:1], progress=False, **kw)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_attention_blocks_are_cut_and_are_the_original_on_the_kept_channels(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), BLOCKS[kind](32), nn.Conv2d(32, 16, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    _distinct_biases(model)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    pruned, stats = _pruned(model, x, target=0.4, unit="flops", prune_residual=True)
    assert set(stats.skipped) <= {"2.spatial", "2.conv"}, stats.skipped  # their one filter only
    kept = _kept(model[0], pruned[0])
    assert len(kept) < 32
    # The block, its parameters cut by hand: the input's channels to ``kept``, CBAM's and
    # GCNet's hidden channels to what prune kept of them.
    sizes = {32: kept}
    inner = [(n, m) for n, m in model[2].named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == 8]
    for name, conv in inner:
        sizes[8] = _kept(conv, pruned[2].get_submodule(name))
    reference = copy.deepcopy(model[2])
    for t in [*reference.parameters(), *reference.buffers()]:
        for dim, size in enumerate(t.shape):
            if size in sizes:
                t.data = t.data.index_select(dim, torch.tensor(sizes[size]))
    for m in reference.modules():
        if isinstance(m, nn.LayerNorm):
            m.normalized_shape = tuple(m.weight.shape)
    h = torch.relu(model[0](x))[:, kept]
    torch.testing.assert_close(pruned[2](h), reference(h))
    torch.testing.assert_close(pruned[3].weight, model[3].weight[_kept(model[3], pruned[3])][:, kept])
    assert pruned(x).shape == (4, 10)


class _Detector(nn.Module):
    """RetinaNet/FCOS-style: one head (and classifier) applied to every FPN level."""

    def __init__(self):
        super().__init__()
        self.c3, self.c4 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.p3, self.p4 = nn.Conv2d(16, 32, 1), nn.Conv2d(24, 32, 1)
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(32, 9, 3, padding=1)

    def forward(self, x):
        f3, f4 = torch.relu(self.c3(x)), torch.relu(self.c4(x))
        return [self.cls(self.head(self.p3(f3))), self.cls(self.head(self.p4(f4)))]


class _Recurrent(nn.Module):
    """One conv applied twice, to its own output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.stem(x))))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("net", [_Detector, _Recurrent])
def test_shared_convs_are_cut_alike_in_every_call(net):
    """Without channel reductions, removing filters is zeroing them (weights and bias: the
    channel is then 0, through ReLU too, and adds nothing to the next layer)."""
    torch.manual_seed(0)
    model = net().eval()
    _distinct_biases(model)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    assert report.layers["head.0" if net is _Detector else "shared"].n_samples > x.shape[0] * 64  # both calls seen
    pruned, stats = _pruned(model, x, target=0.5, prune_residual=True)
    zeroed = copy.deepcopy(model)
    for name, conv in zeroed.named_modules():
        if isinstance(conv, nn.Conv2d):
            new = pruned.get_submodule(name)
            gone = sorted(set(range(conv.out_channels)) - set(_kept(conv, new)))
            conv.weight.data[gone], conv.bias.data[gone] = 0, 0
    assert sum(b - a for b, a in stats.kept.values()) > 0
    if net is _Detector:  # the levels feed one head: the same channels go in both
        assert _kept(model.p3, pruned.p3) == _kept(model.p4, pruned.p4)
    for got, want in zip(*(m(x) if isinstance(m(x), list) else [m(x)] for m in (pruned, zeroed))):
        torch.testing.assert_close(got, want)


class _NonLocal(nn.Module):
    """A non-local block: its matmuls, which the cost model does not hold, grow with the
    width of its convs (theta, phi, g)."""

    def __init__(self, c):
        super().__init__()
        self.theta, self.phi, self.g, self.w = (nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c // 2, 1),
                                                nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.theta(x).view(n, -1, h * w).permute(0, 2, 1)
        g = self.g(x).view(n, -1, h * w).permute(0, 2, 1)
        y = torch.softmax(t @ self.phi(x).view(n, -1, h * w), -1) @ g
        return x + self.w(y.permute(0, 2, 1).reshape(n, -1, h, w))


@pytest.mark.parametrize("target", [0.3, 0.4])
def test_flops_targets_are_met_where_the_cost_model_misses_matmuls(target):
    """The re-aim after the first cut used to shift by the miss, which overshot back and
    forth when the measured reduction was 1.6× the predicted one: 31.9% for a 40% target,
    with a warning blaming whole filters."""
    import reference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), _NonLocal(32),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), _NonLocal(64), nn.Conv2d(64, 48, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10)).eval()
    x = torch.randn(8, 3, 16, 16)
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned, stats = af.prune(model, report, target=target, unit="flops", example_inputs=x[:1], progress=False)
    (before, _), (after, _) = reference.macs_and_params(model, x[:1]), reference.macs_and_params(pruned, x[:1])
    assert abs(stats.reached - target) <= 0.01 and abs((1 - after / before) - stats.reached) < 1e-9
