"""Architectures written as strings: the students ``kdedge search`` finds, rebuildable by name.

A searched student is a plain feed-forward CNN — a sequence of blocks, then a head — and its
name spells it out, so a checkpoint or a bundle records it the same way it records ``tiny_cnn``:

    net:c16k3s2-d32k3s2-fc        conv 16ch 3x3 stride 2, then depthwise-separable 32ch 3x3
                                  stride 2, then flatten + linear (28x28 -> 14x14 -> 7x7 -> 10)

Blocks (``-``-separated, in order):

* ``c{C}k{K}s{S}``: a dense conv (K x K, stride S, "same" padding) + BatchNorm + ReLU to C channels.
* ``d{C}k{K}s{S}``: depthwise-separable: a K x K depthwise conv (stride S) + BN + ReLU, then a
  1x1 conv to C channels + BN + ReLU (MobileNetV1's block).
* ``r{C}k{K}s{S}``: residual (ResNet's basic block): K x K conv (stride S) + BN + ReLU, K x K conv
  + BN, added to the input (through a 1x1 conv + BN when the shape changes), then ReLU.
* ``i{C}k{K}s{S}e{E}``: inverted residual (MobileNetV2's block): 1x1 expansion to E times the input
  channels + BN + ReLU6 (none for E = 1), K x K depthwise (stride S) + BN + ReLU6, linear 1x1
  projection to C + BN; the input is added back when the shape is unchanged.
* a ``q`` after any block (``i24k3s1e4q``) adds squeeze-excitation on the block's widest features
  (global average pool, 1x1 conv to a quarter of the channels + ReLU, 1x1 conv back + sigmoid, a
  channel-wise scale), before the residual sum;
* a trailing ``p`` (``c16k3s1p``, ``r16k3s1qp``) adds a 2x2 max-pool after the block.

The head is the last token: ``gap`` (global average pooling + linear), ``fc`` (flatten +
linear) or ``fc{H}`` (flatten + H hidden units + ReLU + linear). A width (``net:...@0.5``)
scales every channel count and hidden width, rounded to a multiple of 4.

Parsing a name never runs code: it is a grammar, checked token by token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kdedge.config import BLOCK_KINDS
from kdedge.errors import ModelError
from kdedge.models.architectures import _conv_bn, scaled

__all__ = ["KINDS", "PREFIX", "Block", "Genome", "GenomeNet", "InvertedResidual", "Residual", "SqueezeExcite", "is_genome", "parse_genome"]

PREFIX = "net:"
_BLOCK = re.compile(r"^(?P<kind>[cdri])(?P<ch>[1-9]\d{0,3})k(?P<k>\d)s(?P<s>\d)(?:e(?P<e>[1-9]))?(?P<se>q?)(?P<pool>p?)$")  # no leading zeros: one name per network
#: Block kinds: dense, depthwise-separable, residual, inverted residual.
KINDS = BLOCK_KINDS
_HEAD = re.compile(r"^(?P<kind>gap|fc)(?P<hidden>[1-9]\d{0,3})?$")


@dataclass(frozen=True)
class Block:
    """One block: ``kind`` (:data:`KINDS`), output channels, kernel, stride, max-pool after; ``expand``: an inverted
    residual's expansion ratio; ``se``: squeeze-excitation."""

    kind: str
    channels: int
    kernel: int
    stride: int
    pool: bool = False
    expand: int = 0
    se: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.kind == "i") != (1 <= self.expand <= 8):
            raise ModelError(f"block kind {self.kind!r} with expansion {self.expand}: kinds are {', '.join(KINDS)}, and an inverted "
                             "residual (i), and only it, takes an expansion 1..8")

    def __str__(self) -> str:
        expand = f"e{self.expand}" if self.kind == "i" else ""
        return f"{self.kind}{self.channels}k{self.kernel}s{self.stride}{expand}{'q' if self.se else ''}{'p' if self.pool else ''}"

    def out_size(self, size: int) -> int:
        size = (size + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1  # conv with "same" padding
        return size // 2 if self.pool else size


@dataclass(frozen=True)
class Genome:
    """A searchable architecture: blocks, then a head (``gap``, ``fc`` or ``fc{H}``)."""

    blocks: tuple[Block, ...]
    head: str = "fc"

    def __str__(self) -> str:
        return PREFIX + "-".join([*map(str, self.blocks), self.head])

    @property
    def hidden(self) -> int | None:
        m = _HEAD.match(self.head)
        return int(m["hidden"]) if m and m["hidden"] else None

    def feature_size(self, h: int, w: int) -> tuple[int, int]:
        for b in self.blocks:
            h, w = b.out_size(h), b.out_size(w)
        return h, w


def is_genome(arch: str) -> bool:
    return arch.startswith(PREFIX)


def parse_genome(arch: str) -> Genome:
    """``"net:c16k3s2-d32k3s2-fc"`` -> :class:`Genome`; every bad token is named in one error."""
    text = arch.removeprefix(PREFIX)
    tokens = text.split("-")
    if len(tokens) < 2:
        raise ModelError(f"architecture {arch!r}: expected {PREFIX}BLOCK-...-HEAD with at least one block, e.g. {PREFIX}c16k3s2-d32k3s2-fc")
    problems, blocks = [], []
    for t in tokens[:-1]:
        m = _BLOCK.match(t)
        if m is None:
            problems.append(f"{t!r} is not a block (c|d|r|i, channels without leading zeros, k KERNEL, s STRIDE, e EXPANSION for i, "
                            "optional q, optional p: e.g. c16k3s2, d32k5s1p, r32k3s2, i24k3s1e4q)")
            continue
        ch, k, s = int(m["ch"]), int(m["k"]), int(m["s"])
        if not 1 <= ch <= 2048 or k not in (1, 3, 5, 7) or s not in (1, 2):
            problems.append(f"{t!r}: channels must be 1..2048, kernel 1, 3, 5 or 7, stride 1 or 2")
            continue
        if (m["kind"] == "i") != (m["e"] is not None) or (m["e"] is not None and int(m["e"]) > 8):
            problems.append(f"{t!r}: an inverted residual (i) takes an expansion e1..e8 (i24k3s1e4), and only it does")
            continue
        blocks.append(Block(m["kind"], ch, k, s, bool(m["pool"]), int(m["e"] or 0), bool(m["se"])))
    head = tokens[-1]
    m = _HEAD.match(head)
    if m is None or (m["kind"] == "gap" and m["hidden"]) or (m["hidden"] and int(m["hidden"]) > 4096):
        problems.append(f"head {head!r} must be gap, fc or fc{{HIDDEN}} with HIDDEN 1..4096 (e.g. fc64)")
    if problems:
        raise ModelError(f"architecture {arch!r}: " + "; ".join(problems))
    return Genome(tuple(blocks), head)


class GenomeNet(nn.Module):
    """The network a :class:`Genome` describes, for inputs of shape ``input_shape``."""

    def __init__(self, genome: Genome, num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for b in genome.blocks:
            cout = scaled(b.channels, width) if width != 1.0 else b.channels
            if b.kind == "c":
                layers.append(_conv_bn(c, cout, stride=b.stride, kernel=b.kernel))
                if b.se:
                    layers.append(SqueezeExcite(cout))
            elif b.kind == "d":  # depthwise k x k, then pointwise 1 x 1
                layers.append(nn.Sequential(_conv_bn(c, c, stride=b.stride, kernel=b.kernel, groups=c), *([SqueezeExcite(c)] if b.se else []),
                                            _conv_bn(c, cout, kernel=1)))
            elif b.kind == "r":
                layers.append(Residual(c, cout, b.kernel, b.stride, b.se))
            else:
                layers.append(InvertedResidual(c, cout, b.kernel, b.stride, b.expand, b.se))
            if b.pool:
                layers.append(nn.MaxPool2d(2))
            c = cout
        fh, fw = genome.feature_size(h, w)
        if fh < 1 or fw < 1:
            raise ModelError(f"architecture {genome}: downsamples a {h}x{w} input below 1x1; use fewer stride-2 or pooled blocks")
        self.features = nn.Sequential(*layers)  # (B, C, fh, fw)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if genome.head == "gap" else [nn.Flatten()]
        features = c if genome.head == "gap" else c * fh * fw
        if genome.hidden:
            hidden = scaled(genome.hidden, width) if width != 1.0 else genome.hidden
            head += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
            features = hidden
        head.append(nn.Linear(features, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.features(x))



class SqueezeExcite(nn.Module):
    """Squeeze-excitation (Hu et al. 2018): each channel scaled by a gate computed from every channel's mean."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = max(4, channels // 4)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeezed, 1), nn.ReLU(inplace=True), nn.Conv2d(squeezed, channels, 1),
                                  nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


def _conv_bn_linear(cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Residual(nn.Module):
    """``r{C}k{K}s{S}``: two K x K convs with BatchNorm, the input added back (projected by a 1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, se: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride=stride, kernel=kernel), _conv_bn_linear(cout, cout, kernel),
                                  *([SqueezeExcite(cout)] if se else []))
        self.shortcut: nn.Module = nn.Identity() if stride == 1 and cin == cout else _conv_bn_linear(cin, cout, 1, stride=stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """``i{C}k{K}s{S}e{E}``: 1x1 expansion (ReLU6), K x K depthwise (ReLU6), [squeeze-excitation], linear 1x1 projection;
    the input added back when the shape is unchanged."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, se: bool = False) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [_conv_bn(cin, hidden, kernel=1, act=nn.ReLU6)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, stride=stride, kernel=kernel, groups=hidden, act=nn.ReLU6), *([SqueezeExcite(hidden)] if se else []),
                   _conv_bn_linear(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)
