"""A small EfficientNet-style student for the PTQ-vs-QAD benchmark: MBConv blocks with SiLU and squeeze-excitation.

EfficientNet is where post-training INT8 is known to break (NVIDIA's model zoo: EfficientNet-B0
−5.3 pt with PTQ, −1.2 pt with QAT): SiLU's and the SE gate's activations are hard to quantize per
tensor. A user brings such a model as a factory (``benchmarks/models/effnet_lite.py:make``); it is
not in kdedge's zoo.

    python benchmarks/qat.py --student benchmarks/models/effnet_lite.py:make --seed 0 --keep /tmp/eff0
"""
import torch
from torch import nn


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.reduce = nn.Conv2d(c, max(4, c // r), 1)
        self.expand = nn.Conv2d(max(4, c // r), c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, stride, expand=4):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.se = SE(mid)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class EffNetLite(nn.Module):
    def __init__(self, num_classes=10, in_ch=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16, 24, 2), MBConv(24, 24, 1), MBConv(24, 40, 1), MBConv(40, 40, 1))
        self.head = nn.Sequential(nn.Conv2d(40, 128, 1, bias=False), nn.BatchNorm2d(128), nn.SiLU())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def make(num_classes=10, input_shape=(1, 28, 28)):
    return EffNetLite(num_classes, input_shape[0])
