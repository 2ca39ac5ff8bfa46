"""Statistics over channel groups written in a model's own forward code: timm's EvoNorm-S0
(RegNetZ-evos, VoVNet-evos, EfficientNet-evos) and a GroupNorm written by hand reshape
the channels into G groups, reduce, and reshape back. Torch-Pruning cannot map those
reshapes, so their convs were left whole; they are cut as a GroupNorm's are: the same
positions in every group, each kept channel in the group it was in."""
import warnings

import pytest
import torch
from torch import nn

import afie_fast as af


def _group_std(x, groups, flatten):
    """timm's group_std (layers/evo_norm.py), written out."""
    n, c, h, w = x.shape
    g = x.reshape(n, groups, -1) if flatten else x.reshape(n, groups, c // groups, h, w)
    dims = (2,) if flatten else (2, 3, 4)
    std = g.float().var(dim=dims, unbiased=False, keepdim=True).add(1e-5).sqrt().to(x.dtype)
    return std.expand(g.shape).reshape(n, c, h, w)


class _EvoNormS0(nn.Module):
    def __init__(self, channels, groups=4, flatten=False):
        super().__init__()
        self.groups, self.flatten = groups, flatten
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(torch.randn(channels))
        self.v = nn.Parameter(1 + 0.1 * torch.randn(channels))

    def forward(self, x):
        x = x * (x * self.v.view(1, -1, 1, 1)).sigmoid() / _group_std(x, self.groups, self.flatten)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class _HandGroupNorm(nn.Module):
    """Mean and variance each from its own view of the input."""

    def __init__(self, channels, groups=4):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        mean = x.view(n, self.groups, -1).mean(-1, keepdim=True)
        var = x.view(n, self.groups, -1).var(-1, keepdim=True)
        return ((x.view(n, self.groups, -1) - mean) / (var + 1e-5).sqrt()).view(n, c, h, w)


NORMS = {"evonorm-s0": _EvoNormS0, "evonorm-s0 flattened": lambda c: _EvoNormS0(c, flatten=True),
         "groupnorm by hand": _HandGroupNorm}


def _net(norm):
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), norm(32), nn.Conv2d(32, 48, 3, padding=1), norm(48),
                         nn.Conv2d(48, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _pruned(model, x):
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # whole groups of filters: "the closest … get to 50%"
        return af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1], progress=False)


@pytest.mark.parametrize("kind", list(NORMS))
def test_group_statistics_are_cut_in_whole_aligned_groups(kind):
    torch.manual_seed(0)
    model = _net(NORMS[kind]).eval()
    for conv in (model[0], model[2]):  # distinct biases: which filters survived, and where
        nn.init.normal_(conv.bias)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    pruned, stats = _pruned(model, x)
    assert not stats.skipped and abs(stats.reached - 0.5) <= 0.05, stats.summary()
    h, h_new, kept = x, x, [0, 1, 2]
    for conv, norm in [(0, 1), (2, 3)]:
        inputs = kept
        old, new = model[conv], pruned[conv]
        assert new.out_channels < old.out_channels and new.out_channels % 4 == 0
        kept = [int((old.bias == b).nonzero()) for b in new.bias]  # original index of each kept filter
        size, old_size = new.out_channels // 4, old.out_channels // 4
        assert [i // old_size for i in kept] == [j // size for j in range(new.out_channels)]
        # the cut block is the original norm over the kept channels, each group's statistics
        # taken over its kept channels, with the norm's own parameters cut alike
        reference = NORMS[kind](len(kept)).eval()
        for name, p in model[norm].named_parameters():
            torch.testing.assert_close(getattr(pruned[norm], name), p[kept])
            getattr(reference, name).data.copy_(p[kept])
        h_new = pruned[norm](new(h_new))
        expected = reference(torch.nn.functional.conv2d(h, old.weight[kept][:, inputs], old.bias[kept], padding=1))
        torch.testing.assert_close(h_new, expected)
        h = expected
    assert pruned(x).shape == (4, 10)


class _Regrouped(nn.Module):
    """Reshapes into groups that do not come back in place: each must stay whole."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        n, c, h, w = x.shape
        g = x.view(n, 4, c // 4, h, w)  # 16 channels: 4 groups of 4, so a shuffle keeps the shape (n, 4, 4, …)
        if self.kind == "shuffle":
            g = g.transpose(1, 2).contiguous()
        elif self.kind == "flip":
            g = g.flip(2)
        else:  # statistics across the groups
            g = g - g.mean(1, keepdim=True)
        return g.reshape(n, c, h, w)


@pytest.mark.parametrize("kind", ["shuffle", "flip", "across groups"])
def test_reshapes_that_move_channels_between_groups_stay_whole(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), _Regrouped(kind), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.Conv2d(32, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    pruned, stats = af.prune(model, report, target=0.3, example_inputs=x[:1], progress=False)
    assert "0" in stats.skipped and "reshape" in stats.skipped["0"] or "permutation" in stats.skipped["0"]
    assert pruned[0].out_channels == 16 and pruned[3].out_channels < 32
    torch.testing.assert_close(pruned[1](pruned[0](x)), model[1](model[0](x)))
