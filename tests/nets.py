"""Small test architectures: a VGG-style stack, a bottleneck ResNet, grouped/depthwise convs,
a concat, and a depthwise-separable block."""
import torch
from torch import nn

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
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def loader(n_batches=4, batch=8, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n_batches)]
