"""Benchmark harness: runners over real inputs, latency statistics, reports.

``kdedge.bench.benchmark(models, data, config)`` measures; ``write_report`` writes report.json,
report.md and plots; ``compare_reports`` diffs two reports against their measured noise.
"""

from kdedge.bench.harness import REPORT_SCHEMA, BenchModel, benchmark, compare_models, resolve_bench_model, run_bench
from kdedge.bench.report import compare_reports, load_report, pareto_front, render_comparison, render_markdown, write_plots, write_report
from kdedge.bench.runners import TARGETS, OrtRunner, Runner, TensorRTRunner, TorchRunner, make_runner, target_available
from kdedge.bench.timing import LatencyStats, TimingPolicy, measure, measure_cuda

__all__ = [
    "REPORT_SCHEMA",
    "TARGETS",
    "BenchModel",
    "LatencyStats",
    "OrtRunner",
    "Runner",
    "TensorRTRunner",
    "TimingPolicy",
    "TorchRunner",
    "benchmark",
    "compare_models",
    "compare_reports",
    "load_report",
    "make_runner",
    "measure",
    "measure_cuda",
    "pareto_front",
    "render_comparison",
    "render_markdown",
    "resolve_bench_model",
    "run_bench",
    "target_available",
    "write_plots",
    "write_report",
]
