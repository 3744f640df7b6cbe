"""Latency measurement: warm-up by count and time, then timed runs until both a count and a duration.

One call of ``fn`` is one sample. On the CPU each sample is timed with ``time.perf_counter_ns``
around the call; on CUDA with a pair of CUDA events recorded on the current stream around it, and
the events are read after one synchronisation at the end, so the host's launch overhead is not
mistaken for device time and no per-iteration sync distorts the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = ["LatencyStats", "TimingPolicy", "measure", "measure_cuda", "measure_interleaved"]


@dataclass(frozen=True)
class TimingPolicy:
    """How long to warm up and how much to measure.

    Warm-up runs until both ``warmup_iters`` calls and ``warmup_s`` seconds have passed; timing
    runs until both ``min_iters`` samples and ``min_s`` seconds, capped at ``max_iters``.
    """

    warmup_iters: int = 10
    warmup_s: float = 0.2
    min_iters: int = 50
    min_s: float = 1.0
    max_iters: int = 100_000


@dataclass(frozen=True)
class LatencyStats:
    """Summary of latency samples in milliseconds (percentiles: numpy's linear interpolation).

    ``drift`` measures how the machine changed *during* the run: the samples, in the order they
    were taken, are cut into 10 chunks, and drift is max/min of the chunks' medians minus 1 (0 for
    fewer than 100 samples). A shared or throttling machine shows drift that no warm-up removes;
    ``kdedge bench --compare`` treats it as noise.
    """

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    drift: float = 0.0
    #: :func:`measure_interleaved`'s per-block medians, in round order (its other stats pool the blocks); not in :meth:`to_dict`.
    blocks_ms: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, samples_ms: np.ndarray | list[float]) -> LatencyStats:
        s = np.asarray(samples_ms, dtype=np.float64)
        if s.size == 0:
            raise ValueError("no latency samples")
        p50, p90, p95, p99 = np.percentile(s, [50, 90, 95, 99])
        drift = 0.0
        if s.size >= 100:
            medians = [float(np.median(c)) for c in np.array_split(s, 10)]
            drift = max(medians) / max(min(medians), 1e-12) - 1
        return cls(
            n=int(s.size),
            mean_ms=float(s.mean()),
            std_ms=float(s.std(ddof=1)) if s.size > 1 else 0.0,
            min_ms=float(s.min()),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p95_ms=float(p95),
            p99_ms=float(p99),
            max_ms=float(s.max()),
            drift=drift,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["blocks_ms"]
        return d


def _warm_up(fn: Callable[[], Any], policy: TimingPolicy, sync: Callable[[], None] | None) -> None:
    start, i = time.perf_counter(), 0
    while i < policy.warmup_iters or time.perf_counter() - start < policy.warmup_s:
        fn()
        i += 1
    if sync is not None:
        sync()


def measure(fn: Callable[[], Any], policy: TimingPolicy = TimingPolicy()) -> LatencyStats:
    """Host-timed latency of ``fn`` (which must finish its work before returning)."""
    _warm_up(fn, policy, None)
    samples: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(policy.min_s * 1e9)
    while len(samples) < policy.max_iters and (len(samples) < policy.min_iters or clock() < deadline):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return LatencyStats.from_samples(np.asarray(samples, dtype=np.float64) / 1e6)


def measure_cuda(fn: Callable[[], Any], policy: TimingPolicy = TimingPolicy()) -> LatencyStats:
    """Device-timed latency of ``fn`` (which enqueues CUDA work on the current stream)."""
    import torch

    _warm_up(fn, policy, torch.cuda.synchronize)
    events: list[tuple[Any, Any]] = []
    start = time.perf_counter()
    while len(events) < policy.max_iters and (len(events) < policy.min_iters or time.perf_counter() - start < policy.min_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        events.append((begin, end))
        if len(events) % 256 == 0:
            end.synchronize()  # bound the queue so the host clock tracks the device
    torch.cuda.synchronize()
    return LatencyStats.from_samples([b.elapsed_time(e) for b, e in events])


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 7, block_iters: int = 100, block_s: float = 0.05,
                        warmup_iters: int = 20, block_warmup_s: float = 0.005) -> dict[str, LatencyStats]:
    """Host-timed latency of several functions, measured in interleaved blocks.

    A machine whose speed drifts by ±25 % over seconds (a shared host, thermal or frequency
    changes) ranks two functions timed one after the other by when they ran. Here every round
    times one block of each function (``block_iters`` calls and at least ``block_s`` seconds),
    in an order rotated each round, so drift lands on all of them alike. Each returned
    :class:`LatencyStats` pools that function's samples over all rounds, except ``p50_ms``, which
    is the median of its per-block medians: one slow block moves it less than pooling would.

    Args:
        fns: Name -> a call that finishes its work before returning (e.g. ``session.run``).
        rounds: Blocks per function.
        block_iters: Calls per block at least.
        block_s: Seconds per block at least.
        warmup_iters: Untimed calls per function before the first round.
        block_warmup_s: Untimed calls at the start of every block, for this long (at least one): the
            previous block's runtime may still hold the cores (onnxruntime's worker threads spin
            after a call) and its data the caches; neither is this function's cost.
    """
    if not fns:
        return {}
    names = list(fns)
    for name in names:
        for _ in range(warmup_iters):
            fns[name]()
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {n: [] for n in names}
    block_medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, block = fns[name], []
            settle = clock() + int(block_warmup_s * 1e9)
            fn()
            while clock() < settle:
                fn()
            deadline = clock() + int(block_s * 1e9)
            while len(block) < block_iters or clock() < deadline:
                t0 = clock()
                fn()
                block.append(clock() - t0)
            samples[name] += block
            block_medians[name].append(float(np.median(block)) / 1e6)
    out = {}
    for name in names:
        stats = LatencyStats.from_samples(np.asarray(samples[name], dtype=np.float64) / 1e6)
        out[name] = replace(stats, p50_ms=float(np.median(block_medians[name])), blocks_ms=tuple(block_medians[name]))
    return out
