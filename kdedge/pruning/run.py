"""Prune a trained model to a measured budget, recovering by distillation from the unpruned original.

The loop (:func:`prune`): the budget (``speedup``, ``latency_budget`` or ``flops_ratio``) is split
into ``steps`` geometric steps. Each step removes channels until the model's *measured* cost is
within that step's target, then recovers with ``step_epochs`` of distillation (the last step with
the full ``epochs``) from the teacher — the unpruned model unless ``teacher`` is given — and its
cached logits. Which channels go is decided per step by latency-aware allocation
(:func:`_plan`): every group's latency per channel is measured on the target (a variant with the
group halved, timed interleaved with the current model and the anchor), and channels are removed
in chunks of ``round_to`` in order of importance per unit of measured latency saved, so a layer
that costs time but little accuracy goes first, and one whose width does not change the
runtime's kernels is left alone. The importance criterion is chosen on the validation split
(``criterion auto``: each one prunes step 1 and recovers briefly; the best on validation goes on),
and so is the allocation (``allocation auto``): the best criterion also prunes step 1 with every
group narrowed by the same share (``uniform``). Latency per channel alone favours the groups that
span the most layers — a residual stream — and on a ResNet-20 at 2× it cut the last stage's stream
from 64 to 8 channels; the uniform plan is the measured alternative, not a fixed rule.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdedge.distributed as dist_
from kdedge._fs import Claim, partial_dir
from kdedge.config import PruneConfig
from kdedge.data import DataSplits, hold_out
from kdedge.data.normalization import Normalization
from kdedge.distill.loop import resolve_device
from kdedge.tblog import sub_dir
from kdedge.errors import ConfigError, KdedgeError, ModelError
from kdedge.models.pruned import layer_shapes, narrowed_layers
from kdedge.models.qat import QATModel
from kdedge.models.zoo import ModelSpec, count_flops, count_parameters, load_checkpoint, runs_outside_torch, save_checkpoint
from kdedge.pruning.graph import CRITERIA, ChannelGraph
from kdedge.runs import RunResult, _output, distill

__all__ = ["BudgetUnreachable", "PruneResult", "prune"]

#: How a step spreads its removals over the groups: by importance per measured µs saved, or the same share from every group.
ALLOCATIONS = ("latency", "uniform")

STATE_FILE = "prune-step.safetensors"  # in OUT.partial: the model after its last finished step, and the record so far
RESUMABLE = ("checkpoint.pt", STATE_FILE)  # a prune run resumes from its final recovery's checkpoint or its last finished step


class BudgetUnreachable(ConfigError):
    """The narrowest model the pruner can make misses the budget (found before anything is trained).

    Attributes:
        reachable_speedup: With a latency budget, the narrowest model's measured speedup over the original (else None).
    """

    def __init__(self, message: str, *, reachable_speedup: float | None = None) -> None:
        super().__init__(message)
        self.reachable_speedup = reachable_speedup


@dataclass
class PruneResult:
    """What :func:`prune` produced.

    Attributes:
        model: The pruned, recovered model.
        spec: Its spec: the base architecture and the kept widths (None when the input had no spec).
        run: The final recovery's run (test and validation accuracy, history, metrics).
        record: How it was pruned: criterion (and every criterion's validation accuracy), budget,
            steps, widths per layer before and after, measured cost before and after.
        out: The run directory written, if any.
    """

    model: nn.Module
    spec: ModelSpec | None
    run: RunResult
    record: dict[str, Any]
    out: Path | None = None


class _Cost:
    """The model's cost as the budget counts it: its p50 on the target (as a ratio to the anchor, timed in the same group) or its FLOPs."""

    def __init__(self, config: PruneConfig, data: DataSplits, log: Callable[[str], None]) -> None:
        self.kind = "flops" if config.flops_ratio is not None else "latency"
        self.shape = tuple(data.spec.input_shape)
        self.meter = None
        if self.kind == "latency":
            from kdedge.search.latency import LatencyMeter

            inputs = data.test.batch_of(max(8, config.target_batch))
            self.meter = LatencyMeter(inputs, num_classes=data.spec.num_classes, target=config.target, threads=config.target_threads,
                                      batch=config.target_batch, cache=None, log=log)
        self._spec = ModelSpec("pruned", 1.0, data.spec.num_classes, self.shape)  # type: ignore[arg-type]
        self.known: dict[tuple, float] = {}  # widths -> cost: latency depends on the widths, not on which channels were kept
        self.original: nn.Module | None = None  # set by reference(): what relative() times each model against
        self.original_cost = 0.0

    def __call__(self, models: dict[str, nn.Module], *, again: bool = False, shipped: bool = False) -> dict[str, float]:
        """Cost per model; ``again`` re-times every one of them in one interleaved set (a head-to-head comparison).

        Trials are timed on TorchScript's ONNX export (fast; see :mod:`kdedge.search.latency`); ``shipped`` times the export that
        ships (torch.export's), for the numbers a run reports. Either way every model of one set is exported alike.
        """
        keys = {n: tuple(sorted(layer_shapes(m).items())) for n, m in models.items()}
        todo = {n: copy.deepcopy(m).cpu().eval() for n, m in models.items() if again or shipped or keys[n] not in self.known}
        if todo and self.meter is None:
            measured = {n: float(count_flops(m, self.shape)) for n, m in todo.items()}
        elif todo:
            timed = self.meter.measure({n: self._spec for n in todo}, modules=todo, exporter="dynamo" if shipped else "torchscript",
                                       remeasure=False)  # the models of one set are compared with each other: keep them together
            measured = {n: float(r["ratio"]) for n, r in timed.items()}
        else:
            measured = {}
        for n, c in measured.items():
            if not shipped:
                self.known.setdefault(keys[n], c)
        return {n: measured[n] if n in measured else self.known[keys[n]] for n in models}

    def shipped_export_works(self, model: nn.Module) -> None:
        """Export ``model`` as it ships, once, before any trial: a model only TorchScript can trace fails here, not after recovery."""
        if self.meter is not None and self.meter.target != "torch-cpu":
            import tempfile

            from kdedge.exporters.onnx import export_onnx

            with tempfile.TemporaryDirectory() as work:
                export_onnx(copy.deepcopy(model).cpu().eval(), Path(work) / "original.onnx", input_shape=self.shape)

    def reference(self, original: nn.Module, cost: float) -> None:
        """The unpruned model and its cost: :meth:`relative` times every decision against it."""
        self.original, self.original_cost = original, cost  # never timed in place: __call__ times a CPU copy of every model

    def relative(self, model: nn.Module) -> float:
        """``model``'s cost timed head to head with the original (one interleaved set), in the original's units.

        A ratio to the anchor alone still moves when the machine's load slows a large model more
        than the small anchor; the budget is a ratio to the original, so each decision is timed
        against it. Never cached: the widths' first timing may have been the noisy one.
        """
        if self.meter is None or self.original is None:
            return self({"model": model})["model"]
        both = self({"model": model, "original": self.original}, again=True)
        return both["model"] / both["original"] * self.original_cost

    def ms(self, cost: float) -> float | None:
        """A cost in milliseconds (latency budgets), None for FLOPs."""
        return cost * self.meter.anchor_p50_ms if self.meter is not None else None


def prune(
    model: nn.Module,
    data: DataSplits,
    *,
    config: PruneConfig | None = None,
    spec: ModelSpec | None = None,
    teacher: nn.Module | None = None,
    teacher_name: str | None = None,
    teacher_input: Normalization | None = None,
    out: str | Path | Claim | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    trust_code: bool = False,
) -> PruneResult:
    """Prune ``model``'s channels to ``config``'s budget and recover by distillation from the original.

    Args:
        model: A trained classifier (not modified: a copy is pruned).
        data: Training, test and (held out when missing: ``val_split`` or 0.1) validation splits.
        config: Budget, target, criterion, steps and the recovery recipe (every ``kdedge distill`` field).
        spec: ``model``'s spec (zoo name, genome or factory): the pruned checkpoint then records its base
            and kept widths, and reloads by name. Without one it stores weights only.
        teacher: The recovery teacher; default: the unpruned ``model``.
        teacher_name: Recorded in ``metrics.json``.
        teacher_input: The teacher's input normalization when it differs from the data's.
        out: Run directory to write (``model.safetensors``, ``metrics.json`` with a ``pruning`` record); None writes nothing.
        progress: Progress bars during recovery.
        log: Called with one line per pruning decision.
        trust_code: ``--resume`` of a pruned factory model rebuilds it by running that factory.

    Raises:
        ConfigError: The budget cannot be reached (the message gives the narrowest model's measured cost).
        ModelError: The model cannot be traced or pruned (the layer is named, with ``--ignore-layers``).
    """
    config = config or PruneConfig(speedup=2.0)
    if runs_outside_torch(model):
        raise ModelError("an ONNX model cannot be pruned: its channels are not PyTorch parameters; prune the PyTorch model it was exported from")
    if (spec is not None and spec.qat) or isinstance(model, QATModel):
        raise ModelError("a quantization-aware model cannot be pruned (its layers are a prepared INT8 graph); prune the FP32 model it was "
                         "trained from, then run kdedge distill --qat on the pruned one")
    if config.resume and out is None and config.out is None:
        raise ConfigError("--resume needs the --out of the run to continue")
    out = out if out is not None else config.out
    with _output(out, resume=config.resume, checkpoint=RESUMABLE) as claim:
        return _prune(model, data, config=config, spec=spec, teacher=teacher, teacher_name=teacher_name, teacher_input=teacher_input,
                      out=claim, progress=progress, log=log or (lambda _line: None), trust_code=trust_code)


def _prune(model: nn.Module, data: DataSplits, *, config: PruneConfig, spec: ModelSpec | None, teacher: nn.Module | None, teacher_name: str | None,
           teacher_input: Normalization | None, out: Claim | Path | None, progress: bool, log: Callable[[str], None], trust_code: bool) -> PruneResult:
    t0 = time.perf_counter()
    if data.val is None:
        data = hold_out(data, config.val_split or 0.1)
    ctx = dist_.context()
    original = copy.deepcopy(model).cpu().eval().requires_grad_(True)  # a frozen teacher becomes a trainable student
    teacher = teacher if teacher is not None else original
    teacher_name = teacher_name or "the unpruned model"
    base_spec = spec.with_layers(None) if spec is not None else None
    base = original if spec is None or not spec.pruned else _build_base(base_spec)  # the widths are recorded against the unpruned architecture
    cost = _Cost(config, data, log) if ctx.is_main else None
    shape = tuple(data.spec.input_shape)

    state = _read_state(out, config, trust_code=trust_code) if config.resume else None
    record: dict[str, Any]
    if state is not None:
        current, record = state
        log(f"prune: resuming after step {len(record['steps'])} of {config.steps} from {partial_dir(_path(out))}"  # type: ignore[arg-type]
            + (" (pruned; its final recovery goes on)" if record.get("final") else ""))
    else:
        current = copy.deepcopy(original)
        ChannelGraph(current, shape, ignore=config.ignore_layers)  # bad input (untraceable, unrecordable, nothing to prune) fails before any timing
        record = {"base": base_spec.to_dict() if base_spec else None, "budget": _budget(config), "criterion": None, "criteria": {}, "steps": [],
                  "allocation": None, "settings": {"steps": config.steps, "round_to": config.round_to, "ignore_layers": list(config.ignore_layers),
                                                   "allocation": config.allocation}}

        def first() -> dict[str, Any]:
            cost.shipped_export_works(original)  # type: ignore[union-attr]  # trials time TorchScript's file; the result needs the shipped one
            c = cost({"original": original})["original"]  # type: ignore[misc]
            record["original"] = {"cost": c, "p50_ms": cost.ms(c), "flops": count_flops(original, shape), "params": count_parameters(original)}  # type: ignore[union-attr]
            record["target_cost"] = _target_cost(config, c, cost)  # type: ignore[arg-type]
            _check_reachable(original, record, config, cost, shape)  # type: ignore[arg-type]
            return record

        record = _decide(first)
    target, c0 = record["target_cost"], record["original"]["cost"]
    if cost is not None:
        cost.reference(original, c0)

    def spec_of(m: nn.Module) -> ModelSpec | None:
        return base_spec.with_layers(narrowed_layers(base, m)) if base_spec is not None else None

    for step in range(len(record["steps"]) + 1, config.steps):  # every step but the last: prune, recover, keep the state
        t_step = time.perf_counter()
        step_target = c0 * (target / c0) ** (step / config.steps)
        current = _prune_step(current, record, step, step_target, teacher, data, config, cost, shape, log, teacher_input)
        pruned_s = time.perf_counter() - t_step
        step_run = None
        if config.step_epochs:
            cfg = dataclasses.replace(config, epochs=config.step_epochs, out=None, resume=False, log_dir=sub_dir(config.log_dir, f"step{step}"))
            step_run = distill(current, teacher, data.train, None, val_data=data.val, config=cfg, teacher_input=teacher_input, progress=progress)
        record["steps"].append(_step_row(step, step_target, current, cost, shape, step_run, pruned_s, time.perf_counter() - t_step))
        record = _shared(record)
        log(f"prune: step {step}/{config.steps}: {_fmt_row(record['steps'][-1])}")
        if out is not None and ctx.is_main and spec_of(current) is not None:
            _write_state(out, current, spec_of(current), record, data)

    if not record.get("final"):  # the last step: prune to the budget, time the result against the original, and keep it before recovering
        t_step = time.perf_counter()
        current = _prune_step(current, record, config.steps, target, teacher, data, config, cost, shape, log, teacher_input)
        pruned_s = time.perf_counter() - t_step
        record = _decide(lambda: _finish_record(record, config.steps, target, current, cost, shape, pruned_s, original))  # type: ignore[arg-type]
        record["seconds_pruning"] = sum(r["prune_seconds"] for r in record["steps"])
        record["final"] = True
        if out is not None and ctx.is_main and spec_of(current) is not None:
            _write_state(out, current, spec_of(current), record, data)  # a killed final recovery resumes on this very architecture
    resume_final = config.resume and out is not None and (partial_dir(_path(out)) / "checkpoint.pt").is_file()
    spec_final = spec_of(current)
    run = distill(current, teacher, data.train, data.test, val_data=data.val,
                  config=dataclasses.replace(config, resume=resume_final, log_dir=sub_dir(config.log_dir, "final")),
                  student_spec=spec_final, teacher_name=teacher_name, teacher_input=teacher_input, out=out, progress=progress,
                  extra_metrics={"pruning": {k: v for k, v in record.items() if k != "final"}})
    if out is not None and ctx.is_main:
        (partial_dir(_path(out)) / STATE_FILE).unlink(missing_ok=True)  # the run is complete: nothing to resume
    record.pop("final", None)
    record["seconds"] = time.perf_counter() - t0
    return PruneResult(model=current, spec=spec_final, run=run, record=record, out=run.out)


def _prune_step(current: nn.Module, record: dict[str, Any], step: int, step_target: float, teacher: nn.Module, data: DataSplits, config: PruneConfig,
                cost: _Cost | None, shape: tuple[int, ...], log: Callable[[str], None], teacher_input: Normalization | None) -> nn.Module:
    if step == 1 and record["criterion"] is None:
        current, chosen, record["criteria"] = _choose_criterion(current, teacher, data, config, step_target, cost, shape, log, teacher_input)
        record["criterion"], record["allocation"] = chosen
    else:
        _prune_to(current, config, record["criterion"], step_target, cost, data, shape, log, allocation=record.get("allocation") or "latency")
    return current


def _build_base(spec: ModelSpec) -> nn.Module:
    """The unpruned architecture of ``spec`` (built once, without touching the global RNG: fresh and resumed runs draw the same numbers)."""
    from kdedge.models.zoo import create_model

    with torch.random.fork_rng(devices=[]):
        return create_model(spec)


def _decide(fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main rank and its result on every rank; an error there is raised on every rank (none waits forever)."""
    ctx = dist_.context()
    result = error = None
    if ctx.is_main:
        try:
            result = fn()
        except KdedgeError as exc:
            error = exc
    if ctx.enabled:
        result, error = _shared((result, error))
    if error is not None:
        raise error
    return result


def _path(out: Claim | Path | None) -> Path:
    return out.path if isinstance(out, Claim) else Path(out)  # type: ignore[arg-type]


def _budget(config: PruneConfig) -> dict[str, Any]:
    if config.flops_ratio is not None:
        return {"flops_ratio": config.flops_ratio}
    return {("speedup" if config.speedup is not None else "latency_budget_ms"): config.speedup or config.latency_budget,
            "target": config.target, "threads": config.target_threads, "batch": config.target_batch}


def _target_cost(config: PruneConfig, original: float, cost: _Cost) -> float:
    if config.flops_ratio is not None:
        return original * config.flops_ratio
    if config.speedup is not None:
        return original / config.speedup
    return config.latency_budget / cost.meter.anchor_p50_ms  # type: ignore[operator, union-attr]


def _units(cost: _Cost, c: float) -> str:
    ms = cost.ms(c)
    return f"{ms * 1000:.1f} µs" if ms is not None else f"{c:,.0f} FLOPs"


def _describe(cost: _Cost, c: float, original: float) -> str:
    return f"{_units(cost, c)} ({original / c:.2f}× faster than the original)" if cost.kind == "latency" else \
        f"{_units(cost, c)} ({c / original:.3g} of the original's)"


def _check_reachable(original: nn.Module, record: dict[str, Any], config: PruneConfig, cost: _Cost, shape: tuple[int, ...]) -> None:
    """The narrowest model this pruner can make (every group at ``round_to`` channels) must meet the budget, or nothing is trained."""
    if record["original"]["cost"] <= record["target_cost"]:
        raise ConfigError(f"the original already meets the budget: it runs at {_units(cost, record['original']['cost'])}, the budget is "
                          f"{_units(cost, record['target_cost'])}; there is nothing to prune for — ask for a speedup or a smaller budget")
    narrowest = copy.deepcopy(original)
    graph = ChannelGraph(narrowest, shape, ignore=config.ignore_layers)
    graph.remove({n: list(range(g.channels - _min_keep(g.channels, config.round_to))) for n, g in graph.groups.items()})
    try:
        with torch.no_grad():
            narrowest.eval()(torch.zeros(1, *shape))
    except Exception as exc:  # a forward that hard-codes a width traces at full width and breaks once narrowed
        raise ModelError(f"the model fails once its channels are removed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "its forward may hard-code a channel count (x.view(-1, 128)): write it with flatten/shape, or keep those layers whole "
                         "with --ignore-layers") from exc
    c = cost({"narrowest": narrowest, "original": original}, again=True)
    c0 = record["original"]["cost"]
    best = c["narrowest"] / c["original"] * c0  # timed head to head with the original, in the original's measured units
    record["narrowest"] = {"cost": best, "p50_ms": cost.ms(best)}
    if best > record["target_cost"]:
        asked = _describe(cost, record["target_cost"], c0)
        raise BudgetUnreachable(f"the budget cannot be reached: it asks for {asked}, and the narrowest model this pruner makes (every group at "
                                f"{config.round_to} channels) runs at {_describe(cost, best, c0)}; "
                                "ask for less, lower --round-to, or start from a smaller architecture",
                                reachable_speedup=c0 / best if cost.kind == "latency" else None)


def _min_keep(channels: int, round_to: int) -> int:
    return min(channels, round_to)


def _choose_criterion(model: nn.Module, teacher: nn.Module, data: DataSplits, config: PruneConfig, step_target: float, cost: _Cost | None,
                      shape: tuple[int, ...], log: Callable[[str], None], teacher_input: Normalization | None
                      ) -> tuple[nn.Module, tuple[str, str], dict[str, float]]:
    """Step 1 with each criterion, then the best one with each other allocation, each recovered briefly (``criterion_epochs`` on
    ``criterion_samples`` images); the best ``(criterion, allocation)`` on validation goes on. Scores are keyed ``criterion`` for the
    first allocation and ``criterion+allocation`` for the others."""
    names = CRITERIA if config.criterion == "auto" else (config.criterion,)
    allocations = ALLOCATIONS if config.allocation == "auto" else (config.allocation,)
    if len(names) == 1 and len(allocations) == 1:
        _prune_to(model, config, names[0], step_target, cost, data, shape, log, allocation=allocations[0])
        return model, (names[0], allocations[0]), {}
    scores: dict[str, float] = {}
    models: dict[str, nn.Module] = {}
    proxy = dataclasses.replace(config, epochs=config.criterion_epochs, out=None, resume=False, log_dir=None)  # short trials: not logged
    train = data.train.take(min(config.criterion_samples, len(data.train)), seed=config.seed)

    def trial(name: str, allocation: str) -> str:
        key = name if allocation == allocations[0] else f"{name}+{allocation}"
        candidate = copy.deepcopy(model)
        _prune_to(candidate, config, name, step_target, cost, data, shape, log, allocation=allocation)
        run = distill(candidate, teacher, train, None, val_data=data.val, config=proxy, teacher_input=teacher_input, progress=False)
        scores[key] = float(run.val.accuracy)  # type: ignore[union-attr]
        models[key] = candidate
        log(f"prune: criterion {name}, {allocation} allocation: validation accuracy {scores[key]:.4f} after {config.criterion_epochs} epoch(s) "
            f"on {len(train)} images")
        return key

    keys = [trial(n, allocations[0]) for n in names]
    best_name = max(names, key=lambda n: (scores[n], -names.index(n)))
    keys += [trial(best_name, a) for a in allocations[1:]]
    best = max(keys, key=lambda k: (scores[k], -keys.index(k)))
    name, _, allocation = best.partition("+")
    return models[best], (name, allocation or allocations[0]), scores


def _taylor_grads(model: nn.Module, data: DataSplits, config: PruneConfig) -> Callable[[], None]:
    """Forward and backward of the cross-entropy on 512 training images (a stratified sample): gradients for the Taylor criterion."""
    def run() -> None:
        sub = data.train.take(min(512, len(data.train)), seed=config.seed)
        device = next(model.parameters()).device
        was = model.training
        model.eval()  # BatchNorm statistics stay as trained; the gradient is of the deployed function
        for i in range(0, len(sub), 128):
            rows = torch.arange(i, min(i + 128, len(sub)))
            x = sub.inputs(rows, device=device)
            y = sub.labels[rows].to(device)
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        model.train(was)
    return run


def _prune_to(model: nn.Module, config: PruneConfig, criterion: str, target: float, cost: _Cost | None, data: DataSplits, shape: tuple[int, ...],
              log: Callable[[str], None], *, allocation: str = "latency") -> None:
    """Remove channels from ``model`` (in place) until its measured cost is within ``target`` (in the cost's units).

    The measured slopes (:func:`_slopes`) and the importance order the removals (:func:`_plan`);
    how many of them to take is found by bisection on *measured* cost (each candidate timed; the
    meter remembers widths it has timed), so a slope that noise got wrong changes the order, never
    how far the step goes. Under DDP rank 0 measures and decides, and every rank removes the same channels.
    """
    def plan() -> dict[str, list[int]] | None:  # the main rank measures and decides
        assert cost is not None
        removed = None
        graph = ChannelGraph(model, shape, ignore=config.ignore_layers)
        now = cost({"model": model})["model"]
        if now > target:
            # uniform allocation needs no slopes: every group loses the same share of its channels
            slopes = _slopes(model, graph, now, cost, config, shape) if allocation == "latency" else {n: 1.0 for n in graph.groups}
            scores = graph.importance(criterion, grads_from=_taylor_grads(model, data, config) if criterion == "taylor" else None)
            chunks = _plan(graph, scores, slopes, config.round_to, allocation=allocation)

            def cut(k: int) -> nn.Module:
                trial = copy.deepcopy(model)
                ChannelGraph(trial, shape, ignore=config.ignore_layers).remove(_prefix(chunks, k))
                return trial

            hi = _settle(lambda k: cost.relative(cut(k)), target, len(chunks))
            removed = _prefix(chunks, hi)
            widths = ", ".join(f"{n} {graph.groups[n].channels}→{graph.groups[n].channels - len(k)}" for n, k in removed.items())
            log(f"prune: {criterion} ({allocation}): {_units(cost, now)} now, step target {_units(cost, target)}; removing {widths} "
                f"({hi} of {len(chunks)} chunks, found by bisection on cost measured against the original)")
        return removed

    removed = _decide(plan)
    if removed:
        ChannelGraph(model, shape, ignore=config.ignore_layers).remove(removed)


def _settle(cost_of: Callable[[int], float], target: float, n: int, *, checks: int = 4) -> int:
    """The fewest of ``n`` ordered removals whose measured cost meets ``target``: bisection, then a check of the answer's neighbours.

    ``cost_of(n)`` (the narrowest model) meets the target: the budget was checked reachable. Each
    bisection probe is one noisy timing, and a runtime's kernels make cost only roughly monotone in
    the removals, so one probe timed slow sends the search past the budget (a run measured 5.8×
    for a 4× budget). The answer is therefore re-timed: forward while it misses the target, then
    back while one removal fewer still meets it — at most ``2 * checks`` more timings.
    """
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    for _ in range(checks):
        if hi < n and cost_of(hi) > target:
            hi += 1  # one more removal: the safe direction, so a last step forward is kept even when the checks run out untimed
            continue
        if hi > 1 and cost_of(hi - 1) <= target:  # cost_of(0), the model before this step, misses: that is why it is pruned
            hi -= 1
            continue
        break
    return hi


def _prefix(chunks: list[tuple[str, list[int]]], k: int) -> dict[str, list[int]]:
    """The channels the first ``k`` chunks remove, per group."""
    out: dict[str, list[int]] = {}
    for name, idxs in chunks[:k]:
        out.setdefault(name, []).extend(idxs)
    return out


def _slopes(model: nn.Module, graph: ChannelGraph, now: float, cost: _Cost, config: PruneConfig, shape: tuple[int, ...]) -> dict[str, float]:
    """Measured cost saved per removed channel, per group: a probe with that group cut to half (rounded down to ``round_to``),
    timed interleaved with the anchor and compared with the model's own anchored cost. Latency depends on the widths, not on which channels
    go, so probes are criterion-independent and the meter's cache serves every criterion's trial."""
    q = config.round_to
    probes: dict[str, nn.Module] = {}
    cuts: dict[str, int] = {}
    for name, g in graph.groups.items():
        keep = max(_min_keep(g.channels, q), (g.channels // 2) // q * q)
        if keep < g.channels:
            probe = copy.deepcopy(model)
            cuts[name] = g.channels - keep
            ChannelGraph(probe, shape, ignore=config.ignore_layers).remove({name: list(range(cuts[name]))})
            probes[name] = probe
    costs = cost(probes)
    floor = 0.01 * now / sum(g.channels for g in graph.groups.values())  # a probe that timed slower (noise) still saves something per channel
    return {n: max((now - costs[n]) / cuts[n], floor) for n in cuts}


def _plan(graph: ChannelGraph, scores: dict[str, torch.Tensor], slopes: dict[str, float], q: int, *, allocation: str = "latency") -> list[tuple[str, list[int]]]:
    """Every removal this step could make, in order: ``(group root, channel indices)`` chunks, down to the narrowest model.

    Per group, chunks go down to the next multiple of ``q``, then ``q`` at a time, lowest
    importance first. Across groups, ``latency``: the chunk with the least summed importance per
    unit of measured saving (``slopes``) goes first; ``uniform``: the chunk that leaves its group
    the largest share of its channels goes first (every group narrows by the same ratio; importance
    breaks ties), so no group is cut far below the others.
    """
    order = {n: torch.argsort(s, stable=True).tolist() for n, s in scores.items()}  # lowest importance first
    heap: list[tuple[float, str, int]] = []  # (importance per unit saved, group, chunk end)
    removed = {n: 0 for n in slopes if n in graph.groups}
    chunks: list[tuple[str, list[int]]] = []

    def push(name: str) -> None:
        n, done = graph.groups[name].channels, removed[name]
        left = n - done
        nxt = max((left - 1) // q * q, _min_keep(n, q))  # down to the next multiple of q
        if nxt < left:
            chunk = order[name][done : done + (left - nxt)]
            per_unit = float(scores[name][chunk].sum()) / (slopes[name] * len(chunk))
            key = (done + len(chunk)) / n + 1e-9 * per_unit if allocation == "uniform" else per_unit
            heapq.heappush(heap, (key, name, done + len(chunk)))

    for name in removed:
        push(name)
    while heap:
        _, name, end = heapq.heappop(heap)
        chunks.append((name, order[name][removed[name] : end]))
        removed[name] = end
        push(name)
    return chunks


def _shared(obj: Any) -> Any:
    """``obj`` as the main rank has it, on every rank (a no-op outside DDP)."""
    if not dist_.context().enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _step_row(step: int, target: float, model: nn.Module, cost: _Cost | None, shape: tuple[int, ...], run: RunResult | None, pruned_s: float,
              seconds: float) -> dict[str, Any]:
    c = cost({"model": model})["model"] if cost is not None else None
    return {"step": step, "target_cost": target, "cost": c, "p50_ms": cost.ms(c) if cost is not None and c is not None else None,
            "flops": count_flops(model, shape), "params": count_parameters(model), "widths": {n: s[0] for n, s in layer_shapes(model).items()},
            "val_accuracy": run.val.accuracy if run is not None and run.val else None, "prune_seconds": pruned_s, "seconds": seconds}


def _fmt_row(row: dict[str, Any]) -> str:
    lat = f"p50 {row['p50_ms'] * 1000:.1f} µs, " if row.get("p50_ms") is not None else ""
    val = f", validation {row['val_accuracy']:.4f}" if row.get("val_accuracy") is not None else ""
    return f"{lat}{row['flops'] / 1e6:.2f} MFLOPs, {row['params']:,} params{val} ({row['seconds']:.0f} s)"


def _finish_record(record: dict[str, Any], step: int, target: float, model: nn.Module, cost: _Cost, shape: tuple[int, ...], pruned_s: float,
                   original: nn.Module) -> None:
    """The last step's row, the widths per layer and the result: the final model and the original timed head to head in one interleaved set."""
    cpu = copy.deepcopy(model).cpu().eval()
    both = cost({"original": original, "pruned": cpu}, again=True, shipped=True)
    c = both["pruned"] * record["original"]["cost"] / both["original"]
    # its validation accuracy is the run's own (metrics.json "val"): the final recovery comes after this row is written
    row = {"step": step, "target_cost": target, "cost": c, "p50_ms": cost.ms(both["pruned"]), "flops": count_flops(cpu, shape),
           "params": count_parameters(cpu), "widths": {n: s[0] for n, s in layer_shapes(cpu).items()}, "prune_seconds": pruned_s}
    record["steps"].append(row)
    before = layer_shapes(original)
    record["layers"] = {n: {"before": before[n][0], "after": w, "kept": round(w / before[n][0], 4)} for n, w in row["widths"].items()
                        if n in before and before[n][0] != w}
    record["result"] = {"kind": cost.kind, "flops": row["flops"], "params": row["params"], "original_flops": record["original"]["flops"],
                        "original_params": record["original"]["params"]}
    if cost.kind == "latency":  # both p50s from the head-to-head set (one anchor), so their ratio is the speedup
        record["result"] |= {"p50_ms": cost.ms(both["pruned"]), "original_p50_ms": cost.ms(both["original"]), "speedup": both["original"] / both["pruned"],
                             # met within the meter's noise: an interleaved re-timing of one model varies by about ±2 %
                             "met": bool(c <= record["target_cost"] * 1.02)}
    else:
        record["result"] |= {"flops_ratio": both["pruned"] / both["original"], "met": bool(both["pruned"] <= record["target_cost"])}
    return record


def _write_state(out: Claim | Path, model: nn.Module, spec: ModelSpec | None, record: dict[str, Any], data: DataSplits) -> None:
    """The model after a finished step and the record so far, in OUT.partial: ``--resume`` goes on from the next step."""
    from kdedge._fs import atomic_file

    part = partial_dir(_path(out))
    part.mkdir(parents=True, exist_ok=True)
    with atomic_file(part / STATE_FILE) as tmp:
        save_checkpoint(tmp, model, spec, data.spec, extra={"prune_record": json.dumps(record)})


def _read_state(out: Claim | Path | None, config: PruneConfig, *, trust_code: bool) -> tuple[nn.Module, dict[str, Any]] | None:
    if out is None:
        return None
    path = partial_dir(_path(out)) / STATE_FILE
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path, trust_code=trust_code)
    if not ckpt.spec.pruned or "prune_record" not in ckpt.extra:
        raise ModelError(f"{path}: is not a pruned checkpoint from a kdedge prune step, so --resume cannot go on from it; "
                         f"remove {path.parent} to start afresh")
    record = json.loads(ckpt.extra["prune_record"])
    now = {"budget": _budget(config), "steps": config.steps, "round_to": config.round_to, "ignore_layers": list(config.ignore_layers),
           "allocation": config.allocation}
    then = {"budget": record.get("budget"), "allocation": "latency", **(record.get("settings") or {})}  # runs from before the choice used the latency plan
    if then != now or len(record["steps"]) > config.steps or (len(record["steps"]) == config.steps and not record.get("final")):
        raise ConfigError(f"--resume: {path} was written with {then}, this run asks for {now}; resume with the original settings")
    return ckpt.model.to(resolve_device(config.device)), record
