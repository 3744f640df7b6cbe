"""Runtime tuning: try a runtime's settings on one model and batch, keep the fastest.

A model's best settings depend on the model and the machine: on a 2-core CPU a ~100 k-parameter
student runs faster on one onnxruntime thread than on two (the second thread costs more to wake
than it saves), while a larger teacher gains from two. So a student and its teacher are each
compared at their own best settings, never at one shared setting.

Every combination is timed with :func:`~kdedge.bench.timing.measure_interleaved` — blocks of each
combination in a rotating order — so a machine whose speed drifts during tuning slows all of them
alike instead of picking the winner. The first round screens: a combination whose first block is
over twice as slow as the fastest one's (far beyond drift; e.g. parallel execution on a busy
2-core CPU, 100x slower) is timed no further, and its row says ``"rounds": 1``.

**Tie rule.** Among the combinations timed in every round, p50s within ``tie`` (default 3 %) of the
fastest are treated as equal, and among those the simplest settings win: sequential before
parallel execution (parallel adds an inter-op thread pool), then the fewest intra-op threads,
then the lowest p50. Fewer threads leave cores to the rest of the application for no measurable
loss.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge.bench.runners import OrtRunner, TorchRunner
from kdedge.bench.timing import LatencyStats, measure_interleaved
from kdedge.errors import ConfigError

__all__ = ["TuneResult", "available_cores", "default_threads", "settings_call", "time_within", "tune", "tune_edge", "tune_onnx", "tune_torch"]

_LEVELS = ("basic", "extended", "all")
_SCREEN = 2.0  # a first block this many times the fastest one's is out: drift on a shared machine stays well inside it
_MODES = ("sequential", "parallel")


@dataclass(frozen=True)
class TuneResult:
    """The settings tried on one model at one batch size, and the one chosen.

    Attributes:
        runtime: ``onnxruntime``, ``torch``, or an edge format (``executorch``, ``litert``, ``openvino``, ``ort``).
        best: The chosen settings (``ort_session`` via ``kdedge.ort.session_kwargs``, or ``{"threads": n}`` for torch).
        p50_ms: The chosen settings' p50 (the median of its per-block medians).
        p90_ms: The chosen settings' p90 over all its samples.
        rows: Every combination tried, in grid order: ``{"settings": {...}, "p50_ms": ..., "p90_ms": ..., "rounds": ...}``
            (``rounds`` 1: dropped after the screening round).
        batch: The batch size tuned at.
        cores: CPU cores this process could use while tuning (thread counts beyond it are not tried by default).
        tie: Relative p50 difference treated as a tie (see the module's tie rule).
    """

    runtime: str
    best: dict[str, Any]
    p50_ms: float
    p90_ms: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    batch: int = 1
    cores: int = 1
    tie: float = 0.03

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads(cores: int | None = None) -> list[int]:
    """Thread counts worth trying: every count up to 4, then powers of two, then ``cores`` itself.

    On a 2-core machine that is ``[1, 2]``; on 64 cores ``[1, 2, 3, 4, 8, 16, 32, 64]``, which
    keeps the grid small where every count would take minutes to time.
    """
    cores = cores or available_cores()
    counts = {n for n in range(1, min(cores, 4) + 1)} | {2**k for k in range(2, cores.bit_length()) if 2**k <= cores} | {cores}
    return sorted(counts)


def time_within(calls: dict[str, Callable[[], Any]], *, budget_s: float, rounds: int = 5, min_block_iters: int = 3,
                warmup_iters: int = 3) -> dict[str, LatencyStats]:
    """:func:`~kdedge.bench.timing.measure_interleaved` with block lengths that fit ``budget_s`` seconds.

    Each of ``rounds`` rounds times a block of every call, at least ``budget_s / (len(calls) *
    rounds)`` seconds and ``min_block_iters`` calls long: a fast model takes about ``budget_s``,
    a slow one (a call longer than a block) more. A call may change torch's intra-op thread count
    (see :func:`settings_call`); it is restored afterwards.
    """
    if not calls:
        return {}
    threads = torch.get_num_threads()
    try:
        return measure_interleaved(calls, rounds=rounds, block_iters=min_block_iters, block_s=budget_s / (len(calls) * rounds),
                                   warmup_iters=warmup_iters)
    finally:
        torch.set_num_threads(threads)


def settings_call(model: str | Path | nn.Module, inputs: np.ndarray, settings: dict[str, Any]) -> Callable[[], Any]:
    """A zero-argument call running one inference of ``model`` on ``inputs`` ``(B, ...)`` with ``settings``.

    An ONNX file runs in an onnxruntime CPU session built with ``settings``
    (``{"intra_op_threads", "graph_optimization_level", "execution_mode"}``); a torch module runs in
    eval mode under ``inference_mode`` on a copy, setting ``torch.set_num_threads(settings["threads"])``
    first whenever another call changed it — so calls with different thread counts can be interleaved.
    """
    if isinstance(model, nn.Module):
        threads = _torch_threads(settings)
        run = TorchRunner(model).prepare(inputs)

        def call() -> Any:
            if torch.get_num_threads() != threads:  # a cheap check; the switch itself lands on a block's first call only
                torch.set_num_threads(threads)
            return run()

        return call
    if isinstance(model, (str, Path)):
        from kdedge.ort import ort_session, session_kwargs

        runner = OrtRunner(model, session=ort_session(model, **session_kwargs(settings)))
        runner.check_batch(len(inputs))
        return runner.prepare(inputs)
    raise ConfigError(f"runtime tuning takes an ONNX file path or a torch nn.Module, got {type(model).__name__}; export the model or pass its module")


def tune_onnx(path: str | Path, inputs: np.ndarray, *, threads: Sequence[int] | None = None, levels: Sequence[str] = _LEVELS,
              modes: Sequence[str] = _MODES, budget_s: float = 2.0, rounds: int = 5, tie: float = 0.03) -> TuneResult:
    """The fastest onnxruntime CPU settings for ``path`` on ``inputs`` ``(B, ...)``, and every combination's timing.

    Args:
        path: An ONNX model.
        inputs: One batch, exactly as a deployment feeds it (already preprocessed).
        threads: Intra-op thread counts to try (default :func:`default_threads`).
        levels: Graph optimization levels (``disable``, ``basic``, ``extended``, ``all``).
        modes: Execution modes (``sequential``, ``parallel``).
        budget_s: Seconds the timing should take for a fast model (see :func:`time_within`).
        rounds: Interleaved blocks per combination.
        tie: Relative p50 difference treated as a tie (see the module's tie rule).
    """
    counts = _thread_counts(threads)
    _check_knobs(budget_s, rounds, tie, levels=levels, modes=modes)
    grid = [{"intra_op_threads": t, "graph_optimization_level": lv, "execution_mode": m} for t in counts for lv in levels for m in modes]
    calls = {_name(s): settings_call(path, inputs, s) for s in grid}
    return _choose("onnxruntime", grid, _screened(calls, budget_s, rounds), len(inputs), tie)


def tune_torch(module: nn.Module, inputs: np.ndarray, *, threads: Sequence[int] | None = None, budget_s: float = 1.0, rounds: int = 5,
               tie: float = 0.03) -> TuneResult:
    """The fastest torch intra-op thread count for ``module`` (eval, ``inference_mode``, on a copy) on ``inputs`` ``(B, ...)``.

    torch's thread count is process-wide, so it is set before each block and restored at the end.
    Arguments as :func:`tune_onnx`.
    """
    counts = _thread_counts(threads)
    _check_knobs(budget_s, rounds, tie)
    grid = [{"threads": t} for t in counts]
    calls = {_name(s): settings_call(module, inputs, s) for s in grid}
    return _choose("torch", grid, _screened(calls, budget_s, rounds), len(inputs), tie)


def tune_edge(name: str, path: str | Path, inputs: np.ndarray, *, threads: Sequence[int] | None = None, budget_s: float = 2.0, rounds: int = 5,
              tie: float = 0.03) -> TuneResult:
    """The fastest settings of an edge artifact in its own runtime (:func:`kdedge.exporters.edge.load_edge`) on ``inputs``.

    The grid: ExecuTorch's XNNPACK and LiteRT, the thread count; OpenVINO, the thread count at the
    LATENCY hint (one stream: a single request at a time, as timed here); the ORT format,
    onnxruntime's thread count and execution mode (its graph was optimized when it was written).
    Every session of the grid is opened at once and timed interleaved, like :func:`tune_onnx`
    (ExecuTorch's one thread pool is switched at the start of each block, in its untimed calls).
    Arguments as :func:`tune_onnx`.
    """
    from kdedge.exporters.edge import edge_format, load_edge

    fmt = edge_format(name)
    counts = _thread_counts(threads)
    _check_knobs(budget_s, rounds, tie)
    if fmt.name == "openvino":
        # LATENCY only: the tuned call is one batch-1 request, which waits on one stream whatever the hint; THROUGHPUT's
        # streams serve concurrent requests, which this timing does not make. The hint stays a setting a deployment can pass.
        grid = [{"threads": t, "performance_hint": "LATENCY"} for t in counts]
    elif fmt.name == "ort":
        grid = [{"intra_op_threads": t, "graph_optimization_level": "all", "execution_mode": m} for t in counts for m in _MODES]
    else:
        grid = [{"threads": t} for t in counts]
    calls = {}
    for s in grid:
        session = load_edge(fmt.name, path, settings=s)
        if session.fixed_batch is not None and session.fixed_batch != len(inputs):
            raise ConfigError(f"{Path(path).name} takes a fixed batch of {session.fixed_batch}; tune it at that batch, not {len(inputs)}")
        calls[_name(s)] = session.prepare(inputs)
    return _choose(fmt.name, grid, _screened(calls, budget_s, rounds), len(inputs), tie)


def tune(model: str | Path | nn.Module, inputs: np.ndarray, **kwargs: Any) -> TuneResult:
    """:func:`tune_onnx` for an ONNX file path, :func:`tune_torch` for a torch module."""
    if isinstance(model, nn.Module):
        return tune_torch(model, inputs, **kwargs)
    if isinstance(model, (str, Path)):
        return tune_onnx(model, inputs, **kwargs)
    raise ConfigError(f"runtime tuning takes an ONNX file path or a torch nn.Module, got {type(model).__name__}; export the model or pass its module")


def _screened(calls: dict[str, Callable[[], Any]], budget_s: float, rounds: int) -> dict[str, tuple[LatencyStats, int]]:
    """Name -> (stats, rounds timed): one screening round of every call, then the rest for those within ``_SCREEN`` of the fastest."""
    screen = time_within(calls, budget_s=budget_s / rounds, rounds=1)
    fastest = min(st.p50_ms for st in screen.values())
    kept = {name: call for name, call in calls.items() if screen[name].p50_ms <= _SCREEN * fastest}
    rest = time_within(kept, budget_s=budget_s * (rounds - 1) / rounds, rounds=rounds - 1, warmup_iters=0) if rounds > 1 else {}
    return {name: (rest[name], rounds) if name in rest else (screen[name], 1) for name in calls}


def _choose(runtime: str, grid: list[dict[str, Any]], timed: dict[str, tuple[LatencyStats, int]], batch: int, tie: float) -> TuneResult:
    """The simplest settings within ``tie`` of the fastest p50 among those timed in every round (the module's tie rule)."""
    rows = [{"settings": s, "p50_ms": timed[_name(s)][0].p50_ms, "p90_ms": timed[_name(s)][0].p90_ms, "rounds": timed[_name(s)][1]} for s in grid]
    full = [r for r in rows if r["rounds"] == max(r["rounds"] for r in rows)]
    fastest = min(r["p50_ms"] for r in full)
    within = [r for r in full if r["p50_ms"] <= fastest * (1 + tie)]
    best = min(within, key=lambda r: (r["settings"].get("execution_mode", "sequential") != "sequential",
                                      r["settings"].get("performance_hint", "LATENCY") != "LATENCY", _threads_of(r["settings"]), r["p50_ms"]))
    return TuneResult(runtime=runtime, best=dict(best["settings"]), p50_ms=best["p50_ms"], p90_ms=best["p90_ms"], rows=rows, batch=batch,
                      cores=available_cores(), tie=tie)


def _threads_of(settings: dict[str, Any]) -> int:
    return int(settings.get("intra_op_threads", settings.get("threads", 0)))


def _torch_threads(settings: dict[str, Any]) -> int:
    if set(settings) != {"threads"} or isinstance(settings["threads"], bool) or not isinstance(settings["threads"], int) or settings["threads"] < 1:
        raise ConfigError(f"torch settings must be {{'threads': N}} with N >= 1, got {settings!r}")
    return settings["threads"]


def _name(settings: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


def _thread_counts(threads: Sequence[int] | None) -> list[int]:
    if threads is None:
        return default_threads()
    counts = sorted(set(threads))
    if not counts or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in counts):
        raise ConfigError(f"threads must be one or more integers >= 1, got {list(threads)!r}; leave it unset for 1..{available_cores()}")
    return counts


def _check_knobs(budget_s: float, rounds: int, tie: float, *, levels: Sequence[str] = _LEVELS, modes: Sequence[str] = _MODES) -> None:
    from kdedge.ort import EXECUTION_MODES, OPTIMIZATION_LEVELS

    problems = []
    if not budget_s > 0:
        problems.append(f"budget_s must be > 0, got {budget_s}")
    if rounds < 1:
        problems.append(f"rounds must be >= 1, got {rounds}")
    if not 0 <= tie < 1:
        problems.append(f"tie must be in [0, 1) (a relative p50 difference), got {tie}")
    for what, given, allowed in (("levels", levels, OPTIMIZATION_LEVELS), ("modes", modes, EXECUTION_MODES)):
        if not given or any(v not in allowed for v in given):
            problems.append(f"{what} must be one or more of {', '.join(allowed)}, got {list(given)!r}")
    if problems:
        raise ConfigError("runtime tuning: " + "; ".join(problems))
