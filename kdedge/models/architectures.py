"""The architectures of the zoo. Each factory takes the data's shape and a width multiplier.

Shapes in comments are for a 1x28x28 input (Fashion-MNIST) at width 1.0.
"""

from __future__ import annotations

from torch import nn

__all__ = ["resnet", "tiny_cnn", "dw_cnn", "mlp", "scaled"]


def scaled(channels: int, width: float, *, multiple: int = 4) -> int:
    """``channels * width`` rounded to a multiple of ``multiple`` (never below it)."""
    return max(multiple, int(round(channels * width / multiple)) * multiple)


def _conv_bn(cin: int, cout: int, *, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (projected when needed) identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet for small images: a 3x3 stem at full resolution, max-pooling, then three stages
    of basic blocks (3, 2, 2) with 32, 64 and 128 channels and global average pooling.

    On 28x28 inputs the stages run at 14x14, 7x7 and 4x4: 0.71 M parameters and 52 MFLOPs per
    image — 23x the default student's FLOPs, and cheap enough to train on a laptop CPU.
    """

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0, blocks: tuple[int, ...] = (3, 2, 2)) -> None:
        super().__init__()
        widths = [scaled(c, width, multiple=8) for c in (32, 64, 128)]
        self.stem = nn.Sequential(_conv_bn(in_channels, widths[0]), nn.MaxPool2d(2))  # (B, 32, 14, 14)
        stages, cin = [], widths[0]
        for i, (cout, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)  # (B, 128, 4, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


class TinyCNN(nn.Module):
    """Two conv-BN-ReLU-pool stages (16, 32 channels) and a 64-unit hidden layer.

    ~106 k parameters, ~2.3 MFLOPs per 28x28 image: the default student. Most parameters sit
    in the first linear layer, which is cheap in FLOPs; the convolutions are kept narrow
    because on a CPU their cost dominates.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> None:
        super().__init__()
        c, h, w = input_shape
        c1, c2, hidden = scaled(16, width), scaled(32, width), scaled(64, width)
        self.features = nn.Sequential(
            _conv_bn(c, c1),     # (B, 16, 28, 28)
            nn.MaxPool2d(2),     # (B, 16, 14, 14)
            _conv_bn(c1, c2),    # (B, 32, 14, 14)
            nn.MaxPool2d(2),     # (B, 32, 7, 7)
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * (h // 4) * (w // 4), hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class DepthwiseCNN(nn.Module):
    """A MobileNet-style student: depthwise-separable convs after a full 3x3 stem.

    ~48 k parameters and ~6 MFLOPs per 28x28 image.
    """

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4 = (scaled(c, width) for c in (32, 64, 128, 256))

        def separable(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(_conv_bn(cin, cin, groups=cin), _conv_bn(cin, cout, kernel=1))

        self.features = nn.Sequential(
            _conv_bn(in_channels, c1),  # (B, 32, 28, 28)
            nn.MaxPool2d(2),            # (B, 32, 14, 14)
            separable(c1, c2),          # (B, 64, 14, 14)
            nn.MaxPool2d(2),            # (B, 64, 7, 7)
            separable(c2, c3),          # (B, 128, 7, 7)
            separable(c3, c4),          # (B, 256, 7, 7)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c4, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    """The classic tutorial MLP: flatten, 784-256-10 with one ReLU."""

    def __init__(self, num_classes: int, in_features: int, width: float = 1.0) -> None:
        super().__init__()
        hidden = scaled(256, width)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def resnet(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    return ResNet(num_classes, input_shape[0], width)


def tiny_cnn(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    return TinyCNN(num_classes, input_shape, width)


def dw_cnn(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    return DepthwiseCNN(num_classes, input_shape[0], width)


def mlp(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    c, h, w = input_shape
    return MLP(num_classes, c * h * w, width)
