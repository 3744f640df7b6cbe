"""Latency measurement: warm-up by count and time, then timed runs until both a count and a duration.

One call of ``fn`` is one sample. On the CPU each sample is timed with ``time.perf_counter_ns``
around the call; on CUDA with a pair of CUDA events recorded on the current stream around it, and
the events are read after one synchronisation at the end, so the host's launch overhead is not
mistaken for device time and no per-iteration sync distorts the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LatencyStats", "TimingPolicy", "measure", "measure_cuda"]


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
        return asdict(self)


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
