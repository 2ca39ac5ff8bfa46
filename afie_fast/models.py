"""Plain-torch model builders (no torchvision): the paper's settings and a digits CNN."""
from __future__ import annotations

from typing import Callable

from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def digits_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """A small CNN for scikit-learn's 8×8 digits: three conv blocks and a linear head."""
    return nn.Sequential(
        *_conv_bn(1, width), *_conv_bn(width, width), nn.MaxPool2d(2),        # 8 → 4
        *_conv_bn(width, 2 * width), *_conv_bn(2 * width, 2 * width), nn.MaxPool2d(2),  # 4 → 2
        nn.Flatten(), nn.Linear(2 * width * 4, num_classes))


def alexnet_mnist(num_classes: int = 10) -> nn.Module:
    """AlexNet adapted to 28×28 grey images (the paper's AlexNet/MNIST setting)."""
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),      # 14
        nn.Conv2d(64, 192, 3, 1, 1), nn.BatchNorm2d(192), nn.ReLU(inplace=True), nn.MaxPool2d(2),   # 7
        nn.Conv2d(192, 384, 3, 1, 1), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 3
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(256 * 9, 1024), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True), nn.Linear(1024, num_classes))


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_cifar(num_classes: int = 10) -> nn.Module:
    """VGG-16 with BatchNorm for 32×32 inputs (the usual CIFAR variant)."""
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_bn(cin, int(v))
            cin = int(v)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet with a CIFAR stem (3×3 conv) or an ImageNet stem (7×7 conv + max-pool)."""

    def __init__(self, block: type, depths: list[int], num_classes: int = 10, cifar: bool = True,
                 widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        w0 = widths[0]
        if cifar:
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        cin, stages = w0, []
        for i, (planes, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.n_stages = len(stages)
        for i, stage in enumerate(stages):  # torchvision's names: layer1, layer2, …
            setattr(self, f"layer{i + 1}", stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.pool(x).flatten(1))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-18 (basic blocks) for 32×32 inputs."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, cifar=True)


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (bottlenecks) for 224×224 inputs, torchvision's layer layout."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, cifar=False)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "alexnet_mnist": alexnet_mnist,
    "vgg16_cifar": vgg16_cifar,
    "resnet18_cifar": resnet18_cifar,
    "resnet50": resnet50,
}

# Input shape (C, H, W) each zoo model expects.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits_cnn": (1, 8, 8),
    "alexnet_mnist": (1, 28, 28),
    "vgg16_cifar": (3, 32, 32),
    "resnet18_cifar": (3, 32, 32),
    "resnet50": (3, 224, 224),
}
