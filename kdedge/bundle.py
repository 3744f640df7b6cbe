"""Deployment bundles: distill -> export -> benchmark -> gate -> one verifiable directory.

A bundle is built in a temporary sibling directory and renamed into place only when every gate
passes, so a run killed at any moment leaves either a whole bundle or none. A run that fails a
gate keeps its candidate under ``<out>.rejected`` for inspection and publishes nothing.

Layout::

    BUNDLE/
      manifest.json        what a deployment pipeline verifies (docs/bundle.md lists every key)
      models/              model.onnx, model.int8.onnx[, model.fp16.onnx, model.<p>.plan], export.json
      student.safetensors  the distilled student (weights + model and dataset specs)
      [student-qat.safetensors]  with --int8 qat|auto: the quantization-aware student the INT8 artifacts were built from
      config.yaml          the resolved config; `kdedge build --config` repeats the run
      report.json, report.md, report.html, plots/   the benchmark (report.html: tables and plots in one self-contained page;
                           plots/frontier.png: accuracy vs p50 on one target, the teacher, the budget line)
      predict.py           `python BUNDLE/predict.py IMAGE...`: the recommended CPU model on image files, with only
                           Pillow, numpy and onnxruntime (kdedge/bundle_files/predict.py, the consumer example of docs/bundle.md)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from importlib import resources
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge._fs import Claim, claimed, file_sha256, publish_dir
from kdedge._version import __version__
from kdedge.bench.harness import BenchModel, artifact_variant, benchmark
from kdedge.bench.report import write_report_files
from kdedge.bench.runners import TARGETS, target_available
from kdedge.bench.tuning import settings_call, time_within, tune
from kdedge.config import (
    PRUNE_TARGETS,
    TARGET_PRECISIONS,
    BenchConfig,
    CompressConfig,
    DistillConfig,
    ExportConfig,
    PruneConfig,
    QATConfig,
    SearchConfig,
    config_to_yaml,
)
from kdedge.data import DataSplits, hold_out, load_data_for
from kdedge.data.normalization import InputMap
from kdedge.data.pixels import InputFormat, input_format, recorded_input_format
from kdedge.distill.teacher import FrozenTeacher, teacher_input_map
from kdedge.errors import BackendUnavailable, ConfigError, ExportError, KdedgeError
from kdedge.exporters import ExportResult, export_model
from kdedge.tblog import sub_dir
from kdedge.exporters.edge import EDGE_FORMATS, edge_unavailable, export_edge
from kdedge.exporters.export import onnx_metadata
from kdedge.exporters.onnx import cpu_eval, export_onnx
from kdedge.exporters.quantize import quantize_int8
from kdedge.models.qat import scheme_parts
from kdedge.models.zoo import ModelSpec, count_flops, count_parameters, load_checkpoint, save_checkpoint, state_dict_sha256
from kdedge.pruning.run import BudgetUnreachable
from kdedge.resolve import ResolvedTeacher, resolve_student, resolve_teacher
from kdedge.runs import RunResult, distill

__all__ = ["MANIFEST_SCHEMA", "GateFailure", "VerifyError", "BundlePlan", "BundleResult", "compress_and_export", "plan_bundle", "resolve_auto",
           "installed_edge_formats", "verify_bundle", "recommend", "evaluate_gates", "fastest_target", "int8_choice", "qat_config_for"]

MANIFEST_SCHEMA = 1


class GateFailure(KdedgeError):
    """The candidate bundle missed a gate; nothing was published (the CLI exits with 3)."""

    exit_code = 3


class VerifyError(KdedgeError):
    """A bundle does not match its manifest."""


@dataclass
class BundleResult:
    out: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    archive: Path | None = None



def recommend(rows: list[dict[str, Any]], artifacts: list[dict[str, Any]], *, max_quant_drop: float,
              decided: tuple[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per target, the fastest student artifact (batch-1 p50) whose accuracy is within the gate of FP32.

    INT8 is not always faster — on a ~100 k-parameter CNN it can be slower — so this is decided
    by the measured rows, never by precision alone. ``decided`` (target, precision): a latency
    budget's decision chose that precision on that target; its artifact is recommended there.
    """
    fp32_acc = next((a["accuracy"]["accuracy"] for a in artifacts if a["format"] == "onnx" and a["precision"] == "fp32" and a.get("accuracy")), None)
    by_variant = {artifact_variant(a): a for a in artifacts if a.get("details", {}).get("for") != "tensorrt"}
    # With a validation split the choice is made on validation accuracy, as the gates are: the test split only reports.
    val_drop: dict[str, float] = {}
    for v, a in by_variant.items():
        acc = a.get("accuracy") or {}
        if "val_drop_vs_fp32_pt" in acc:
            val_drop[v] = acc["val_drop_vs_fp32_pt"]
        elif "val_accuracy" in acc and a["precision"] == "fp32":
            val_drop[v] = 0.0
    smallest = min((r["batch"] for r in rows), default=1)
    out: dict[str, dict[str, Any]] = {}
    for target in sorted({r["target"] for r in rows if r["role"] == "student" and r["variant"] in by_variant}):
        candidates = []
        for r in rows:
            if r["role"] != "student" or r["target"] != target or r["batch"] != smallest or r["variant"] not in by_variant:
                continue
            acc = (r.get("accuracy") or {}).get("top1")
            drop = val_drop.get(r["variant"]) if val_drop else (None if acc is None or fp32_acc is None else 100 * (fp32_acc - acc))
            ok = drop is None or drop <= max_quant_drop
            candidates.append((r["latency_ms"]["p50_ms"], r["variant"], acc, drop, ok, r))
        candidates.sort(key=lambda c: c[:2])  # by p50, then name: one row per variant at this batch
        chosen = decided is not None and decided[0] == target and any(by_variant[c[1]]["precision"] == decided[1] for c in candidates)
        if chosen:
            candidates = [c for c in candidates if by_variant[c[1]]["precision"] == decided[1]]  # type: ignore[index]
        passing = [c for c in candidates if c[4]]
        if not passing:
            continue
        p50, variant, acc, drop, _, row = passing[0]
        out[target] = {
            "artifact": f"models/{by_variant[variant]['path']}",
            "variant": variant,
            "batch": smallest,
            "p50_ms": p50,
            "threads": row.get("threads_used"),
            "accuracy": acc,
            "why": ("the latency budget's decision (manifest decision): %s; " % decided[1] if chosen else "")  # type: ignore[index]
            + "fastest at batch %d among variants within %.2g pt of FP32%s: %s" % (
                smallest, max_quant_drop, " on validation" if val_drop else "", ", ".join(f"{v} {t:.4f} ms{'' if ok else ' (fails accuracy)'}" for t, v, _, _, ok, _ in candidates)),
        }
    return out


def fastest_target(recommended: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Among the CPU targets' recommended artifacts, the one with the lowest batch-1 p50: the runtime to deploy on a CPU.

    With runtime tuning, the artifacts were timed head to head at their tuned settings, threads up
    to ``deploy_threads`` (``deploy_p50_ms``): that one interleaved measurement ranks them
    (``ranked_by: "head-to-head at tuned settings"``). Without it the targets were benchmarked one
    after another — on a machine whose speed drifts a margin of a few percent is not a ranking —
    each with ``--bench-threads`` or its runtime's default (recorded as ``threads``).
    """
    cpu = [target for target in recommended if TARGETS[target][1] == "cpu"]
    if not cpu:
        return None
    head = [t for t in cpu if "deploy_p50_ms" in recommended[t]]
    key = "deploy_p50_ms" if len(head) >= 2 else "p50_ms"
    ranked = sorted((recommended[t][key], t) for t in (head if key == "deploy_p50_ms" else cpu))
    p50, target = ranked[0]
    rec = recommended[target]

    def threads(r: dict[str, Any]) -> Any:  # the threads its p50 was measured at: the tuned settings' head to head, else the benchmark's
        s = (r.get("settings") or {}) if key == "deploy_p50_ms" else {}
        return s.get("threads", s.get("intra_op_threads", r.get("threads")))

    return {"target": target, "variant": rec["variant"], "artifact": rec["artifact"], "p50_ms": p50, "threads": threads(rec),
            "settings": rec.get("settings"), "ranked_by": "head-to-head at tuned settings" if key == "deploy_p50_ms" else "benchmark p50",
            "others": {t: {"variant": recommended[t]["variant"], "p50_ratio": p / p50, "threads": threads(recommended[t])} for p, t in ranked[1:]}}


def evaluate_gates(*, student_acc: float, teacher_acc: float, artifacts: list[dict[str, Any]], recommended: dict[str, dict[str, Any]],
                   rows: list[dict[str, Any]], config: CompressConfig, split: str = "test") -> dict[str, dict[str, Any]]:
    """Every gate with its measured value, its limit and whether it passed.

    ``student_acc``/``teacher_acc`` and the INT8 drops are on ``split``: ``"validation"`` when the
    run has a validation split (the artifacts then carry ``val_drop_vs_fp32_pt``), else ``"test"``.
    """
    gates: dict[str, dict[str, Any]] = {}
    retention = student_acc / teacher_acc if teacher_acc else 0.0
    gates["min_retention"] = {"value": retention, "limit": config.min_retention, "passed": retention >= config.min_retention,
                              "detail": f"student {student_acc:.4f} / teacher {teacher_acc:.4f} ({split} accuracy)"}
    key = "val_drop_vs_fp32_pt" if split == "validation" else "drop_vs_fp32_pt"
    # Every INT8 artifact the bundle ships, edge ones included: a deployment may pick any of them.
    drops = [(a["accuracy"][key], a["path"]) for a in artifacts if a["precision"] == "int8" and a.get("accuracy") and key in a["accuracy"]]
    if drops:
        worst, path = max(drops, key=lambda d: d[0])  # the first of equals
        gates["max_quant_drop"] = {"value": worst, "limit": config.max_quant_drop, "passed": worst <= config.max_quant_drop,
                                   "detail": f"worst INT8 accuracy drop vs FP32, points ({split} accuracy): {path}"}
    if config.min_speedup is not None:
        eager = {r["batch"]: r for r in rows if r["role"] == "teacher" and r["target"] == "torch-cpu" and r["variant"] == "torch-fp32"}
        best = None
        for target, rec in recommended.items():
            base = eager.get(rec["batch"])
            if base is not None:
                speedup = base["latency_ms"]["p50_ms"] / rec["p50_ms"]
                best = max(best or 0.0, speedup)
        gates["min_speedup"] = {"value": best, "limit": config.min_speedup, "passed": best is not None and best >= config.min_speedup,
                                "detail": "recommended artifact's batch-1 p50 vs the teacher in eager PyTorch on the CPU"}
    return gates


def _budget_gate(decision: dict[str, Any]) -> dict[str, Any]:
    """The decision's gate: the winner's p50 on the target against the budget, timed interleaved with every contender.

    The winner's file is the decision's (float input, batch 1, PTQ for INT8): the same architecture, precision and kernels as
    the shipped one, which the bundle exports again with its own settings and benchmarks (``recommended``)."""
    winner = decision["winner"]
    timed = [r for r in decision["rows"] if "p50_ms" in r]
    fastest = min(timed, key=lambda r: r["p50_ms"]) if timed else None
    row = winner or fastest
    where = f"on {decision['target']} at {decision['threads']} thread{'s' if decision['threads'] > 1 else ''}, batch 1"
    detail = (f"{row['contender']} {row['precision']} ({row['architecture']}) {where}, timed interleaved with every contender" if winner else
              f"no contender meets the budget {where}; the fastest, {row['contender']} {row['precision']} ({row['architecture']}), is kept "
              "for the record: raise --latency-budget" if row else f"no contender ran {where}")
    return {"value": row["p50_ms"] if row else None, "limit": decision["budget_ms"], "passed": winner is not None, "detail": detail}


#: Files whose bytes carry timings or timestamps; every other file is reproducible bit for bit, but for :data:`_UNSTABLE_SUFFIXES`.
_TIMING_FILES = ("models/export.json", "report.json", "report.md", "report.html", "plots/", "search/")
#: Artifacts whose converter lays out the same model differently on every run: onnxruntime's ORT-format serializer
#: (measured: three conversions of one ONNX file, three sha256s, the same operators and weights).
_UNSTABLE_SUFFIXES = (".ort",)


def _files_entry(root: Path, skip: set[str]) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in skip:
            continue
        deterministic = not any(rel == t or (t.endswith("/") and rel.startswith(t)) for t in _TIMING_FILES) and not rel.endswith(_UNSTABLE_SUFFIXES)
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": file_sha256(path), "deterministic": deterministic})
    return files


def _rejected_path(out: Path) -> Path:
    candidate = out.with_name(out.name + ".rejected")
    if candidate.exists():
        candidate = out.with_name(f"{out.name}.rejected-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    return candidate


def _archive_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".tar.gz")


def _write_archive(bundle: Path) -> Path:
    """``<bundle>.tar.gz`` with the bundle directory as its single top-level entry, written atomically; never over an existing file.

    Raises:
        ConfigError: The archive's name was taken while the bundle was built (it was free when the run started).
    """
    archive = _archive_path(bundle)
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(bundle, arcname=bundle.name)
        try:
            os.link(tmp, archive)  # unlike a rename, a link never replaces: an archive that appeared meanwhile is kept
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links (SMB, exFAT): an exclusive create and a copy
            with open(archive, "xb") as dst, open(tmp, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    except FileExistsError:
        raise ConfigError(f"{archive} appeared while the bundle was built and was left as it is; the bundle is complete in {bundle} — "
                          f"archive it with: tar -czf <name>.tar.gz -C {bundle.parent} {bundle.name}") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {archive} ({exc.strerror}); the bundle is complete in {bundle} — archive it with: "
                          f"tar -czf <name>.tar.gz -C {bundle.parent} {bundle.name}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return archive


def resolve_auto(config: CompressConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The formats and targets ``auto`` means on this machine (see :class:`CompressConfig`); with ``latency_budget``, ``auto`` also takes
    ``target`` and its edge format (FP32 and INT8), so the decided file ships and is benchmarked where it was chosen."""
    import importlib.util

    cuda = torch.cuda.is_available()
    # (an engine with its preprocessing in the graph is not built yet: uint8 input leaves TensorRT out of auto)
    trt = cuda and importlib.util.find_spec("tensorrt") is not None and config.input_format == "float"
    edge = installed_edge_formats() if config.edge else ()
    formats = config.formats
    if formats == ("auto",):
        formats = ("onnx", "onnx-int8") + (("onnx-fp16",) if cuda else ()) + (("tensorrt",) if trt else ())
        formats += tuple(f for name in edge for f in (name, f"{name}-int8"))
    targets = config.targets
    if targets == ("auto",):
        targets = ("torch-cpu", "ort-cpu") + (("torch-cuda",) if cuda else ()) + (("trt",) if trt else ())
        targets += tuple(EDGE_FORMATS[name].target for name in edge)
    if config.latency_budget is not None:  # the budget's target ships its own files and is benchmarked, whatever auto took
        runtime = TARGETS[config.target][0]
        fmt = "onnx" if runtime == "onnxruntime" else runtime if runtime in EDGE_FORMATS else None
        needed = () if fmt is None else (fmt, f"{fmt}-int8") if "int8" in TARGET_PRECISIONS[config.target] else (fmt,)
        if config.formats == ("auto",):
            formats += tuple(f for f in needed if f not in formats)
        elif missing := [f for f in needed if f not in formats]:
            raise ConfigError(f"--target {config.target}: the decision ships its {' or '.join(needed)} file, and --formats lacks {', '.join(missing)}; "
                              "add it to --formats (or leave formats auto)")
        if config.targets == ("auto",):
            targets += (config.target,) if config.target not in targets else ()
        elif config.target not in targets:
            raise ConfigError(f"--target {config.target}: the decided file is benchmarked there, and --targets lacks it; add it to --targets "
                              "(or leave targets auto)")
    return formats, targets


def installed_edge_formats() -> tuple[str, ...]:
    """The edge formats whose runtimes are installed here (ORT format always is, with onnxruntime)."""
    return tuple(name for name in EDGE_FORMATS if edge_unavailable(name) is None)


@dataclass
class BundlePlan:
    """A bundle build resolved and checked before any training is paid for.

    Attributes:
        teacher_bench: The teacher as the benchmark measures it: a PyTorch module behind its input
            map and its ONNX artifacts (exported, parity-checked, during planning), or an ONNX
            teacher's own file run in onnxruntime.
    """

    config: CompressConfig
    distill_config: DistillConfig
    formats: tuple[str, ...]
    targets: tuple[str, ...]
    data: DataSplits
    teacher: ResolvedTeacher
    student: nn.Module
    student_spec: ModelSpec
    teacher_bench: BenchModel
    search: Path | None = None  # with --latency-budget: the search directory that chose the student
    pruning: dict[str, Any] | None = None  # with --prune: how the teacher was pruned into the student (kdedge.prune's record)
    decision: dict[str, Any] | None = None  # with --latency-budget: every contender as measured on the target, and the one shipped


def plan_bundle(config: CompressConfig, *, work: Path, trust_code: bool = False, log: Callable[[str], None] | None = None) -> BundlePlan:
    """Resolve data, teacher and student, and check every later stage's preconditions.

    Runtimes for the targets, gates that can be measured with this teacher, batch sizes an ONNX
    teacher accepts, the student's graph exporting to ONNX (checked on its untrained weights: the
    graph is the same after training) and the teacher's own export all fail here, in one line,
    instead of after distillation.

    Args:
        work: A directory for the teacher's ONNX artifacts; it must outlive the benchmark.
    """
    log = log or (lambda _line: None)
    formats, targets = resolve_auto(config)
    for target in targets:
        why = target_available(target)
        if why:
            raise BackendUnavailable(why)
    if config.latency_budget is not None:  # the decision's target: every contender is exported to it and run there
        if why := target_available(config.target):
            raise BackendUnavailable(f"--target {why}")
        runtime = TARGETS[config.target][0]
        if runtime in EDGE_FORMATS and (why := edge_unavailable(runtime, purpose="export")):
            raise BackendUnavailable(f"--target {config.target}: {why}")
    data = load_data_for(config)
    pixels = input_format(config.input_format, data.spec)  # uint8 pixels need 8-bit data: refused before training, not at the export
    teacher = resolve_teacher(config.teacher, data.spec, weights=config.teacher_weights, trust_code=trust_code)
    if config.prune is not None:  # the student is the teacher, pruned: its graph is the teacher's with fewer channels
        student, student_spec = _prunable_teacher(config, teacher, data)
    else:
        student, student_spec = resolve_student(config.student, data.spec, config.seed, weights=config.student_weights,
                                                flops_budget=config.flops_budget, trust_code=trust_code)
    distill_cfg = DistillConfig(**{k: v for k, v in config.to_dict().items() if k in DistillConfig.__dataclass_fields__} | {"out": None})
    _check_measurable(config, teacher, targets)
    _check_edge_targets(formats, targets)
    _check_student_exports(student, student_spec, data, formats, work, log, batch_sizes=config.batch_sizes, fmt=pixels)
    if config.int8 != "ptq":
        _check_quantization_aware(student if config.latency_budget is None else None, student_spec, data, config, distill_cfg, log)
    if config.keep_float is not None:
        _check_keep_float(formats)
    input_map = teacher_input_map(distill_cfg, teacher.input, data.spec)
    teacher_bench = _teacher_bench(teacher, input_map, data, targets, work, log, batch_sizes=config.batch_sizes)
    return BundlePlan(config, distill_cfg, formats, targets, data, teacher, student, student_spec, teacher_bench)


def _prunable_teacher(config: CompressConfig, teacher: ResolvedTeacher, data: DataSplits) -> tuple[nn.Module, ModelSpec]:
    """``--prune``: the teacher as the student to prune, checked now (traceable, recordable, something to prune) rather than after timing."""
    from kdedge.pruning.graph import ChannelGraph

    if teacher.is_onnx:
        raise ConfigError(f"--prune prunes the teacher, and {teacher.path} is an ONNX file (its channels are not PyTorch parameters); "
                          "pass the PyTorch checkpoint it was exported from as --teacher")
    from kdedge.pruning import check_input

    check_input(teacher, data.spec)
    ChannelGraph(copy.deepcopy(teacher.model).cpu(), tuple(data.spec.input_shape), ignore=config.prune_ignore_layers)
    return teacher.model, teacher.spec


def _pruned_student(plan: BundlePlan, *, progress: bool, log: Callable[[str], None],
                    budget: dict[str, Any] | None = None) -> tuple[BundlePlan, RunResult]:
    """``--prune SPEEDUP``: the student is the teacher pruned to that measured speedup (onnxruntime on the CPU, ``bench_threads``
    threads, default 1, batch 1) and recovered by distillation from it with this run's recipe (:func:`kdedge.prune`).
    ``budget`` replaces the speedup and target (``{"speedup"|"latency_budget": ..., "target": ...}``; a decision's contender)."""
    from kdedge.pruning import prune

    config = plan.config
    if plan.data.val is None:  # held out here, as kdedge prune would, so the manifest describes the data the student saw
        plan = dataclasses.replace(plan, data=hold_out(plan.data, 0.1))
    fields = {k: v for k, v in vars(config).items() if k in DistillConfig.__dataclass_fields__ and k not in ("out", "resume", "teacher", "student")}
    threads = (config.bench_threads or 1) if budget is None else config.deploy_threads  # --prune's measurement, or the deployment's
    budget = budget or {"speedup": config.prune, "target": "ort-cpu"}
    prune_cfg = PruneConfig(**fields | budget | {"model": config.teacher, "target_threads": threads,
                                        "target_batch": 1, "criterion": config.prune_criterion, "allocation": config.prune_allocation, "steps": config.prune_steps,
                                        "step_epochs": config.prune_step_epochs, "round_to": config.prune_round_to,
                                        "ignore_layers": config.prune_ignore_layers, "lr": config.prune_lr})
    found = prune(plan.teacher.model, plan.data, config=prune_cfg, spec=plan.teacher.spec, teacher_name=plan.teacher.name,
                  teacher_input=plan.teacher.input, progress=progress, log=log)
    assert found.spec is not None  # the teacher of a bundle has a spec
    record = {k: found.record.get(k) for k in ("criterion", "allocation", "criteria", "budget", "result", "layers", "original", "seconds")}
    record["steps"] = [{k: v for k, v in row.items() if k != "widths"} for row in found.record["steps"]]
    plan = dataclasses.replace(plan, student=found.model, student_spec=found.spec, pruning=record)
    return plan, found.run


def _edge_max_batch(batch_sizes: tuple[int, ...]) -> int:
    """The largest batch an ExecuTorch or LiteRT artifact must take: the export's default, or the largest benchmarked batch."""
    return max(ExportConfig().edge_max_batch, *batch_sizes)


def _check_batch_contract(whose: str, name: str, details: dict[str, Any], batch_sizes: tuple[int, ...]) -> None:
    """ConfigError when an edge artifact's batch contract (``{"fixed": B}`` or ``{"max": M}``) excludes a benchmarked batch size."""
    batch = details.get("batch")
    if not isinstance(batch, dict):  # OpenVINO and ORT format keep the ONNX's symbolic batch: any size
        return
    takes = (lambda b: b == batch["fixed"]) if "fixed" in batch else (lambda b: b <= batch.get("max", b))
    if not all(takes(b) for b in batch_sizes):
        raise ConfigError(f"{whose} {EDGE_FORMATS[name].title} artifact takes batch {batch}, so it cannot be benchmarked at "
                          f"--batch-sizes {','.join(map(str, batch_sizes))}; pass batch sizes it takes, or leave {name} out of --formats")


def _check_edge_targets(formats: tuple[str, ...], targets: tuple[str, ...]) -> None:
    """An edge target benchmarks the bundle's artifacts of its format: the format must be among ``formats``."""
    missing = [t for t in targets if TARGETS[t][0] in EDGE_FORMATS and not {TARGETS[t][0], f"{TARGETS[t][0]}-int8"} & set(formats)]
    if missing:
        names = [TARGETS[t][0] for t in missing]
        raise ConfigError(f"targets {', '.join(missing)} run the bundle's {', '.join(names)} artifacts, but formats are {', '.join(formats)}; "
                          f"add {', '.join(names)} to --formats, or pass --edge with formats auto")


def _check_student_exports(student: nn.Module, spec: ModelSpec, data: DataSplits, formats: tuple[str, ...], work: Path, log: Callable[[str], None],
                           *, batch_sizes: tuple[int, ...] = (1,), fmt: InputFormat | None = None) -> None:
    """The untrained student through every format: the graph, the quantizers, the FP16 cast and the edge converters do not depend on the weights.

    Parity and accuracy do, so they are checked on the trained student only. Edge formats are
    checked in FP32 (their INT8 paths quantize the same graph), and each artifact's batch
    contract against the batch sizes the benchmark will time. With ``fmt`` a uint8 format, the graph is the one shipped:
    the student behind its preprocessing, taking pixels.
    """
    log(f"preflight: the {spec.name} student's graph through " + ", ".join(f for f in formats if f != "tensorrt"))
    fmt = fmt or input_format("float", data.spec)
    shape = fmt.shape(tuple(data.spec.input_shape))
    meta = onnx_metadata(data.spec, model_name=spec.name, source_sha256=None, fmt=fmt)
    with cpu_eval(student) as plain:
        model = fmt.wrap(plain).eval()
        fp32 = export_onnx(model, work / "student.onnx", input_shape=shape)
        if "onnx-int8" in formats:
            quantize_int8(fp32.path, work / "student.int8.onnx", calibration=fmt.feed(data.train.sample(32).numpy()))
        if "onnx-fp16" in formats:
            export_onnx(model, work / "student.fp16.onnx", input_shape=shape, precision="fp16")
        for name in (n for n in EDGE_FORMATS if {n, f"{n}-int8"} & set(formats)):
            details = export_edge(name, out=work / f"student{EDGE_FORMATS[name].suffix}", precision="fp32", model=model, onnx=fp32.path,
                                  input_shape=shape, metadata=meta, max_batch=_edge_max_batch(batch_sizes))
            _check_batch_contract(f"the {spec.name} student's", name, details, batch_sizes)


def _check_quantization_aware(student: nn.Module | None, spec: ModelSpec, data: DataSplits, config: CompressConfig, distill_cfg: DistillConfig,
                              log: Callable[[str], None]) -> None:
    """``--int8 qat|auto``: a valid QAD config, the quantizer installed, and the student (None: a searched one, not known yet)
    captured and prepared by it. (That the formats hold an INT8 one is :class:`CompressConfig`'s check.)"""
    from kdedge.models.qat import QATModel, _quantizer, _torchao

    qat_config_for(config, distill_cfg)  # its problems now, not after the distillation
    if student is None:
        _torchao()
        _quantizer(config.qat_scheme)
    else:  # preparing the student imports and builds both
        log(f"preflight: the {spec.name} student prepared for quantization-aware training ({config.qat_scheme})")
        QATModel(student, tuple(data.spec.input_shape), scheme=config.qat_scheme)


def _check_keep_float(formats: tuple[str, ...]) -> None:
    """``--keep-float``: an INT8 format to keep layers of, and the quantizer the sensitivity pass simulates with (ExecuTorch's)."""
    from kdedge.models.qat import _quantizer, _torchao

    if not any(f.endswith("-int8") for f in formats):
        raise ConfigError(f"--keep-float keeps layers of the INT8 artifacts in float, but the formats ({', '.join(formats)}) hold no INT8 one; "
                          "add onnx-int8 (or an edge format's -int8), or drop --keep-float")
    _torchao()
    _quantizer("xnnpack", qat=False)


def _check_measurable(config: CompressConfig, teacher: ResolvedTeacher, targets: tuple[str, ...]) -> None:
    """The gates and batch sizes must be measurable with this teacher on these targets."""
    if config.min_speedup is not None and (teacher.is_onnx or "torch-cpu" not in targets):
        why = "the teacher is an ONNX file" if teacher.is_onnx else "torch-cpu is not among the targets"
        raise ConfigError(f"--min-speedup compares with the teacher in eager PyTorch on the CPU, and {why}; "
                          "drop --min-speedup, or " + ("give a PyTorch teacher" if teacher.is_onnx else "add torch-cpu to --targets"))
    fixed = getattr(teacher.model, "fixed_batch", None)
    if fixed is not None and any(b != fixed for b in config.batch_sizes) and any(TARGETS[t][0] == "onnxruntime" for t in targets):
        raise ConfigError(f"{teacher.name} has a fixed batch size of {fixed}, so it cannot be benchmarked at batch "
                          f"{','.join(map(str, config.batch_sizes))}; pass --batch-sizes {fixed}, or export the teacher with a dynamic batch dimension")


def _teacher_bench(teacher: ResolvedTeacher, input_map: InputMap | None, data: DataSplits, targets: tuple[str, ...], work: Path,
                   log: Callable[[str], None], *, batch_sizes: tuple[int, ...] = (1,)) -> BenchModel:
    """The teacher for the benchmark; a PyTorch teacher is exported (parity-checked) now, while failing is cheap."""
    if teacher.is_onnx:
        # Run the file itself in onnxruntime: re-exporting or copying its wrapper is neither possible nor meaningful.
        return BenchModel(teacher.spec.name, role="teacher", artifacts={"onnx-fp32": teacher.path}, bytes=teacher.path.stat().st_size,  # type: ignore[union-attr]
                          source=teacher.name, preprocess=(lambda x: input_map(torch.from_numpy(x)).numpy()) if input_map else None)
    module = FrozenTeacher(teacher.model, input_map=input_map).module  # takes the data's inputs
    shape = tuple(data.spec.input_shape)
    bench = BenchModel(teacher.spec.name, role="teacher", module=module, params=count_parameters(teacher.model), flops=count_flops(module, shape),
                       source=teacher.name)
    edge = [TARGETS[t][0] for t in targets if TARGETS[t][0] in EDGE_FORMATS]
    if edge or any(TARGETS[t][0] == "onnxruntime" for t in targets):
        # ONNX FP32 and INT8 for onnxruntime; each edge runtime's FP32, to compare the student with the teacher on that runtime.
        formats = ("onnx", "onnx-int8", *edge)
        log(f"preflight: exporting the teacher {teacher.spec.name} to {', '.join(formats)} for the {', '.join(targets)} targets")
        exported = export_model(module, work / "teacher", data=data, model_name=teacher.spec.name,
                                config=ExportConfig(formats=formats, evaluate=False, parity_samples=256, edge_max_batch=_edge_max_batch(batch_sizes)))
        for a in exported.artifacts:
            if a.format in EDGE_FORMATS:
                _check_batch_contract(f"the teacher {teacher.spec.name}'s", a.format, a.details, batch_sizes)
        bench.artifacts = {artifact_variant(asdict(a)): work / "teacher" / a.path for a in exported.artifacts}
    return bench


def compress_and_export(config: CompressConfig | None = None, *, progress: bool = False, log: Callable[[str], None] | None = None,
                        trust_code: bool = False, search: SearchConfig | None = None) -> BundleResult:
    """The main job: distill the teacher into the student, export, benchmark, gate and bundle.

    Everything that can be checked before training is checked first (:func:`plan_bundle`).
    ``trust_code`` lets teacher and student checkpoints run the factory code they name (see
    :func:`~kdedge.models.load_checkpoint`); it is an argument, never a config key. With
    ``config.latency_budget`` the student is searched (:func:`kdedge.search.search`); ``search``
    sets that search's own knobs (candidates, proxy, finalists), its recipe and budget come from ``config``.

    Raises:
        GateFailure: A gate failed; the candidate is kept at ``<out>.rejected`` and no bundle is published.
        KdedgeError: Bad input anywhere along the way (one line each), before training wherever it can be known then.
    """
    config = config or CompressConfig()
    with claimed(config.out, "bundle") as claim:  # the name is this run's from the start: a second run never takes it
        return _compress_and_export(config, claim, progress=progress, log=log or (lambda _line: None), trust_code=trust_code, search=search)


def _compress_and_export(config: CompressConfig, claim: Claim, *, progress: bool, log: Callable[[str], None], trust_code: bool,
                         search: SearchConfig | None) -> BundleResult:
    out = claim.path  # its folder was checked writable by the claim
    if config.archive and _archive_path(out).exists():
        raise ConfigError(f"{_archive_path(out)} already exists and --archive would replace it; remove it or pass another --out")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdedge-bundle-") as work:
        plan = plan_bundle(config, work=Path(work), trust_code=trust_code, log=log)
        timings = {"preflight": time.perf_counter() - t_start}
        data = plan.data
        val = f" / {len(data.val)} validation" if data.val is not None else ""
        log(f"distill: {plan.teacher.name} -> {plan.student_spec.name} on {data.spec.name} "
            f"({len(data.train)} train{val} / {len(data.test)} test, {config.epochs} epochs)")
        start = time.perf_counter()
        if config.latency_budget is not None:
            plan, result = _decided_student(plan, Path(work), search, progress=progress, log=log)
        elif config.prune is not None:
            plan, result = _pruned_student(plan, progress=progress, log=log)
        else:
            result = distill(plan.student, plan.teacher.model, data.train, data.test, val_data=data.val, config=plan.distill_config,
                             student_spec=plan.student_spec, teacher_name=plan.teacher.name, teacher_input=plan.teacher.input, progress=progress)
        timings["distill"] = time.perf_counter() - start
        log(f"student {result.test.accuracy:.4f}, teacher {result.teacher_test.accuracy:.4f} (retention {result.test.accuracy / result.teacher_test.accuracy:.4f})"
            + (f"; on validation: student {result.val.accuracy:.4f}, teacher {result.teacher_val.accuracy:.4f}" if result.val and result.teacher_val else ""))
        with publish_dir(out) as tmp:
            manifest, report = _write_candidate(tmp, plan, result, timings, t_start, log, progress=progress)
            failed = {k: g for k, g in manifest["gates"].items() if not g["passed"]}
            if failed:
                rejected = _rejected_path(out)
                os.rename(tmp, rejected)
                summary = "; ".join(f"{k}: {g['value'] if g['value'] is None else round(g['value'], 4)} vs limit {g['limit']} ({g['detail']})" for k, g in failed.items())
                raise GateFailure(f"gate failed, no bundle published: {summary}; the candidate is in {rejected}")
    archive = _write_archive(out) if config.archive else None
    log(f"bundle {out} ({timings['total']:.0f} s)")
    return BundleResult(out=out, manifest=manifest, report=report, archive=archive)


def _search_precision(target: str) -> str:
    """What a budget on ``target`` is searched at: INT8 where the target runs it (the bundle ships INT8), else FP32."""
    return "int8" if "int8" in TARGET_PRECISIONS[target] else "fp32"


def _decided_student(plan: BundlePlan, work: Path, base: SearchConfig | None, *, progress: bool,
                     log: Callable[[str], None]) -> tuple[BundlePlan, RunResult]:
    """``--latency-budget MS --target T``: every contender of ``--contenders`` trained, made into T's files at FP32 and INT8, proven and
    timed there together (:func:`kdedge.search.decide`); the most accurate on validation within the budget is the student.

    A contender that cannot be made (a search with no candidate in budget, an ONNX teacher to prune) is recorded with its
    reason. When no file meets the budget the fastest contender is bundled and the ``latency_budget`` gate rejects it.
    """
    from kdedge.search import Contender, decide

    config = plan.config
    if plan.data.val is None:  # held out here, as kdedge search would, so the manifest describes the data the student saw
        plan = dataclasses.replace(plan, data=hold_out(plan.data, 0.1))
    built: dict[str, tuple[BundlePlan, RunResult]] = {}
    contenders, not_built = [], {}
    for lever in config.contenders:
        log(f"decide: making the {lever} contender")
        try:
            if lever == "searched":
                built[lever] = _searched_student(plan, work, base, progress=progress, log=log)
            elif lever == "pruned":
                built[lever] = _pruned_to_budget(plan, work, progress=progress, log=log)
            else:
                built[lever] = plan, distill(plan.student, plan.teacher.model, plan.data.train, plan.data.test, val_data=plan.data.val,
                                             config=plan.distill_config, student_spec=plan.student_spec, teacher_name=plan.teacher.name,
                                             teacher_input=plan.teacher.input, progress=progress)
        except KdedgeError as exc:
            not_built[lever] = str(exc)
            log(f"decide: no {lever} contender: {exc}")
            continue
        p, r = built[lever]
        contenders.append(Contender(lever, r.model, p.student_spec, how=_how(lever, p)))
    calibration = plan.data.train.sample(config.calibration_samples, seed=0).numpy()
    teacher = plan.teacher_bench.module  # with the teacher's input map, as the benchmark runs it; None for an ONNX teacher
    decision = decide(contenders, plan.data.val, target=config.target, budget_ms=config.latency_budget, calibration=calibration,  # type: ignore[arg-type]
                      teacher=teacher, teacher_spec=plan.teacher.spec, threads=config.deploy_threads, work=work / "decide",
                      not_built=not_built, log=log)
    record = decision.to_dict()
    chosen = decision.winner_contender()
    if chosen is None:  # nothing meets the budget: the fastest is bundled for the record and the latency_budget gate rejects it
        timed = [r for r in decision.rows if "p50_ms" in r]
        if not timed:
            raise ExportError(f"no contender could run on {config.target}: " + "; ".join(f"{r['contender']} {r['precision']}: {r.get('error')}" for r in decision.rows))
        chosen = min(timed, key=lambda r: r["p50_ms"])["contender"]
    plan, result = built[chosen]
    return dataclasses.replace(plan, decision=record), result


def _how(lever: str, plan: BundlePlan) -> str:
    if lever == "searched":
        return f"kdedge search on {plan.config.target} at {_search_precision(plan.config.target)}: {plan.student_spec.name}"
    if lever == "pruned":
        budget = (plan.pruning or {}).get("budget") or {}
        asked = f"{budget['speedup']:.1f}x" if "speedup" in budget else f"{1000 * budget.get('latency_budget_ms', float('nan')):.1f} µs"
        return f"the teacher pruned to {asked} on {budget.get('target', 'ort-cpu')} (kdedge prune) and recovered"
    return f"--student {plan.config.student} distilled"


def _searched_student(plan: BundlePlan, work: Path, base: SearchConfig | None, *, progress: bool, log: Callable[[str], None]) -> tuple[BundlePlan, RunResult]:
    """The student :func:`kdedge.search.search` finds, trained with this run's recipe.

    Latency is measured on ``target`` (INT8 where it runs INT8) with ``deploy_threads`` at batch 1;
    the search's record (``search.json``, the plot) goes into the bundle's ``search/`` folder.
    """
    from kdedge.search import search

    config = plan.config
    fields = {k: v for k, v in vars(config).items() if k in DistillConfig.__dataclass_fields__ and k not in ("out", "resume")}
    search_cfg = dataclasses.replace(base or SearchConfig(latency_budget=config.latency_budget), **fields | {
        "val_split": config.val_split or 0.1, "latency_budget": config.latency_budget, "target": config.target,
        "target_precision": _search_precision(config.target), "target_threads": config.deploy_threads, "target_batch": 1})
    found = search(plan.teacher.model, plan.data, config=search_cfg, out=work / "search", teacher_name=plan.teacher.name,
                   teacher_input=plan.teacher.input, progress=progress, log=log)
    assert found.student is not None  # a fresh search trains its finalists
    spec = load_checkpoint(found.out / "student").spec
    plan = dataclasses.replace(plan, student=found.student.model, student_spec=spec, search=found.out)
    return plan, found.student


def _pruned_to_budget(plan: BundlePlan, work: Path, *, progress: bool, log: Callable[[str], None]) -> tuple[BundlePlan, RunResult]:
    """The teacher pruned toward the budget: to it directly where pruning times on the target at FP32, else to the speedup the budget
    asks of the teacher on the target (its p50 there at the search precision ÷ the budget), timed on onnxruntime — or, when
    onnxruntime cannot show that speedup, as far as the pruner goes there (the decision times the result on the target)."""
    from kdedge.search import LatencyMeter

    config = plan.config
    if plan.teacher.is_onnx:
        raise ConfigError(f"the teacher {plan.teacher.path} is an ONNX file: its channels cannot be pruned (pass its PyTorch checkpoint)")
    _prunable_teacher(config, plan.teacher, plan.data)
    precision = _search_precision(config.target)
    if config.target in PRUNE_TARGETS and precision == "fp32":
        return _pruned_student(plan, progress=progress, log=log, budget={"latency_budget": config.latency_budget, "target": config.target})
    meter = LatencyMeter(plan.data.train.batch_of(LatencyMeter.CALIBRATION), num_classes=plan.data.spec.num_classes, target=config.target,
                         threads=config.deploy_threads, precision=precision, log=log)
    teacher_p50 = meter.measure({"teacher": plan.teacher.spec}, modules={"teacher": plan.teacher.model})["teacher"]["p50_ms"]
    speedup = teacher_p50 / config.latency_budget  # type: ignore[operator]
    if speedup <= 1:
        raise ConfigError(f"the teacher already meets the budget on {config.target} ({teacher_p50:.4f} ms <= {config.latency_budget} ms): nothing to prune")
    log(f"decide: the teacher takes {1000 * teacher_p50:.1f} µs on {config.target} {precision}: pruning it {speedup:.1f}x (timed on ort-cpu)")
    try:
        return _pruned_student(plan, progress=progress, log=log, budget={"speedup": speedup, "target": "ort-cpu"})
    except BudgetUnreachable as exc:
        # onnxruntime's per-call cost floors a narrow model's p50 where the target's may not: prune as far as the pruner goes
        # there and let the decision time the result on the target itself
        if exc.reachable_speedup is None or 0.95 * exc.reachable_speedup <= 1.05:
            raise
        log(f"decide: {exc}; pruning to {0.95 * exc.reachable_speedup:.1f}x on ort-cpu instead, as far as it goes, to be timed on {config.target}")
        return _pruned_student(plan, progress=progress, log=log, budget={"speedup": 0.95 * exc.reachable_speedup, "target": "ort-cpu"})


def _search_summary(search_dir: Path) -> dict[str, Any]:
    rec = json.loads((search_dir / "search.json").read_text())
    return {"record": "search/search.json", "latency_budget_ms": rec["target"]["latency_budget_ms"], "target": rec["target"],
            "p50_ms": rec["winner_p50_ms"], "candidates": len(rec["candidates"])}


def _write_candidate(tmp: Path, plan: BundlePlan, result: RunResult, timings: dict[str, float], t_start: float,
                     log: Callable[[str], None], *, progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Student, config, artifacts, benchmark and manifest into ``tmp``; returns the manifest and the report."""
    config, data = plan.config, plan.data
    if plan.search is not None:  # what chose the student, for whoever deploys it
        (tmp / "search").mkdir()
        for name in ("search.json", "accuracy_vs_latency.png"):
            shutil.copy2(plan.search / name, tmp / "search" / name)
    save_checkpoint(tmp / "student.safetensors", result.model, plan.student_spec, data.spec,
                    extra={"kdedge_version": __version__, "test_accuracy": result.test.accuracy})
    # Without `out` (nor the builder's `log_dir`), so `kdedge build --config BUNDLE/config.yaml --out NEW` repeats the run and the file is reproducible.
    (tmp / "config.yaml").write_text(config_to_yaml(CompressConfig(**(config.to_dict() | {"out": None, "log_dir": None}))))
    (tmp / "predict.py").write_bytes((resources.files("kdedge") / "bundle_files" / "predict.py").read_bytes())  # runs without kdedge
    start = time.perf_counter()
    export_cfg = ExportConfig(formats=plan.formats, calibration_samples=config.calibration_samples, calibration_method=config.calibration_method,
                              parity_samples=config.parity_samples, edge_max_batch=_edge_max_batch(config.batch_sizes),
                              input_format=config.input_format, skip_failed_int8=True,  # a runtime whose INT8 fails is named under skipped; the bundle keeps the rest
                              per_channel=scheme_parts(config.qat_scheme)[1])  # PTQ and QAD alike: one weight granularity
    sensitivity = None
    if config.keep_float_layers is not None:
        from kdedge.sensitivity import plan_float_layers

        kept, sensitivity = plan_float_layers(result.model, data, data.train.sample(config.calibration_samples, seed=0).numpy(), config.keep_float_layers,
                                              max_drop=config.max_quant_drop, log=log, per_channel=export_cfg.weights_per_channel)
        export_cfg = dataclasses.replace(export_cfg, keep_float=kept)
    exported, quantization = _export_student(tmp, plan, result, export_cfg, timings, log, progress=progress)
    if sensitivity is not None:
        quantization["sensitivity"] = sensitivity
    timings["export"] = time.perf_counter() - start - timings.get("qat", 0.0)
    log("exported " + ", ".join(a.path for a in exported.artifacts) + (f" (skipped: {', '.join(exported.skipped)})" if exported.skipped else ""))

    start = time.perf_counter()
    artifacts = exported.manifest["artifacts"]
    student_bm = BenchModel(plan.student_spec.name, role="student", module=result.model, params=count_parameters(result.model),
                            flops=count_flops(result.model, tuple(data.spec.input_shape)), bytes=(tmp / "student.safetensors").stat().st_size,
                            artifacts={artifact_variant(a): tmp / "models" / a["path"] for a in artifacts if a.get("details", {}).get("for") != "tensorrt"},
                            file_input=recorded_input_format(exported.manifest.get("input"), exported.manifest.get("preprocessing")))
    targets = plan.targets
    bench_cfg = BenchConfig(data=config.data, targets=targets, batch_sizes=config.batch_sizes, min_s=config.bench_min_s,
                            threads=config.bench_threads, export_variants=("fp32",), warmup_s=0.1, min_iters=20)  # nothing left to export
    log(f"bench: teacher and student on {', '.join(targets)} at batch {','.join(map(str, config.batch_sizes))}")
    report = benchmark([plan.teacher_bench, student_bm], data, bench_cfg, log=log)
    if plan.decision is not None:  # report.md/html's decision table and frontier.png: every contender on the budget's target
        report["decision"] = _decision_entry(plan.decision)
    write_report_files(report, tmp, frontier=True, budget_ms=config.latency_budget, title="kdedge bundle")
    if config.log_dir:  # the latency and accuracy tables beside the training curves
        from kdedge.tblog import write_text

        write_text(config.log_dir, "bundle/report", (tmp / "report.md").read_text(), step=config.epochs)
    timings["bench"] = time.perf_counter() - start

    winner = (plan.decision or {}).get("winner")
    recommended = recommend(report["rows"], artifacts, max_quant_drop=config.max_quant_drop,
                            decided=(config.target, winner["precision"]) if winner else None)
    # With a validation split the gates judge validation accuracy: the test split stays the final report's, not a tuning signal.
    judged = (result.val, result.teacher_val, "validation") if result.val is not None and result.teacher_val is not None else (result.test, result.teacher_test, "test")
    gates = evaluate_gates(student_acc=judged[0].accuracy, teacher_acc=judged[1].accuracy, artifacts=artifacts, recommended=recommended,  # type: ignore[union-attr]
                           rows=report["rows"], config=config, split=judged[2])
    if plan.decision is not None:
        gates["latency_budget"] = _budget_gate(plan.decision)
    tuned: list[dict[str, Any]] = []
    if config.tune_runtime and all(g["passed"] for g in gates.values()):  # a rejected candidate is not deployed: no time spent tuning it
        start = time.perf_counter()
        tuned = _tune_targets(tmp, plan, result.model, recommended, log, feed=student_bm.file_input.feed if student_bm.file_input else None)
        timings["tune"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - t_start
    manifest = _manifest(plan, result, exported, report, student_bm, recommended, gates, timings, tuned)
    manifest["quantization"] = quantization
    manifest["files"] = _files_entry(tmp, skip={"manifest.json"})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest, report


def _int8_drops(exported: ExportResult, requested: tuple[str, ...]) -> dict[str, Any]:
    """Each INT8 artifact's accuracy drop vs the FP32 ONNX file, in points (on validation when the run has it: what the gates
    judge), and the requested INT8 formats that failed (skipped). ``worst`` is the largest drop, infinite when one failed."""
    rows = [a for a in exported.artifacts if a.precision == "int8" and a.accuracy and a.details.get("for") != "tensorrt"]
    split = "validation" if rows and all("val_drop_vs_fp32_pt" in a.accuracy for a in rows) else "test"  # type: ignore[operator]
    key = "val_drop_vs_fp32_pt" if split == "validation" else "drop_vs_fp32_pt"
    drops = {a.path: a.accuracy[key] for a in rows if key in a.accuracy}  # type: ignore[index,operator]
    failed = {f: exported.skipped[f] for f in requested if f.endswith("-int8") and f in exported.skipped}
    return {"split": split, "drops_pt": drops, "failed": failed, "worst": math.inf if failed else max(drops.values(), default=0.0)}


def _export_student(tmp: Path, plan: BundlePlan, result: RunResult, export_cfg: ExportConfig, timings: dict[str, float], log: Callable[[str], None],
                    *, progress: bool) -> tuple[ExportResult, dict[str, Any]]:
    """The student's artifacts in ``tmp/models``, INT8 made as ``--int8`` says; returns them and the manifest's ``quantization``.

    ``ptq``: calibrated after training. ``qat``: the distilled student fine-tuned with fake quantization and the
    teacher (:func:`kdedge.qat_distill`), every INT8 artifact built from it (``student-qat.safetensors`` is that model).
    ``auto``: PTQ, then QAD only when PTQ's worst INT8 drop exceeds ``max_quant_drop`` (an INT8 format that failed counts
    as the worst); the INT8 that loses less ships, and a QAD that fails leaves PTQ shipping, with the reason recorded.
    """
    config = plan.config
    common: dict[str, Any] = {"data": plan.data, "config": export_cfg, "model_name": plan.student_spec.name,
                              "source_sha256": file_sha256(tmp / "student.safetensors"), "log": log}
    formats = export_cfg.formats
    if config.int8 == "ptq":  # (qat and auto always have an INT8 format: CompressConfig checks it)
        exported = export_model(result.model, tmp / "models", **common)
        m = _int8_drops(exported, formats)
        return exported, {"mode": config.int8, "shipped": "ptq" if m["drops_pt"] else None, "split": m["split"],
                          "ptq": {"drops_pt": m["drops_pt"], "failed": m["failed"]}}
    record: dict[str, Any] = {"mode": config.int8, "max_quant_drop": config.max_quant_drop}
    candidates = tmp / ".int8"  # inside the candidate: the loser is removed before the file list is taken
    candidates.mkdir()
    ptq = qad = None
    ptq_worst = None
    if config.int8 == "auto":
        ptq = export_model(result.model, candidates / "ptq", **common)
        m = _int8_drops(ptq, formats)
        ptq_worst = m["worst"]
        record |= {"split": m["split"], "ptq": {"drops_pt": m["drops_pt"], "failed": m["failed"], "worst_drop_pt": _finite(m["worst"])}}
    shipped, why = int8_choice(config.int8, ptq_worst, None, config.max_quant_drop)
    if shipped == "qat":  # --int8 qat, or auto where PTQ lost more than the gate allows
        if ptq is not None:
            log(f"int8 auto: {why}: quantization-aware distillation")
        start = time.perf_counter()
        try:
            qat = _quantization_aware(plan, result, keep_float=export_cfg.keep_float, progress=progress, log=log)
            save_checkpoint(tmp / "student-qat.safetensors", qat.model, plan.student_spec.with_qat(config.qat_scheme, qat.model.keep_float), plan.data.spec,
                            extra={"kdedge_version": __version__, "test_accuracy": qat.test.accuracy})
            qad = export_model(result.model, candidates / "qat", int8_model=qat.model, **common)  # type: ignore[arg-type]
        except KdedgeError as exc:
            if ptq is None:  # --int8 qat: the user asked for it; nothing to fall back to
                raise
            (tmp / "student-qat.safetensors").unlink(missing_ok=True)
            record["qat"] = {"failed": str(exc)}
            shipped, why = "ptq", f"{why}, but QAD failed ({exc}): PTQ ships"
        finally:
            timings["qat"] = time.perf_counter() - start
        if qad is not None:
            m = _int8_drops(qad, formats)
            record |= {"split": m["split"], "qat": {"drops_pt": m["drops_pt"], "failed": m["failed"], "worst_drop_pt": _finite(m["worst"]),
                                                    "checkpoint": "student-qat.safetensors", **qat.metrics["qat"],
                                                    "fake_quant_test_accuracy": qat.test.accuracy, "epochs": config.qat_epochs, "lr": config.qat_lr}}
            shipped, why = int8_choice(config.int8, ptq_worst, m["worst"], config.max_quant_drop)
            if shipped == "ptq":
                (tmp / "student-qat.safetensors").unlink()
                del record["qat"]["checkpoint"]
    record |= {"shipped": shipped, "why": why}
    log(f"int8: {shipped.upper()} ships ({why})")
    chosen = qad if shipped == "qat" else ptq
    assert chosen is not None
    os.rename(chosen.out, tmp / "models")
    shutil.rmtree(candidates)
    return dataclasses.replace(chosen, out=tmp / "models"), record


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def _pt(value: float) -> str:
    return "an INT8 format failed" if math.isinf(value) else f"{value:.2f} pt"


def int8_choice(mode: str, ptq_worst: float | None, qat_worst: float | None, max_quant_drop: float) -> tuple[str, str]:
    """Which INT8 ships (``"ptq"`` or ``"qat"``) and why, from the worst INT8 drops measured so far (points vs FP32, infinite
    where a requested INT8 format failed; None: not measured).

    ``qat`` always trains; ``auto`` trains only when PTQ's worst drop exceeds ``max_quant_drop`` (``qat_worst`` None: not trained
    yet, so the answer says whether to), then ships QAD only if it loses strictly less than PTQ.
    """
    if mode == "ptq":
        return "ptq", "--int8 ptq"
    if mode == "qat":
        return "qat", "--int8 qat"
    assert ptq_worst is not None
    if ptq_worst <= max_quant_drop:
        return "ptq", f"PTQ's worst INT8 drop {_pt(ptq_worst)} is within --max-quant-drop {max_quant_drop:g}: no QAD needed"
    if qat_worst is None:
        return "qat", f"PTQ's worst INT8 drop ({_pt(ptq_worst)}) exceeds --max-quant-drop {max_quant_drop:g}"
    if qat_worst < ptq_worst:
        return "qat", f"PTQ lost {_pt(ptq_worst)} > --max-quant-drop {max_quant_drop:g}; QAD loses {_pt(qat_worst)}"
    return "ptq", f"PTQ lost {_pt(ptq_worst)} > --max-quant-drop {max_quant_drop:g}, but QAD lost no less ({_pt(qat_worst)}): PTQ ships"


def qat_config_for(config: CompressConfig, distill_config: DistillConfig) -> QATConfig:
    """The QAD run of ``--int8 qat|auto``: this run's recipe (batch size, alpha, T, seed, augmentation), with the QAD schedule.

    Fake quantization runs in fp32; the prepared graph has no feature modules, so a feature loss distills its logits;
    no warm-up (a fine-tune of trained weights, and the run's warm-up may be longer than the QAD).
    """
    keep = {k: v for k, v in distill_config.to_dict().items()
            if k in QATConfig.__dataclass_fields__ and k not in ("out", "resume", "teacher", "student", "teacher_weights", "student_weights")}
    return QATConfig(**keep | {"epochs": config.qat_epochs, "lr": config.qat_lr, "qat_scheme": config.qat_scheme, "precision": "fp32",
                               "log_dir": sub_dir(config.log_dir, "qat"),
                               "warmup_epochs": 0.0, "loss": config.loss if config.loss in ("hinton", "dkd") else "hinton"})


def _quantization_aware(plan: BundlePlan, result: RunResult, *, keep_float: tuple[str, ...], progress: bool, log: Callable[[str], None]) -> RunResult:
    """:func:`kdedge.qat_distill` of the distilled student from the bundle's teacher, with this run's recipe and the QAD schedule."""
    from kdedge.qat import qat_distill

    config = plan.config
    qcfg = dataclasses.replace(qat_config_for(config, plan.distill_config), keep_float=keep_float)
    log(f"qat: {plan.student_spec.name} with fake INT8 ({config.qat_scheme}), {config.qat_epochs} epochs at lr {config.qat_lr:g}, from {plan.teacher.name}")
    qat = qat_distill(result.model, plan.teacher.model, plan.data.train, plan.data.test, val_data=plan.data.val, config=qcfg,
                      student_spec=plan.student_spec, teacher_name=plan.teacher.name, teacher_input=plan.teacher.input, progress=progress)
    log(f"qat: fake-quantized student {qat.test.accuracy:.4f} test" + (f", {qat.val.accuracy:.4f} validation" if qat.val else ""))
    return qat


def _tune_targets(tmp: Path, plan: BundlePlan, student: nn.Module, recommended: dict[str, dict[str, Any]],
                  log: Callable[[str], None], *, feed: Callable[[np.ndarray], np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Per CPU target, the student's and the teacher's best runtime settings, each tuned on its own, then timed head to head.

    ort-cpu tunes the recommended artifact (its entry gains ``settings``, ``tuned_p50_ms``,
    ``tuning`` and ``vs_teacher_tuned``) against the teacher's ONNX FP32; torch-cpu tunes the
    student and the teacher in eager PyTorch; an edge target tunes its recommended artifact against
    the teacher's FP32 artifact of that runtime (:func:`~kdedge.bench.tuning.tune_edge`). Thread
    counts go up to ``deploy_threads``. GPU targets have no thread settings to tune. The ratio comes
    from one interleaved measurement of both at their best settings, so machine drift between the
    two tunings cannot tilt it. Each entry records the seconds its tuning took (``seconds``).
    """
    from kdedge.bench.tuning import available_cores, default_threads

    config, teacher = plan.config, plan.teacher_bench
    budget = max(0.5, 4 * config.bench_min_s)  # per model: a few benchmark measurements' worth
    threads = sorted({t for t in default_threads() if t <= config.deploy_threads} | {min(config.deploy_threads, available_cores())})
    entries = []
    for target in plan.targets:
        t0 = time.perf_counter()
        runtime, device = TARGETS[target]
        rec = recommended.get(target)
        if device != "cpu" or (runtime != "torch" and rec is None):
            continue  # nothing to tune: a GPU target, or no artifact passed the accuracy gate
        batch = rec["batch"] if rec else min(config.batch_sizes)
        x = plan.data.test.batch_of(batch)
        if runtime == "torch":
            models = {"student": ("torch-fp32", student), "teacher": ("torch-fp32", teacher.module)}
        else:
            assert rec is not None
            fp32 = "onnx-fp32" if runtime == "onnxruntime" else f"{runtime}-fp32"
            models = {"student": (rec["variant"], tmp / rec["artifact"]), "teacher": (fp32, teacher.artifacts.get(fp32))}
        inputs = {"student": feed(x) if feed is not None and runtime != "torch" else x,  # its file may take uint8 pixels
                  "teacher": teacher.preprocess(x) if teacher.preprocess else x}  # an ONNX teacher's own normalization
        results = {role: _tune_one(runtime, model, inputs[role], threads, budget) for role, (_, model) in models.items() if model is not None}
        entry: dict[str, Any] = {"target": target, "batch": batch}
        for role, r in results.items():
            entry[role] = {"variant": models[role][0], "settings": r.best, "p50_ms": r.p50_ms}
        if len(results) == 2:
            head = time_within({role: _settings_call(runtime, models[role][1], inputs[role], results[role].best) for role in results},  # type: ignore[arg-type]
                               budget_s=budget / 2)
            entry["head_to_head_p50_ms"] = {role: head[role].p50_ms for role in results}
            entry["latency_speedup"] = head["teacher"].p50_ms / head["student"].p50_ms
        if rec is not None:
            rec.update(settings=results["student"].best, tuned_p50_ms=results["student"].p50_ms, tuning=results["student"].to_dict())
            if "latency_speedup" in entry:
                rec["vs_teacher_tuned"] = entry["latency_speedup"]
        entry["seconds"] = time.perf_counter() - t0
        log(f"tune: {target} at batch {batch}: " + "; ".join(f"{role} {models[role][0]} {r.best} p50 {r.p50_ms:.4f} ms" for role, r in results.items())
            + (f"; teacher/student {entry['latency_speedup']:.2f}x, each at its best" if "latency_speedup" in entry else "") + f" ({entry['seconds']:.1f} s)")
        entries.append(entry)
    _rank_deployments(tmp, plan, recommended, feed, budget, log)
    return entries


def _tune_one(runtime: str, model: Any, x: np.ndarray, threads: list[int], budget: float) -> Any:
    from kdedge.bench.tuning import tune_edge

    if runtime in EDGE_FORMATS:
        return tune_edge(runtime, model, x, threads=threads, budget_s=budget)
    return tune(model, x, threads=threads, budget_s=budget)


def _settings_call(runtime: str, model: Any, x: np.ndarray, settings: dict[str, Any]) -> Callable[[], Any]:
    if runtime in EDGE_FORMATS:
        from kdedge.exporters.edge import load_edge

        return load_edge(runtime, model, settings=settings).prepare(x)
    return settings_call(model, x, settings)


def _rank_deployments(tmp: Path, plan: BundlePlan, recommended: dict[str, dict[str, Any]], feed: Callable[[np.ndarray], np.ndarray] | None,
                      budget: float, log: Callable[[str], None]) -> None:
    """Every tuned CPU target's recommended artifact, at its tuned settings, timed in one interleaved set: ``deploy_p50_ms``.

    Targets tuned one after another are minutes apart on a machine whose speed drifts; `fastest`
    ranks the runtimes on this one measurement instead, every one at the deployment's threads.
    """
    tuned = {t: rec for t, rec in recommended.items() if "settings" in rec and TARGETS[t][1] == "cpu" and TARGETS[t][0] != "torch"}
    if len(tuned) < 2:
        return
    x = plan.data.test.batch_of(min(rec["batch"] for rec in tuned.values()))
    calls = {t: _settings_call(TARGETS[t][0], tmp / rec["artifact"], feed(x) if feed is not None else x, rec["settings"])
             for t, rec in tuned.items()}
    head = time_within(calls, budget_s=budget * len(calls) / 2, rounds=7)
    for t, rec in tuned.items():
        rec["deploy_p50_ms"] = head[t].p50_ms
    log("tune: the runtimes head to head at their tuned settings: " + ", ".join(f"{t} {head[t].p50_ms:.4f} ms" for t in sorted(tuned, key=lambda t: head[t].p50_ms)))


def _manifest(plan: BundlePlan, result: RunResult, exported: ExportResult, report: dict[str, Any], student_bm: BenchModel,
              recommended: dict[str, Any], gates: dict[str, Any], timings: dict[str, float], tuned: list[dict[str, Any]]) -> dict[str, Any]:
    """``manifest.json`` without its file list (docs/bundle.md lists every key)."""
    config, data, teacher = plan.config, plan.data, plan.teacher
    artifacts = exported.manifest["artifacts"]
    return {
        "schema": MANIFEST_SCHEMA,
        "kdedge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": {"name": teacher.name, "model": teacher.spec.name, "sha256": state_dict_sha256(teacher.model), "params": plan.teacher_bench.params,
                    "flops": plan.teacher_bench.flops, "test_accuracy": result.teacher_test.accuracy,  # type: ignore[union-attr]
                    "input_map": result.metrics["teacher"].get("input_map")},
        "student": {"model": plan.student_spec.to_dict(), "weights": "student.safetensors", "sha256": exported.manifest["source_sha256"],
                    "params": student_bm.params, "flops": student_bm.flops, "test_accuracy": result.test.accuracy,  # type: ignore[union-attr]
                    "test_macro_f1": result.test.macro_f1,  # type: ignore[union-attr]
                    **({"searched": _search_summary(plan.search)} if plan.search is not None else {}),
                    **({"pruned": plan.pruning} if plan.pruning is not None else {})},
        "data": {"name": data.spec.name, "train_fingerprint": data.train.fingerprint(), "test_fingerprint": data.test.fingerprint(),
                 "train_samples": len(data.train), "test_samples": len(data.test), "files": data.spec.files,
                 **({"val_fingerprint": data.val.fingerprint(), "val_samples": len(data.val)} if data.val is not None else {})},
        "input": exported.manifest["input"],
        "preprocessing": exported.manifest["preprocessing"],
        "labels": list(data.spec.labels),
        "artifacts": [
            {"path": f"models/{a['path']}", "format": a["format"], "precision": a["precision"], "bytes": a["bytes"], "sha256": a["sha256"],
             "parity": {"passed": a["parity"]["passed"], "samples": a["parity"]["samples"],
                        "max_abs_diff": a["parity"]["outputs"][0]["max_abs_diff"], "argmax_agreement": a["parity"]["outputs"][0]["argmax_agreement"]},
             "accuracy": (a.get("accuracy") or {}).get("accuracy"), "for": a.get("details", {}).get("for", "any"),
             **({"runtime": a["details"]["runtime"], "companions": [f"models/{n}" for n in a["details"].get("files", {})]}
                if a["format"] in EDGE_FORMATS else {})}
            for a in artifacts
        ],
        "skipped": exported.skipped,
        "gates": gates,
        **({"decision": _decision_entry(plan.decision)} if plan.decision is not None else {}),
        "recommended": recommended,
        "fastest": fastest_target(recommended),
        "performance": {"rows": len(report["rows"]), "comparison": [c for c in report["comparison"] if c["batch"] == min(config.batch_sizes)],
                        **({"tuned": tuned} if tuned else {})},
        "resolved": {"formats": list(plan.formats), "targets": list(plan.targets)},
        "reproducibility": {"seed": config.seed, "torch": torch.__version__, "numpy": np.__version__, "device": plan.distill_config.device},
        "timings_s": timings,
    }


def _decision_entry(decision: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``decision``: every contender's row without its per-block timings (their p10-p90 stays)."""
    strip = lambda rows: [{k: v for k, v in r.items() if k != "blocks_ms"} for r in rows]  # noqa: E731
    winner = decision["winner"]
    return decision | {"rows": strip(decision["rows"]), "teacher": strip(decision["teacher"]),
                       "winner": None if winner is None else {k: v for k, v in winner.items() if k != "blocks_ms"}}


def _smoke_inputs(manifest: dict[str, Any], batch: int = 2) -> np.ndarray:
    """Raw pixels in the data's own range, preprocessed with the manifest's formula ``(B, C, H, W)``.

    Scale 1/255 means uint8 storage: pixels are integers 0..255. Any other scale (1.0: float
    storage, whose range the manifest does not bound) draws each channel's scaled value from
    mean ± 2·std, where the model's training inputs lay.
    """
    pre = manifest["preprocessing"]
    shape = [batch] + [int(d) for d in manifest["input"]["shape"][1:]]
    rng = np.random.default_rng(0)
    if manifest["input"].get("dtype") == "uint8":  # the preprocessing is in the graph: the pixels, in its layout
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    scale = float(pre["scale"])
    mean = np.asarray(pre["mean"], np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], np.float64).reshape(1, -1, 1, 1)
    if np.isclose(scale, 1 / 255, rtol=1e-6, atol=0):
        pixels = rng.integers(0, 256, size=shape).astype(np.float64)
    else:
        pixels = (mean + std * rng.uniform(-2.0, 2.0, size=shape)) / scale
    return ((pixels * scale - mean) / std).astype(np.float32)


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a bundle archive holding only regular files and directories below one folder.

    Stricter than tarfile's ``data`` filter, and independent of the Python patch level: any
    absolute path, ``..`` component, link (symbolic or hard), device or FIFO is refused before it
    is written, and no member may overwrite another.
    """
    root = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:  # streamed: members are judged one by one, in order
            parts = PurePosixPath(member.name).parts
            kind = "file" if member.isfile() else "directory" if member.isdir() else "symbolic link" if member.issym() else \
                "hard link" if member.islnk() else "device or FIFO"
            if not parts or member.name.startswith("/") or ".." in parts or kind not in ("file", "directory"):
                raise VerifyError(
                    f"{archive}: refusing archive member {member.name!r} ({kind}); a bundle archive holds only regular files "
                    "and directories inside one folder — it was not written by kdedge or was tampered with"
                )
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(root):
                raise VerifyError(f"{archive}: archive member {member.name!r} would land outside the extraction folder")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has a body
            with source, open(target, "xb") as out:  # "x": a duplicate member cannot overwrite an earlier one
                shutil.copyfileobj(source, out, 1 << 20)


def verify_bundle(path: str | Path, *, strict: bool = False) -> dict[str, Any]:
    """Recompute every sha256 in the manifest and run each artifact in its own runtime on a smoke batch.

    An edge artifact whose runtime is not installed here is listed under ``not_run`` with the
    extra that installs it (its hashes are still checked), or, with ``strict``, is a problem.

    Args:
        path: A bundle directory or a ``.tar.gz`` written with ``--archive``.

    Returns:
        A summary: files checked, the artifacts run, those not run (with why).

    Raises:
        VerifyError: Naming every mismatch (missing files, wrong size or hash, models that fail).
    """
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory(prefix="kdedge-verify-") as tmp:
            try:
                _safe_extract(path, Path(tmp))
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise VerifyError(f"{path}: not a readable .tar.gz bundle ({exc})") from None
            roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
            if len(roots) != 1:
                raise VerifyError(f"{path}: expected one bundle directory inside the archive, found {len(roots)}")
            return verify_bundle(roots[0], strict=strict)
    manifest = _read_manifest(path)
    problems = _file_problems(path, manifest)
    bad = {p.split(":")[0] for p in problems}
    runnable = [a for a in manifest.get("artifacts", []) if a["format"] in ("onnx", *EDGE_FORMATS) and a["path"] not in bad and (path / a["path"]).is_file()]
    not_run = {a["path"]: why for a in runnable if a["format"] in EDGE_FORMATS and (why := edge_unavailable(a["format"], purpose="run"))}
    ran = [a for a in runnable if a["path"] not in not_run]
    if strict:
        problems += [f"{rel}: not run ({why})" for rel, why in not_run.items()]
    problems += [p for a in ran for p in _smoke_problems(path, a, manifest)]
    problems += _settings_problems(path, manifest, skip=bad)
    if problems:
        raise VerifyError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    return {"bundle": str(path), "files": len(manifest.get("files", [])), "models_run": [a["path"] for a in ran],
            "onnx_models_run": sum(a["format"] == "onnx" for a in ran), "not_run": not_run}


def _read_manifest(bundle: Path) -> dict[str, Any]:
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise VerifyError(f"{bundle}: no manifest.json; expected a bundle directory or .tar.gz written by kdedge compress-and-export")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise VerifyError(f"{manifest_path}: schema {manifest.get('schema')!r}, this kdedge reads schema {MANIFEST_SCHEMA}")
    return manifest


def _file_problems(bundle: Path, manifest: dict[str, Any]) -> list[str]:
    """Every listed file present with its bytes and sha256; every artifact listed, with the same hash."""
    problems: list[str] = []
    listed = {f["path"]: f for f in manifest.get("files", [])}
    for a in manifest.get("artifacts", []):
        if a["path"] not in listed:
            problems.append(f"{a['path']}: an artifact missing from the manifest's file list")
        elif a["sha256"] != listed[a["path"]]["sha256"]:
            problems.append(f"{a['path']}: artifact and file entries disagree on the sha256")
    for rel, entry in listed.items():
        f = bundle / rel
        if f.is_symlink():
            problems.append(f"{rel}: a symbolic link, not the file the manifest lists; replace it with the file")
            continue
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        if f.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {f.stat().st_size} bytes, manifest says {entry['bytes']}")
        if file_sha256(f) != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    problems += [f"{rel}: not in the manifest (the manifest lists every file of a bundle); remove it, or rebuild the bundle"
                 for rel in _unlisted(bundle, set(listed) | {"manifest.json"})]
    return problems


def _unlisted(bundle: Path, listed: set[str]) -> list[str]:
    """Paths below ``bundle`` that are not a listed file or a directory holding one: extra files, links, FIFOs, ..."""
    found = []
    for dirpath, dirnames, filenames in os.walk(bundle):  # links to directories land in dirnames and are not followed
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            rel = (here / name).relative_to(bundle).as_posix()
            if rel not in listed:
                found.append(rel)
    return sorted(found)


def _settings_problems(bundle: Path, manifest: dict[str, Any], *, skip: set[str]) -> list[str]:
    """Every tuned ``recommended[target]["settings"]`` must open its artifact in its runtime, as a consumer applying them would
    (an edge runtime not installed here is left to the smoke run's report)."""
    from kdedge.exporters.edge import load_edge
    from kdedge.ort import ort_session, session_kwargs

    problems = []
    for target, rec in (manifest.get("recommended") or {}).items():
        settings, rel = rec.get("settings"), rec.get("artifact", "")
        runtime = TARGETS.get(target, ("", ""))[0]
        if settings is None or rel in skip or not (bundle / rel).is_file():
            continue
        try:
            if rel.endswith(".onnx"):
                ort_session(bundle / rel, **session_kwargs(settings))
            elif runtime in EDGE_FORMATS and edge_unavailable(runtime, purpose="run") is None:
                load_edge(runtime, bundle / rel, settings=settings)
        except KdedgeError as exc:
            problems.append(f"recommended.{target}.settings: {exc}")
    return problems


def _smoke_problems(bundle: Path, artifact: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """An artifact run in its own runtime (onnxruntime, or its edge runtime) on a smoke batch must give finite ``(2, K)`` logits."""
    from kdedge.exporters.edge import edge_predict, load_edge
    from kdedge.ort import ort_session

    rel, x = artifact["path"], _smoke_inputs(manifest)
    try:
        if artifact["format"] == "onnx":
            session = ort_session(bundle / rel)
            out = session.run(None, {session.get_inputs()[0].name: x})[0]
        else:
            out = edge_predict(load_edge(artifact["format"], bundle / rel), x)
    except KdedgeError as exc:
        return [f"{rel}: {exc}"]
    except Exception as exc:  # noqa: BLE001 - a runtime failing on the smoke batch (e.g. an edited input shape) is a finding, not a crash
        return [f"{rel}: the smoke batch failed in its runtime ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"]
    k = len(manifest["labels"])
    if out.shape != (2, k) or not np.isfinite(out).all():
        return [f"{rel}: smoke batch gave shape {out.shape} (finite: {bool(np.isfinite(out).all())}), expected (2, {k})"]
    return []
