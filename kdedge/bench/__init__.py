"""Benchmark harness: runners over real inputs, latency statistics, reports."""

from kdedge.bench.timing import LatencyStats, TimingPolicy, measure, measure_cuda

__all__ = ["LatencyStats", "TimingPolicy", "measure", "measure_cuda"]
