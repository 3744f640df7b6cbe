"""Architectures written as strings: the students ``kdedge search`` finds, rebuildable by name.

A searched student is a plain feed-forward CNN — a sequence of blocks, then a head — and its
name spells it out, so a checkpoint or a bundle records it the same way it records ``tiny_cnn``:

    net:c16k3s2-d32k3s2-fc        conv 16ch 3x3 stride 2, then depthwise-separable 32ch 3x3
                                  stride 2, then flatten + linear (28x28 -> 14x14 -> 7x7 -> 10)

Blocks (``-``-separated, in order):

* ``c{C}k{K}s{S}``: a dense conv (K x K, stride S, "same" padding) + BatchNorm + ReLU to C channels.
* ``d{C}k{K}s{S}``: depthwise-separable: a K x K depthwise conv (stride S) + BN + ReLU, then a
  1x1 conv to C channels + BN + ReLU (MobileNetV1's block).
* a trailing ``p`` on either (``c16k3s1p``) adds a 2x2 max-pool after the block.

The head is the last token: ``gap`` (global average pooling + linear), ``fc`` (flatten +
linear) or ``fc{H}`` (flatten + H hidden units + ReLU + linear). A width (``net:...@0.5``)
scales every channel count and hidden width, rounded to a multiple of 4.

Parsing a name never runs code: it is a grammar, checked token by token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kdedge.errors import ModelError
from kdedge.models.architectures import _conv_bn, scaled

__all__ = ["PREFIX", "Block", "Genome", "GenomeNet", "is_genome", "parse_genome"]

PREFIX = "net:"
_BLOCK = re.compile(r"^(?P<kind>[cd])(?P<ch>[1-9]\d{0,3})k(?P<k>\d)s(?P<s>\d)(?P<pool>p?)$")  # no leading zeros: one name per network
_HEAD = re.compile(r"^(?P<kind>gap|fc)(?P<hidden>[1-9]\d{0,3})?$")


@dataclass(frozen=True)
class Block:
    """One block: ``kind`` "c" (dense) or "d" (depthwise-separable), output channels, kernel, stride, max-pool after."""

    kind: str
    channels: int
    kernel: int
    stride: int
    pool: bool = False

    def __str__(self) -> str:
        return f"{self.kind}{self.channels}k{self.kernel}s{self.stride}{'p' if self.pool else ''}"

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
            problems.append(f"{t!r} is not a block (c|d, channels without leading zeros, k KERNEL, s STRIDE, optional p: e.g. c16k3s2, d32k5s1p)")
            continue
        ch, k, s = int(m["ch"]), int(m["k"]), int(m["s"])
        if not 1 <= ch <= 2048 or k not in (1, 3, 5, 7) or s not in (1, 2):
            problems.append(f"{t!r}: channels must be 1..2048, kernel 1, 3, 5 or 7, stride 1 or 2")
            continue
        blocks.append(Block(m["kind"], ch, k, s, bool(m["pool"])))
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
            else:  # depthwise k x k, then pointwise 1 x 1
                layers.append(nn.Sequential(_conv_bn(c, c, stride=b.stride, kernel=b.kernel, groups=c), _conv_bn(c, cout, kernel=1)))
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

