"""The architectures of the zoo. Each factory takes the data's shape and a width multiplier.

Shapes in comments are for a 1x28x28 input (Fashion-MNIST) at width 1.0, except for the two
RGB models (``resnet_cifar``, ``mobilenet_v2``), whose comments give 3x32x32 and 3x224x224.

The RGB models end in global average pooling, so they take any channel count and any H, W
(tested down to 8x8, where the last stages run at 1x1). Their parameters do not depend on the input size; their
layout does, once: inputs whose shorter side is at least :data:`LARGE_INPUT` pixels get the
ImageNet-style early downsampling (4x for the ResNet, 32x for MobileNetV2 in all), smaller
ones the CIFAR-style layout that keeps full resolution at the start (1x before the stages;
8x in all). Without that switch a 224x224 image would cost 49x a 32x32 one; with it, ~3x.
"""

from __future__ import annotations

from torch import nn

__all__ = ["LARGE_INPUT", "dw_cnn", "mlp", "mobilenet_v2", "resnet", "resnet_cifar", "scaled", "tiny_cnn"]

#: Inputs whose shorter side is at least this many pixels get the ImageNet-style strides.
LARGE_INPUT = 96


def scaled(channels: int, width: float, *, multiple: int = 4) -> int:
    """``channels * width`` rounded to a multiple of ``multiple`` (never below it)."""
    return max(multiple, round(channels * width / multiple) * multiple)


def _conv_bn(cin: int, cout: int, *, stride: int = 1, groups: int = 1, kernel: int = 3,
             act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(inplace=True),
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


def _resnet_stages(widths: list[int], blocks: tuple[int, ...]) -> nn.Sequential:
    """One stage of basic blocks per width; every stage after the first halves the resolution."""
    stages, cin = [], widths[0]
    for i, (cout, n) in enumerate(zip(widths, blocks)):
        layers = []
        for j in range(n):
            layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
            cin = cout
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages)


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
        self.stages = _resnet_stages(widths, blocks)  # (B, 128, 4, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


class ResNetCIFAR(nn.Module):
    """ResNet-20 (He et al. 2016, section 4.2): a 3x3 stem, then three stages of three basic
    blocks with 16, 32 and 64 channels (times ``width``) at strides 1, 2, 2, global average
    pooling and one linear layer. Where the channels change, the shortcut is a 1x1 conv + BN
    (the paper's option B, plain ops for ONNX). 0.27 M parameters; 82 MFLOPs on 3x32x32.

    Small inputs keep the CIFAR layout (stem at stride 1, stages at 32, 16 and 8 px). Inputs of
    ``LARGE_INPUT`` px and up get a stride-2 stem and a 3x3 max-pool, as ImageNet ResNets do, so
    the stages run at 56, 28 and 14 px on 224x224 — ~3x a 32x32 image's FLOPs, not 49x. The stem
    stays a 3x3 conv either way: the parameters are the same for every input size.
    """

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0, *, large_input: bool = False,
                 blocks: tuple[int, ...] = (3, 3, 3)) -> None:
        super().__init__()
        widths = [scaled(c, width, multiple=8) for c in (16, 32, 64)]
        stem: list[nn.Module] = [_conv_bn(in_channels, widths[0], stride=2 if large_input else 1)]  # (B, 16, 32, 32) | (B, 16, 112, 112)
        if large_input:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))  # (B, 16, 56, 56)
        self.stem = nn.Sequential(*stem)
        self.stages = _resnet_stages(widths, blocks)  # (B, 64, 8, 8) | (B, 64, 14, 14)
        self.pool = nn.AdaptiveAvgPool2d(1)  # (B, 64, 1, 1)
        self.fc = nn.Linear(widths[-1], num_classes)

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


def _divisible(channels: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of ``divisor``, never more than 10% below."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (ReLU6), 3x3 depthwise (ReLU6), then a linear 1x1
    projection; the input is added back when the shape is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [_conv_bn(cin, hidden, kernel=1, act=nn.ReLU6)] if expand != 1 else []
        layers += [
            _conv_bn(hidden, hidden, stride=stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck: no activation after the projection
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018): a 3x3 stem, 17 inverted residual blocks, a 1x1 conv
    to 1280 channels, global average pooling and one linear layer. 2.2 M parameters at width 1
    with 10 classes.

    ``width`` scales every layer, rounded to a multiple of 8, except the last conv, which only
    grows (1280 x max(1, width)) as in the paper. Inputs of ``LARGE_INPUT`` px and up use the
    paper's strides (32x in all: 7x7 before pooling on 224x224, 0.6 GFLOPs); smaller ones the
    common CIFAR variant with a stride-1 stem and a stride-1 second stage (8x in all: 4x4 on
    32x32, 0.18 GFLOPs).
    """

    # (expansion, channels, blocks, stride of the first block) per stage, from the paper's Table 2.
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0, *, large_input: bool = False) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        layers: list[nn.Module] = [_conv_bn(in_channels, cin, stride=2 if large_input else 1, act=nn.ReLU6)]  # (B, 32, 32, 32) | (B, 32, 112, 112)
        for i, (expand, channels, n, stride) in enumerate(self.STAGES):
            if i == 1 and not large_input:
                stride = 1  # CIFAR variant: the 24-channel stage stays at full resolution
            cout = _divisible(channels * width)
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, stride if j == 0 else 1, expand))
                cin = cout
        last = _divisible(1280 * max(1.0, width))
        layers.append(_conv_bn(cin, last, kernel=1, act=nn.ReLU6))  # (B, 1280, 4, 4) | (B, 1280, 7, 7)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # (B, 1280, 1, 1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        return self.fc(self.pool(self.features(x)).flatten(1))


def resnet(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    return ResNet(num_classes, input_shape[0], width)


def tiny_cnn(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    return TinyCNN(num_classes, input_shape, width)


def dw_cnn(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    return DepthwiseCNN(num_classes, input_shape[0], width)


def mlp(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    c, h, w = input_shape
    return MLP(num_classes, c * h * w, width)


def _large(input_shape: tuple[int, int, int]) -> bool:
    return min(input_shape[1:]) >= LARGE_INPUT


def resnet_cifar(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    return ResNetCIFAR(num_classes, input_shape[0], width, large_input=_large(input_shape))


def mobilenet_v2(num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Module:
    return MobileNetV2(num_classes, input_shape[0], width, large_input=_large(input_shape))
