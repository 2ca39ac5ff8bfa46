"""Small test architectures: a VGG-style stack, a bottleneck ResNet, grouped/depthwise convs,
a concat, a depthwise-separable block, the motifs of timm's and torchvision's CNNs, and
nets of every conv kind (1-D ResNet, TCN, 3-D ResNet, U-Net with transposed convs)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import afie_fast as af

from afie_fast.models import BasicBlock, Bottleneck, ResNet


def vgg_small():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 5))


def resnet_bottleneck():
    return ResNet(Bottleneck, [1, 2], num_classes=5, cifar=True, widths=(8, 12))


def resnet_basic():
    return ResNet(BasicBlock, [2, 1], num_classes=5, cifar=True, widths=(8, 16))


class GroupedNet(nn.Module):
    """Grouped and depthwise convs between ordinary ones."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 24, 3, padding=1, groups=3)
        self.bn2 = nn.BatchNorm2d(24)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.bn3 = nn.BatchNorm2d(24)
        self.pointwise = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        x = torch.relu(self.bn3(self.depthwise(x)))
        x = torch.relu(self.pointwise(x))
        return self.head(x.mean(dim=(2, 3)))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, then a conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch_a = nn.Conv2d(8, 6, 3, padding=1)
        self.branch_b = nn.Conv2d(8, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.fuse = nn.Conv2d(16, 12, 3, padding=1)
        self.head = nn.Linear(12 * 8 * 8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)))
        return self.head(torch.relu(self.fuse(x)).flatten(1))


class DepthwiseSeparable(nn.Module):
    """A MobileNet-style block: conv, depthwise conv, pointwise conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn_dw = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        return self.head(torch.relu(self.pw(x)).mean(dim=(2, 3)))


ARCHS = {"vgg": vgg_small, "resnet_bottleneck": resnet_bottleneck, "resnet_basic": resnet_basic,
         "grouped": GroupedNet, "concat": ConcatNet, "depthwise_separable": DepthwiseSeparable}


def randomised(model, seed=0):
    """A model with random BN statistics so activations are not trivially normalised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # 1-D, 2-D and 3-D alike
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def loader(n_batches=4, batch=8, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n_batches)]


# Motifs of the architectures users bring (torchvision, timm): each couples channels in a
# way a pruner must respect.

class ConvHead(nn.Module):
    """SqueezeNet's classifier: a 1×1 conv gives the class scores, then global pooling."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        return torch.relu(self.classifier(self.features(x))).mean(dim=(2, 3)).flatten(1)


class SegHead(nn.Module):
    """A segmentation-style net: its output is a per-pixel class map from a conv."""

    def __init__(self, classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Conv2d(12, classes, 1)

    def forward(self, x):
        return self.head(self.body(x))


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleNetBlock(nn.Module):
    """ShuffleNet v2: split the channels in two, transform one half, concat, shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                    nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([a, self.branch(b)], dim=1), 2)
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class GhostBlock(nn.Module):
    """GhostNet: a primary conv plus a cheap depthwise conv on its output, concatenated
    and sliced back to the block's width."""

    def __init__(self, out=10):
        super().__init__()
        self.out = out
        self.primary = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Conv2d(out, 12, 3, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        a = self.primary(x)
        x = torch.cat([a, self.cheap(a)], dim=1)[:, :self.out]
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class GhostSE(nn.Module):
    """timm's GhostNet bottleneck: ghost modules (a conv and a depthwise conv of its output,
    concatenated, no slice) whose output is gated by a squeeze-excite and added to the
    block's input. Concat channel k and k + C/2 come from one primary filter."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.primary = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.ReLU())
        self.reduce, self.expand = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.primary2 = nn.Sequential(nn.Conv2d(12, 4, 1), nn.BatchNorm2d(4))
        self.cheap2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = self.primary(x)
        y = torch.cat([a, self.cheap(a)], dim=1)
        y = y * torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        b = self.primary2(y)
        y = torch.cat([b, self.cheap2(b)], dim=1) + x
        return self.head(y.mean(dim=(2, 3)))


class MixConv(nn.Module):
    """MixNet: the channels are split into groups, each with its own kernel size."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.k3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.k5 = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.conv = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        a, b = torch.split(torch.relu(self.stem(x)), [8, 8], dim=1)
        x = torch.cat([self.k3(a), self.k5(b)], dim=1)
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class ResNeXtBlock(nn.Module):
    """ResNeXt/RegNet: a grouped 3×3 conv between two 1×1 convs, inside a residual block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        x = torch.relu(x + self.bn3(self.conv3(y)))
        return self.head(x.mean(dim=(2, 3)))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: a depthwise conv, then an MLP of nn.Linear on channels-last features,
    inside a residual block: the width worth pruning is the MLP's hidden layer."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(torch.nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head((x + y).mean(dim=(2, 3)))


class CatResidual(nn.Module):
    """A residual stream that a plain conv starts and two convs, concatenated, add to
    (MixNet's mixed projections): a cut of the stream takes channels of one part or the
    other, and no part may lose them all."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.proj = nn.Conv2d(12, 8, 1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 2, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.proj(torch.relu(self.stem(x)))
        y = torch.relu(self.inner(x))
        x = x + torch.cat([self.a(y), self.b(y)], 1)
        return self.head(x.mean(dim=(2, 3)))


class MixedSplit(nn.Module):
    """A mixed-kernel conv as timm's MixedConv2d writes it: the input split among convs of
    different kernel sizes by sizes kept in ``self.splits``, the outputs concatenated."""

    def __init__(self, cin, cout, kernels=(3, 5), depthwise=False):
        super().__init__()
        ins = [cin // len(kernels)] * len(kernels)
        outs = [cout // len(kernels)] * len(kernels)
        ins[0], outs[0] = ins[0] + cin - sum(ins), outs[0] + cout - sum(outs)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, padding=k // 2, groups=i if depthwise else 1)
                                   for i, o, k in zip(ins, outs, kernels))
        self.splits = ins

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, torch.split(x, self.splits, 1))], 1)


class MixNetBlock(nn.Module):
    """MixNet's inverted residual: a mixed pointwise expansion, a mixed depthwise conv (split
    sizes in attributes, registered with af.register_split in this file), a projection."""

    def __init__(self, c=12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand, self.bn1 = MixedSplit(c, 3 * c, kernels=(1, 1)), nn.BatchNorm2d(3 * c)
        self.dw, self.bn2 = MixedSplit(3 * c, 3 * c, kernels=(3, 5, 7), depthwise=True), nn.BatchNorm2d(3 * c)
        self.project = nn.Conv2d(3 * c, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.expand(x))))))
        return self.head((x + self.project(y)).mean(dim=(2, 3)))


class Res2Block(nn.Module):
    """Res2Net's hierarchical split: conv1's output split into `scale` parts of `width`
    channels; each part after the first adds the previous part's conv output before its
    own conv; the parts are concatenated back (the last one as it came)."""

    def __init__(self, c=16, width=4, scale=4):
        super().__init__()
        self.width, self.scale = width, scale
        self.conv1, self.bn1 = nn.Conv2d(c, width * scale, 1, bias=False), nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.conv3, self.bn3 = nn.Conv2d(width * scale, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        parts = torch.split(torch.relu(self.bn1(self.conv1(x))), self.width, 1)
        outs, sp = [], parts[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = parts[i] if i == 0 else sp + parts[i]
            sp = torch.relu(bn(conv(sp)))
            outs.append(sp)
        outs.append(parts[-1])
        return torch.relu(self.bn3(self.conv3(torch.cat(outs, 1))) + x)


class Res2Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = Res2Block()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class SelectiveKernel(nn.Module):
    """SKNet's selective kernel: the input split equally among paths of different
    dilation, their outputs stacked, weighted by an attention whose output is reshaped to
    (paths, channels) and softmaxed over the paths, and summed over the paths."""

    def __init__(self, cin=16, cout=12, paths=2, attn=8):
        super().__init__()
        self.paths = nn.ModuleList(nn.Sequential(nn.Conv2d(cin // paths, cout, 3, padding=d, dilation=d, bias=False),
                                                 nn.BatchNorm2d(cout), nn.ReLU()) for d in range(1, paths + 1))
        self.fc_reduce, self.bn = nn.Conv2d(cout, attn, 1, bias=False), nn.BatchNorm2d(attn)
        self.fc_select = nn.Conv2d(attn, cout * paths, 1, bias=False)
        self.in_channels = cin

    def forward(self, x):
        parts = torch.split(x, self.in_channels // len(self.paths), 1)
        x = torch.stack([path(part) for path, part in zip(self.paths, parts)], dim=1)
        a = torch.relu(self.bn(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        a = self.fc_select(a)
        a = torch.softmax(a.view(a.shape[0], len(self.paths), a.shape[1] // len(self.paths), 1, 1), dim=1)
        return (x * a).sum(1)


class SKNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.sk = SelectiveKernel()
        self.conv = nn.Conv2d(12, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.conv(torch.relu(self.sk(torch.relu(self.stem(x)))))
        return self.head(torch.relu(y).mean(dim=(2, 3)))


class RadixSoftmax(nn.Module):
    """ResNeSt's softmax over the radix: the attention's (cardinality, radix, C) layout
    viewed, transposed to (radix, cardinality, C), softmaxed over the radix, flattened."""

    def __init__(self, radix, cardinality):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality

    def forward(self, x):
        batch = x.size(0)
        x = x.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
        return torch.softmax(x, dim=1).reshape(batch, -1)


class SplitAttn(nn.Module):
    """ResNeSt's split attention (timm's SplitAttn): one grouped conv makes radix copies of
    the channels, reshaped to (radix, C) and summed for a squeeze-excite whose attention
    goes through the radix softmax, then weights the copies, which are summed."""

    def __init__(self, cin=16, cout=12, radix=2, cardinality=1, attn=8):
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(cin, cout * radix, 3, padding=1, groups=cardinality * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(cout * radix)
        self.fc1 = nn.Conv2d(cout, attn, 1, groups=cardinality)
        self.bn1 = nn.BatchNorm2d(attn)
        self.fc2 = nn.Conv2d(attn, cout * radix, 1, groups=cardinality)
        self.rsoftmax = RadixSoftmax(radix, cardinality)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv(x)))
        b, rc, h, w = x.shape
        x = x.reshape((b, self.radix, rc // self.radix, h, w))
        gap = torch.relu(self.bn1(self.fc1(x.sum(dim=1).mean((2, 3), keepdim=True))))
        attn = self.rsoftmax(self.fc2(gap)).view(b, -1, 1, 1)
        return (x * attn.reshape((b, self.radix, rc // self.radix, 1, 1))).sum(dim=1).contiguous()


class ResNeSt(nn.Module):
    def __init__(self, cardinality=1):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.splat = SplitAttn(cardinality=cardinality)
        self.conv = nn.Conv2d(12, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.conv(torch.relu(self.splat(torch.relu(self.stem(x)))))
        return self.head(torch.relu(y).mean(dim=(2, 3)))


class RepBranches(nn.Module):
    """RepVGG / MobileOne: a 3×3 conv + BN, a 1×1 conv + BN and (where the width stays) an
    identity BN, summed; every branch's output is one residual stream. The first block
    changes width and has no identity, so its input (the stem) is not in the stream."""

    def __init__(self, c=12, blocks=2):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

        def block(cin, identity):
            branches = {"k3": nn.Sequential(nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)),
                        "k1": nn.Sequential(nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c))}
            return nn.ModuleDict({**branches, "id": nn.BatchNorm2d(c)} if identity else branches)
        self.blocks = nn.ModuleList([block(8, False)] + [block(c, True) for _ in range(blocks)])
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = torch.relu(sum(branch(x) for branch in b.values()))
        return self.head(x.mean(dim=(2, 3)))


class Conv2dSame(nn.Conv2d):
    """TensorFlow's "same" padding as timm's Conv2dSame writes it: padding worked out from
    the input size in forward (asymmetric when the stride needs it), then a conv without."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TFSame(nn.Module):
    """EfficientNet(V2) ported from TensorFlow: same-padded strided convs, an inverted
    residual with a same-padded depthwise conv, a squeeze-excite gate and a projection."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(Conv2dSame(3, c, 3, stride=2, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c), nn.SiLU())
        self.dw = nn.Sequential(Conv2dSame(4 * c, 4 * c, 3, groups=4 * c, bias=False), nn.BatchNorm2d(4 * c), nn.SiLU())
        self.reduce, self.excite = nn.Conv2d(4 * c, 4, 1), nn.Conv2d(4, 4 * c, 1)
        self.project = nn.Sequential(nn.Conv2d(4 * c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.down = nn.Sequential(Conv2dSame(c, 2 * c, 3, stride=2, bias=False), nn.BatchNorm2d(2 * c), nn.SiLU())
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        y = y * torch.sigmoid(self.excite(F.silu(self.reduce(y.mean((2, 3), keepdim=True)))))
        x = self.down(x + self.project(y))
        return self.head(x.mean(dim=(2, 3)))


class SplitTransposeBlock(nn.Module):
    """EdgeNeXt's split-transpose block without its transposed attention: the input chunked
    into equal parts, Res2Net's hierarchy of depthwise convs over them (``x.chunk``: the
    sizes follow the width, only ``width`` is kept), then a channels-last MLP, residual.
    (No LayerNorm: the zero-channel exactness test cannot hold through a norm over channels.)"""

    def __init__(self, dim=16, scales=4):
        super().__init__()
        self.width = dim // scales
        self.convs = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, padding=1, groups=self.width)
                                   for _ in range(scales - 1))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        parts = x.chunk(len(self.convs) + 1, dim=1)
        outs, sp = [], parts[0]
        for i, conv in enumerate(self.convs):
            sp = conv(sp if i == 0 else sp + parts[i])
            outs.append(sp)
        y = torch.cat(outs + [parts[-1]], 1).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + y


class SplitTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)  # narrow: half the FLOPs need the block's stream
        self.down = nn.Conv2d(4, 16, 2, stride=2)
        self.block = SplitTransposeBlock()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.block(self.down(torch.relu(self.stem(x)))).mean(dim=(2, 3)))


class TokenMixer(nn.Module):
    """A conv stage whose block runs on tokens, as EdgeNeXt and hybrid CNN-transformers
    write it: (N, C, H, W) → (N, C, H·W) → (N, H·W, C), an MLP of Linears on the last dim,
    (N, H·W, C) → (N, H, W, C) → (N, C, H, W), added to its input: the reshapes move the
    channels between dims but keep each whole."""

    def __init__(self, dim=12):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.conv = nn.Conv2d(dim, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        b, c, h, w = x.shape
        t = x.reshape(b, c, h * w).permute(0, 2, 1)
        t = self.fc2(F.gelu(self.fc1(t)))
        x = x + t.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class TransposedAttention(nn.Module):
    """EdgeNeXt's cross-covariance attention (timm's CrossCovarianceAttn): q, k and v from
    one Linear, read as (3, heads, C / heads); each head attends between its channels over
    the tokens; the heads' output is reshaped to the input's width C, read from x.shape."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        return self.proj((attn.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(b, n, c))


class SelfAttention(nn.Module):
    """ViT's multi-head self-attention as hybrid CNNs run it on a stage's tokens: the heads'
    output is reshaped to (B, N, C), C read from x.shape. Taught to prune by the user,
    below (README "Attention heads")."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


class AttentionStage(nn.Module):
    """A conv stage whose tokens pass both attentions, each added to the stream: the heads
    must narrow with the stream (afie_fast.register_heads), in equal numbers. Then two
    convs concatenated: a concat downstream of a 3-D parameter (the temperature), which
    Torch-Pruning alone leaves unmapped (its guard for ViT's class token)."""

    def __init__(self, dim=32):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.xca, self.sa = TransposedAttention(dim, 4), SelfAttention(dim, 2)
        self.left, self.right = nn.Conv2d(dim, 8, 1), nn.Conv2d(dim, 8, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.xca(t)
        t = t + self.sa(t)
        x = t.transpose(1, 2).reshape(b, c, h, w)
        x = torch.relu(torch.cat([self.left(x), self.right(x)], 1))
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class StdConv(nn.Conv2d):
    """Weight standardisation as NF-Nets write it (timm's ScaledStdConv2d): the weight
    reshaped to (1, out, -1), normalised per filter by batch_norm, scaled by a per-filter
    gain parameter of its own, reshaped back, on every forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=self.gain.view(-1), training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NormFree(nn.Module):
    """An NF-Net-style residual block on weight-standardised convs, no BatchNorm."""

    def __init__(self, c=12):
        super().__init__()
        self.stem = StdConv(3, c, 3, padding=1)
        self.conv1, self.conv2 = StdConv(c, 2 * c, 1), StdConv(2 * c, c, 3, padding=1)
        self.conv = StdConv(c, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        x = x + 0.2 * self.conv2(F.gelu(self.conv1(x)))
        return self.head(F.gelu(self.conv(x)).mean(dim=(2, 3)))


class HiddenTie(nn.Module):
    """A width tied in forward code, out of the graph's sight (EdgeNeXt's transposed
    attention reshapes its heads' output to the input width read from ``x.shape``): cutting
    the stem's filters alone makes the reshape fail, so the stem must stay whole."""

    def __init__(self, c=12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.inner = nn.Conv2d(c, c, 1)
        self.mid = nn.Conv2d(c, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        b, c, h, w = x.shape
        y = self.inner(x).flatten(1).reshape(b, c, h, w)  # the inner width is taken to be the input's
        return self.head(torch.relu(self.conv(torch.relu(self.mid(y)))).mean(dim=(2, 3)))


# How a user teaches prune() their split modules (README "Channel splits").
af.register_split(MixedSplit, sizes=lambda m: [conv.in_channels for conv in m.convs],
                  update=lambda m, sizes: setattr(m, "splits", sizes))
af.register_split(Res2Block, sizes=lambda m: [m.convs[0].in_channels] * m.scale,
                  update=lambda m, sizes: setattr(m, "width", sizes[0]), equal=True)
af.register_split(SelectiveKernel, sizes=lambda m: [p[0].in_channels for p in m.paths],
                  update=lambda m, sizes: setattr(m, "in_channels", sum(sizes)), equal=True)
af.register_split(SplitTransposeBlock, sizes=lambda m: [m.convs[0].in_channels] * (len(m.convs) + 1),
                  update=lambda m, sizes: setattr(m, "width", sizes[0]), equal=True)
# ... and their attention (README "Attention heads").
af.register_heads(TransposedAttention, heads=lambda m: m.num_heads, qkv=lambda m: m.qkv, proj=lambda m: m.proj)
af.register_heads(SelfAttention, heads=lambda m: m.heads, qkv=lambda m: m.qkv, proj=lambda m: m.out)


MOTIFS = {"conv_head": ConvHead, "seg_head": SegHead, "shuffle": ShuffleNetBlock, "ghost": GhostBlock,
          "ghost_se": GhostSE, "mixconv": MixConv, "resnext": ResNeXtBlock, "cat_residual": CatResidual,
          "mixnet": MixNetBlock, "res2net": Res2Net, "sknet": SKNet, "resnest": ResNeSt,
          "rep_branches": RepBranches, "tf_same": TFSame, "split_transpose": SplitTranspose, "tokens": TokenMixer,
          "norm_free": NormFree, "attention": AttentionStage}


class Expansions(nn.Module):
    """1×1 expansions at stride 1 and 2 (odd map: the stride's last row and column count),
    a reduction, and a ConvNeXt-style Linear expansion on channels-last features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.expand = nn.Conv2d(6, 24, 1)
        self.down = nn.Conv2d(6, 20, 1, stride=2, bias=False)
        self.reduce = nn.Conv2d(24, 6, 1)
        self.fc1 = nn.Linear(6, 30)
        self.head = nn.Linear(30 + 20, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.reduce(torch.relu(self.expand(x))) + x
        d = self.down(y)
        h = self.fc1(y.permute(0, 2, 3, 1))
        return self.head(torch.cat([h.mean(dim=(1, 2)), d.mean(dim=(2, 3))], dim=1))


# Every convolution kind (Conv1d, Conv3d, ConvTranspose2d): the motifs of audio and time-
# series CNNs, video CNNs and segmentation decoders.

class Bottleneck1d(nn.Module):
    """A 1-D bottleneck: reduce, a wide grouped kernel, then a widening pointwise conv
    (observed through its input), added to a (downsampled) shortcut."""

    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.reduce, self.bn1 = nn.Conv1d(cin, mid, 1, bias=False), nn.BatchNorm1d(mid)
        self.conv = nn.Conv1d(mid, mid, 7, stride=stride, padding=3, groups=4, bias=False)  # ResNeXt-style
        self.bn2 = nn.BatchNorm1d(mid)
        self.expand, self.bn3 = nn.Conv1d(mid, cout, 1, bias=False), nn.BatchNorm1d(cout)
        self.down = (nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm1d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.reduce(x)))
        y = torch.relu(self.bn2(self.conv(y)))
        return torch.relu(self.bn3(self.expand(y)) + self.down(x))


class ResNet1d(nn.Module):
    """An ECG-style 1-D ResNet on 2-lead signals: (N, 2, L) → 4 classes."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(2, 16, 15, stride=2, padding=7, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.blocks = nn.Sequential(Bottleneck1d(16, 8, 32), Bottleneck1d(32, 12, 48, stride=2), Bottleneck1d(48, 12, 48))
        self.head = nn.Linear(48, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=2))


class TemporalBlock(nn.Module):
    """A TCN block: two dilated causal convs (padded, then the look-ahead chomped off; the
    second may be depthwise) and a residual, through a pointwise conv where the width changes."""

    def __init__(self, cin, cout, dilation, k=3, depthwise=False):
        super().__init__()
        self.chomp = (k - 1) * dilation
        self.conv1 = nn.Conv1d(cin, cout, k, dilation=dilation, padding=self.chomp)
        self.conv2 = nn.Conv1d(cout, cout, k, dilation=dilation, padding=self.chomp, groups=cout if depthwise else 1)
        self.down = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.conv1(x)[:, :, :-self.chomp])
        y = torch.relu(self.conv2(y)[:, :, :-self.chomp])
        return torch.relu(y + self.down(x))


class TCN(nn.Module):
    """A dilated temporal convolutional network predicting from the last time step."""

    def __init__(self, classes=4):
        super().__init__()
        self.blocks = nn.Sequential(TemporalBlock(3, 16, 1), TemporalBlock(16, 16, 2, depthwise=True),
                                    TemporalBlock(16, 24, 4))
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        return self.head(self.blocks(x)[:, :, -1])


class BasicBlock3d(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.down = (nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet3d(nn.Module):
    """A small video ResNet in the shape of torchvision's r3d_18: (N, 3, T, H, W) clips."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 16, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                                  nn.BatchNorm3d(16), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock3d(16, 16), BasicBlock3d(16, 32, stride=2, groups=4))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3, 4)))


def double_conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """A two-level U-Net: transposed convs upsample, skips are concatenated, a 1×1 conv
    gives the per-pixel class map (never pruned: it is the output)."""

    def __init__(self, classes=3):
        super().__init__()
        self.enc1, self.enc2, self.bottom = double_conv(3, 8), double_conv(8, 16), double_conv(16, 32)
        self.up2, self.dec2 = nn.ConvTranspose2d(32, 16, 2, stride=2), double_conv(32, 16)
        self.up1, self.dec1 = nn.ConvTranspose2d(16, 8, 2, stride=2), double_conv(16, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        b = self.bottom(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


# name → (builder, one input batch's shape)
CONV_KINDS = {"resnet1d": (ResNet1d, (4, 2, 256)), "tcn": (TCN, (4, 3, 64)),
              "resnet3d": (ResNet3d, (2, 3, 4, 16, 16)), "unet": (UNet, (2, 3, 16, 16))}
