"""The space ``kdedge search`` samples students from: plain CNNs written as :mod:`~kdedge.models.genome` strings.

What varies, per the latency probes that motivated the search (at batch 1 on a CPU the cost is
per call and per op, not per FLOP): the number of blocks, their width, kernel size, dense vs
depthwise-separable, where the resolution drops (a stride-2 conv or a max-pool after a block)
and the head (flatten + linear, a hidden layer, or global pooling). Sampling is seeded, so the
same seed and input shape give the same candidates on every machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from kdedge.models.genome import KINDS, Block, Genome

__all__ = ["SearchSpace", "mutate", "sample_genomes"]


@dataclass(frozen=True)
class SearchSpace:
    """The ranges candidates are drawn from.

    Attributes:
        min_blocks: Fewest conv blocks.
        max_blocks: Most conv blocks.
        first_channels: Output channels of the first block.
        growth: Each later block keeps or multiplies the previous block's channels by one of these.
        max_channels: Channel cap.
        kernels: Kernel sizes.
        heads: ``fc``, ``gap`` or ``fc{H}``.
        max_flatten: Largest flattened feature count a flatten head may take (bigger uses ``gap``).
        target_side: Downsample until the feature map's shorter side is at most this (or one more halving).
        kinds: Block kinds after the first (which is always dense): of :data:`~kdedge.models.genome.KINDS` — dense,
            depthwise-separable, residual, inverted residual. The default draws the first two, as every recorded search did.
        expansions: An inverted residual's expansion ratios.
        se: The probability that a block gets squeeze-excitation (0: never, drawing nothing).
    """

    min_blocks: int = 2
    max_blocks: int = 4
    first_channels: tuple[int, ...] = (8, 16, 24, 32)
    growth: tuple[float, ...] = (1.0, 1.5, 2.0)
    max_channels: int = 128
    kernels: tuple[int, ...] = (3, 5)
    heads: tuple[str, ...] = ("fc", "fc", "gap", "fc32", "fc64")
    max_flatten: int = 4096
    target_side: int = 7
    kinds: tuple[str, ...] = ("c", "d")
    expansions: tuple[int, ...] = (2, 4, 6)
    se: float = 0.0

    def __post_init__(self) -> None:
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be some of {', '.join(KINDS)}, got {self.kinds}")

    def block(self, rng: random.Random, kind: str, channels: int, kernel: int, stride: int, pool: bool) -> Block:
        """A block of ``kind``, its expansion (inverted residual) and squeeze-excitation drawn from the space."""
        expand = rng.choice(self.expansions) if kind == "i" else 0
        se = self.se > 0 and rng.random() < self.se
        return Block(kind, channels, kernel, stride, pool, expand, se)

    def sample(self, rng: random.Random, input_shape: tuple[int, int, int]) -> Genome:
        """One random genome for inputs of ``input_shape`` (C, H, W)."""
        _, h, w = input_shape
        side = min(h, w)
        needed = max(1, math.ceil(math.log2(side / self.target_side))) if side > self.target_side else 1
        possible = max(1, int(math.log2(side)) - 1)  # never below 2x2
        n = rng.randint(self.min_blocks, self.max_blocks)
        downs = min(rng.choice((needed, needed, needed + 1)), possible)
        down_at = set(rng.sample(range(n), min(downs, n)))
        extra = downs - len(down_at)  # more halvings than blocks: some blocks both stride and pool
        blocks, channels = [], rng.choice(self.first_channels)
        for i in range(n):
            if i:
                channels = min(self.max_channels, _round4(channels * rng.choice(self.growth)))
            kind = "c" if i == 0 else rng.choice(self.kinds)
            kernel = rng.choice(self.kernels) if i == 0 else rng.choice((3, 3, *self.kernels))
            stride, pool = 1, False
            if i in down_at and extra > 0:  # two halvings in one block
                stride, pool, extra = 2, True, extra - 1
            elif i in down_at:  # a stride-2 conv, or a full-resolution conv and a max-pool
                pool = rng.random() < 0.3
                stride = 1 if pool else 2
            blocks.append(self.block(rng, kind, channels, kernel, stride, pool))
        genome = Genome(tuple(blocks), "fc")
        fh, fw = genome.feature_size(h, w)
        head = rng.choice(self.heads)
        if head != "gap" and channels * fh * fw > self.max_flatten:
            head = "gap"
        return Genome(genome.blocks, head)


def mutate(genome: Genome, rng: random.Random, input_shape: tuple[int, int, int], space: SearchSpace | None = None, *, tries: int = 20) -> Genome | None:
    """A neighbour of ``genome``: one block wider or narrower, another kernel, dense <-> depthwise-separable,
    another head, a block added or removed, or a downsampling moved between stride and pooling.

    Returns None when ``tries`` random edits give nothing valid for ``input_shape`` (e.g. a
    flatten head over too many features) or nothing new.
    """
    space = space or SearchSpace()
    _, h, w = input_shape
    for _ in range(tries):
        blocks, head = list(genome.blocks), genome.head
        i = rng.randrange(len(blocks))
        b = blocks[i]
        ops = ("width", "width", "kernel", "kind", "head", "add", "remove", "downsample") + (("se",) if space.se > 0 else ())
        op = rng.choice(ops)
        if op == "width":
            blocks[i] = replace(b, channels=min(space.max_channels, _round4(b.channels * rng.choice((0.5, 0.75, 1.5, 2.0)))))
        elif op == "kernel":
            blocks[i] = replace(b, kernel=rng.choice([k for k in space.kernels if k != b.kernel] or [b.kernel]))
        elif op == "kind" and i > 0 and len(space.kinds) > 1:
            others = [k for k in space.kinds if k != b.kind]
            kind = others[0] if len(others) == 1 else rng.choice(others)
            blocks[i] = replace(b, kind=kind, expand=(b.expand or rng.choice(space.expansions)) if kind == "i" else 0)
        elif op == "head":
            head = rng.choice([x for x in space.heads if x != head] or [head])
        elif op == "add" and len(blocks) < space.max_blocks:
            blocks.insert(i + 1, space.block(rng, rng.choice(space.kinds), b.channels, 3, 1, False))
        elif op == "remove" and len(blocks) > space.min_blocks and i > 0 and b.stride == 1 and not b.pool:
            del blocks[i]  # a full-resolution block: the feature map's size is unchanged
        elif op == "downsample" and (b.stride == 2) != b.pool:
            blocks[i] = replace(b, stride=1 if b.stride == 2 else 2, pool=b.stride == 2)
        elif op == "se":
            blocks[i] = replace(b, se=not b.se)
        else:
            continue
        child = Genome(tuple(blocks), head)
        fh, fw = child.feature_size(h, w)
        if fh < 1 or fw < 1 or str(child) == str(genome):
            continue
        if child.head != "gap" and child.blocks[-1].channels * fh * fw > space.max_flatten:
            continue
        return child
    return None


def _round4(x: float) -> int:
    return max(4, round(x / 4) * 4)


def sample_genomes(n: int, input_shape: tuple[int, int, int], *, seed: int = 0, space: SearchSpace | None = None) -> list[Genome]:
    """``n`` distinct genomes for ``input_shape``, the same for the same seed (gives up after 50·n draws)."""
    space = space or SearchSpace()
    rng = random.Random(seed)
    seen: dict[str, Genome] = {}
    for _ in range(50 * n):
        if len(seen) >= n:
            break
        g = space.sample(rng, input_shape)
        fh, fw = g.feature_size(*input_shape[1:])
        if fh >= 1 and fw >= 1:
            seen.setdefault(str(g), g)
    return list(seen.values())
