"""One decision: the most accurate of several trained models that meets a latency budget on the deployment's runtime.

A user states a target and a budget ("LiteRT, one thread, 20 µs"); kdedge has several levers that
each make a model for it — a searched student, the teacher pruned, the default student — and INT8
for each. :func:`decide` makes every contender into the file the target runs at every precision
the target runs (FP32, and INT8 by the target's own quantization, calibrated on training images),
proves each file in that runtime (its accuracy on the validation split, computed by the runtime),
and times all of them together, with the teacher for reference, in one interleaved measurement
(:func:`kdedge.bench.tuning.time_within`): the winner is re-timed against every runner-up under
the same drift, in the same run. The most accurate file within the budget wins; a contender more
accurate by less than ``tie`` points than a faster one does not. Every row says why it lost.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge.bench.runners import TARGETS, make_runner
from kdedge.bench.tuning import time_within
from kdedge.config import TARGET_PRECISIONS
from kdedge.data.spec import ImageDataset
from kdedge.errors import ConfigError, KdedgeError
from kdedge.metrics import evaluation_from_predictions
from kdedge.models import ModelSpec
from kdedge.search.latency import LatencyMeter, synced

__all__ = ["Contender", "Decision", "decide"]


@dataclass
class Contender:
    """A trained model competing for the budget.

    Attributes:
        name: What made it (``searched``, ``pruned``, ``student``; any short name).
        model: The trained PyTorch module.
        spec: Its architecture, as its checkpoint records it.
        how: One line for the record: how it was made.
    """

    name: str
    model: nn.Module
    spec: ModelSpec
    how: str = ""


@dataclass
class Decision:
    """What :func:`decide` measured and chose.

    Attributes:
        rows: One per contender and precision: ``contender``, ``precision``, ``architecture``, ``val_accuracy`` (in the
            target's runtime), ``p50_ms`` (the median of its interleaved blocks' medians), ``p50_range_ms`` (their p10 and
            p90), ``within_budget``, and ``verdict`` (``shipped``, or why it lost); a file that could not be made or run has
            ``error`` instead of measurements.
        winner: The shipped row, or None when no file meets the budget.
        teacher: The teacher's rows on the same target, timed in the same measurement (reference, never shipped).
        not_built: Contenders the caller could not make, and why (recorded as given).
    """

    target: str
    budget_ms: float
    threads: int
    rounds: int
    rows: list[dict[str, Any]]
    winner: dict[str, Any] | None
    teacher: list[dict[str, Any]] = field(default_factory=list)
    not_built: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def winner_contender(self) -> str | None:
        return None if self.winner is None else self.winner["contender"]


def decide(contenders: list[Contender], val: ImageDataset, *, target: str, budget_ms: float, calibration: np.ndarray,
           teacher: nn.Module | None = None, teacher_spec: ModelSpec | None = None, threads: int = 1, precisions: tuple[str, ...] | None = None,
           rounds: int = 15, seconds_per_file: float = 1.0, tie: float = 0.0, work: Path, not_built: dict[str, str] | None = None,
           log: Callable[[str], None] | None = None) -> Decision:
    """The most accurate contender on ``val`` whose file meets ``budget_ms`` (p50, batch 1, ``threads``) on ``target``.

    Args:
        contenders: The trained models (distinct names).
        val: The validation split: accuracy is measured on it in the target's runtime (the test split stays the report's).
        target: A search target (:data:`kdedge.config.SEARCH_TARGETS`) that is available here.
        budget_ms: The p50 limit in milliseconds, at batch 1.
        calibration: Normalized training inputs ``(N, C, H, W)`` that calibrate each INT8 file (as ``kdedge export`` does).
        teacher: Timed and evaluated beside the contenders for reference (never shipped).
        threads: The deployment's intra-op threads, for every timing and evaluation.
        precisions: What to try (default: each CPU precision the target runs: ``fp32`` and, where it has it, ``int8``;
            ``fp16`` too on a CUDA target).
        rounds: Interleaved blocks per file.
        seconds_per_file: Timed seconds per file over all rounds.
        tie: Accuracy points within which the faster of two in-budget files wins.
        work: A directory for the files.
        not_built: Contenders the caller could not make, and why; recorded in the decision.

    Raises:
        ConfigError: No contender, a duplicate name, or a precision the target does not run.
    """
    log = log or (lambda _line: None)
    if not contenders:
        raise ConfigError("decide needs at least one trained contender; " + "; ".join(f"{k}: {v}" for k, v in (not_built or {}).items()))
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ConfigError(f"contender names must be distinct, got {', '.join(names)}")
    allowed = TARGET_PRECISIONS.get(target, ())
    precisions = precisions or allowed
    bad = [p for p in precisions if p not in allowed]
    if bad:
        raise ConfigError(f"{target} does not run {', '.join(bad)}; it runs {' or '.join(allowed) or 'nothing kdedge times'}")
    t0 = time.perf_counter()
    x1 = np.ascontiguousarray(val.batch_of(1), dtype=np.float32)
    entries: list[tuple[str, ModelSpec, nn.Module, str, str]] = [(c.name, c.spec, c.model, p, c.how) for c in contenders for p in precisions]
    if teacher is not None and teacher_spec is not None:
        entries += [("teacher", teacher_spec, teacher, p, "the teacher (reference)") for p in precisions]
    rows: list[dict[str, Any]] = []
    calls: dict[str, Callable[[], Any]] = {}
    torch_threads = torch.get_num_threads()
    try:
        for i, (name, spec, model, precision, how) in enumerate(entries):
            row: dict[str, Any] = {"contender": name, "precision": precision, "architecture": spec.name, "how": how}
            rows.append(row)
            try:
                runner = _runner(target, precision, threads, model.eval(), spec, calibration, work / f"{i}-{name}-{precision}")
                row["val_accuracy"] = _accuracy(runner, val)
                calls[str(i)] = synced(target, runner.prepare(x1))
            except Exception as exc:  # noqa: BLE001 - a converter or runtime refusing one file: that row loses, the trained others are still weighed
                row["error"] = str(exc) if isinstance(exc, KdedgeError) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log(f"decide: {name} {precision} cannot run on {target}: {row['error']}")
        log(f"decide: timing {len(calls)} files on {target} ({threads} thread{'s' if threads > 1 else ''}, batch 1), interleaved")
        stats = time_within(calls, budget_s=seconds_per_file * len(calls), rounds=rounds) if calls else {}
    finally:
        torch.set_num_threads(torch_threads)
    for i, row in enumerate(rows):
        st = stats.get(str(i))
        if st is None:
            continue
        blocks = np.asarray(st.blocks_ms)
        row |= {"p50_ms": st.p50_ms, "p50_range_ms": [float(q) for q in np.percentile(blocks, [10, 90])], "blocks_ms": [round(float(b), 6) for b in blocks],
                "within_budget": st.p50_ms <= budget_ms}
    teacher_rows = [r for r in rows if r["contender"] == "teacher"]
    rows = [r for r in rows if r["contender"] != "teacher"]
    winner = _choose(rows, budget_ms, tie)
    _verdicts(rows, winner, budget_ms)
    for r in teacher_rows:
        r["verdict"] = "reference, not a contender"
    decision = Decision(target=target, budget_ms=budget_ms, threads=threads, rounds=rounds, rows=rows, winner=winner, teacher=teacher_rows,
                        not_built=dict(not_built or {}), seconds=time.perf_counter() - t0)
    if winner is not None:
        log(f"decide: {winner['contender']} {winner['precision']} ({winner['architecture']}) at {1000 * winner['p50_ms']:.1f} µs "
            f"<= {1000 * budget_ms:.1f} µs, validation {100 * winner['val_accuracy']:.2f} %")
    return decision


def _runner(target: str, precision: str, threads: int, model: nn.Module, spec: ModelSpec, calibration: np.ndarray, work: Path) -> Any:
    """The target's runner for ``model`` at ``precision``: the module itself on a torch target, else the file the target runs."""
    if TARGETS[target][0] == "torch":
        return make_runner(target, module=model, precision=precision, threads=threads)
    meter = LatencyMeter(calibration, num_classes=spec.num_classes, target=target, threads=threads, batch=1, precision=precision,
                         exporter="dynamo", calibration=calibration)
    path = meter.artifact(model, spec, work)
    runner = make_runner(target, path=path, precision=precision, threads=threads)
    runner.check_batch(1)
    return runner


def _accuracy(runner: Any, val: ImageDataset) -> float:
    source = val.pass_source()
    logits = np.concatenate([runner.predict(x, batch_size=256) for x in source()])
    return evaluation_from_predictions(torch.from_numpy(logits.argmax(-1)), val.labels, logits.shape[-1]).accuracy


def _choose(rows: list[dict[str, Any]], budget_ms: float, tie: float) -> dict[str, Any] | None:
    """The most accurate in-budget row; among rows within ``tie`` points of it, the fastest."""
    within = [r for r in rows if r.get("within_budget")]
    if not within:
        return None
    best = max(r["val_accuracy"] for r in within)
    close = [r for r in within if 100 * (best - r["val_accuracy"]) <= tie]
    return min(close, key=lambda r: (r["p50_ms"], -r["val_accuracy"]))


def _verdicts(rows: list[dict[str, Any]], winner: dict[str, Any] | None, budget_ms: float) -> None:
    for r in rows:
        if r is winner:
            r["verdict"] = "shipped"
        elif "error" in r:
            r["verdict"] = f"cannot run on the target: {r['error']}"
        elif not r["within_budget"]:
            r["verdict"] = f"over budget: p50 {1000 * r['p50_ms']:.1f} µs > {1000 * budget_ms:.1f} µs"
        elif winner is not None and r["val_accuracy"] < winner["val_accuracy"]:
            r["verdict"] = f"less accurate: validation {100 * r['val_accuracy']:.2f} % < {100 * winner['val_accuracy']:.2f} %"
        else:
            r["verdict"] = f"as accurate (within the tie) but slower: p50 {1000 * r['p50_ms']:.1f} µs > {1000 * winner['p50_ms']:.1f} µs"  # type: ignore[index]
    if winner is not None:  # the head to head: the winner's per-round ratio to each in-budget runner-up, from the same blocks
        mine = np.asarray(winner["blocks_ms"])
        for r in rows:
            if r is not winner and "blocks_ms" in r:
                r["p50_vs_winner"] = float(np.median(np.asarray(r["blocks_ms"]) / mine))
