"""Measured latency of candidate students on the deployment target, and its cache.

Every candidate is exported to the file its target runs (:meth:`LatencyMeter.artifact`: ONNX for
onnxruntime, its QDQ quantization for INT8, the edge runtime's own format for ExecuTorch, LiteRT,
OpenVINO and the ORT format) and timed by the bench harness's runner for the target, at the
deployment's precision, thread count and batch size. Candidates are timed in groups, interleaved block by
block (:func:`~kdedge.bench.timing.measure_interleaved`), so drift on a shared machine is spread
over the group instead of deciding which of two candidates looks faster.

A search times a hundred candidates and a pruning run dozens of children of one model, so the
file timed is TorchScript's ONNX export (``exporter="torchscript"``, the default): 0.04-0.5 s per
zoo model against 1.4-9 s for torch.export's, which ships. After onnxruntime's graph optimizations
both are the same convolutions and GEMMs (only a ``GlobalAveragePool`` for a ``ReduceMean``, a
``Flatten`` for a ``Reshape``), they compute the same outputs (tests/test_prune.py), and their p50s
agree to 1-2 % (median ts/dynamo ratio over 5 interleaved sets: resnet 0.986, mobilenet_v2 0.995,
tiny_cnn 1.022; ``benchmarks/timing_export.py``). A model TorchScript cannot trace faithfully (a
tracer warning, or a file that does not run at the timed batch) is timed on torch.export's file.
OpenVINO and the ORT format convert that ONNX file; ExecuTorch and LiteRT export the module
themselves (3-8 s a candidate, which the cache pays once). A search's p50s and budget check are
these estimates; a pruning run re-times its reported speedup on the exporter that ships
(``exporter="dynamo"``), and a bundle benchmarks the shipped artifacts themselves.

Latency depends on the architecture, not on the weights, so a measurement (a ratio to the
anchor, see :class:`LatencyMeter`) is cached under the architecture's name and the environment's
fingerprint (CPU model and ISA flags, runtime and exporter versions, target, precision, threads,
batch). A second search on the same machine re-times only
what it has not seen.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge._dynamo import torchscript_export
from kdedge._fs import atomic_file, cache_dir, file_lock
from kdedge._version import __version__
from kdedge.bench.env import capture_environment
from kdedge.bench.runners import TARGETS, make_runner
from kdedge.bench.timing import measure_interleaved
from kdedge.config import TARGET_PRECISIONS
from kdedge.errors import ConfigError, KdedgeError
from kdedge.exporters.edge import EDGE_FORMATS
from kdedge.models import ModelSpec, create_model

__all__ = ["ANCHOR", "LatencyCache", "LatencyMeter", "environment_key", "synced", "time_candidates"]

CACHE_FORMAT = 5  # 2: ratios to the anchor; 3: blocks start with untimed calls, kdedge's version in the key; 4: TorchScript's export timed;
#                  5: the precision and the edge runtimes' versions in the key


def environment_key(target: str, threads: int, batch: int, precision: str = "fp32") -> tuple[str, dict[str, Any]]:
    """A short key for "the same machine and software", and what it was made from."""
    env = capture_environment(threads)
    runtime = TARGETS[target][0] if target in TARGETS else None
    edge = {runtime: _edge_version(runtime)} if runtime in EDGE_FORMATS else {}
    facts = {
        "format": CACHE_FORMAT,
        "cpu": env["cpu"].get("model"),
        "flags": env["cpu"].get("flags"),
        "cores": env["cpu"].get("usable_cores") or env["cpu"].get("logical_cores"),
        "versions": {k: env["versions"].get(k) for k in ("torch", "onnx", "onnxruntime")} | edge | {"kdedge": __version__},  # kdedge: the exporter, the anchor
        "gpu": (env["gpu"] or {}).get("name"),
        "target": target,
        "threads": threads,
        "batch": batch,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16], facts


def _edge_version(runtime: str) -> str | None:
    """The version of the package that runs (and, for ExecuTorch and LiteRT, converts) an edge format: its kernels time the candidates."""
    from importlib import metadata

    dists = {"executorch": ("executorch",), "litert": ("ai-edge-litert", "litert-torch"), "openvino": ("openvino",), "ort": ("onnxruntime",)}[runtime]
    found = []
    for dist in dists:
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} -")
    return ", ".join(found)


class LatencyCache:
    """Measured latencies for one environment, in ``<cache>/latency/<key>.json``; ``path=None`` keeps them in memory.

    Several processes (searches, bundles) may share one file: :meth:`save` merges this process's
    new entries into what is on disk under a file lock, so no process's measurements are lost.
    """

    def __init__(self, path: Path | None, facts: dict[str, Any]) -> None:
        self.path, self.facts = path, facts
        self.entries: dict[str, dict[str, Any]] = self._read()
        self._new: set[str] = set()  # keys measured by this process, not yet merged into the file

    def _read(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            saved = json.loads(self.path.read_text())
            return dict(saved.get("entries", {})) if saved.get("facts") == self.facts else {}
        except (OSError, ValueError, AttributeError):
            return {}  # a corrupt cache is re-measured, not trusted

    @classmethod
    def open(cls, target: str, threads: int, batch: int, *, precision: str = "fp32", enabled: bool = True) -> LatencyCache:
        key, facts = environment_key(target, threads, batch, precision)
        return cls(cache_dir() / "latency" / f"{key}.json" if enabled else None, facts)

    @staticmethod
    def key(name: str, num_classes: int, input_shape: tuple[int, ...]) -> str:
        return f"{name}|{num_classes}|{'x'.join(map(str, input_shape))}"

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry
        self._new.add(key)

    def save(self) -> None:
        """Merge this process's new entries into the file (read, merge and replace under its lock); entries others saved meanwhile are kept and read."""
        if self.path is None:
            return
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            merged = self._read() | {k: self.entries[k] for k in self._new}
            with atomic_file(self.path) as tmp:
                tmp.write_text(json.dumps({"facts": self.facts, "entries": merged}, indent=1, sort_keys=True))
        self.entries = merged | self.entries  # what others measured is now known here too
        self._new.clear()


#: Timed in every group: latencies are kept as ratios to it, so drift between groups (and between
#: runs, for cached entries) cancels. The zoo's default student: small, and built for any input shape.
ANCHOR = "tiny_cnn"


class LatencyMeter:
    """Times models on one target, in interleaved groups that each include the :data:`ANCHOR`.

    A machine whose speed drifts by ±25 % over seconds would rank two candidates timed a minute
    apart by when they ran. Every group therefore also times the anchor, and a candidate is kept
    as its p50 (and p90) divided by the anchor's p50 *in the same group*; its latency is that
    ratio times the anchor's p50 over the whole run (the median of its per-group p50s). Cached
    entries are ratios too, so a second run scales them by its own anchor measurement.

    Args:
        inputs: Real, normalized inputs ``(N, C, H, W)``, N >= ``batch``; an INT8 precision also calibrates on them
            (up to :attr:`CALIBRATION` of them).
        target: A bench target (:data:`kdedge.config.SEARCH_TARGETS`): ``ort-cpu`` (exported ONNX in onnxruntime),
            ``torch-cpu`` (eager PyTorch), an edge runtime (``executorch-cpu``, ``litert-cpu``, ``openvino-cpu``,
            ``ort-mobile-cpu``: each model exported to that runtime's format, as ``kdedge export`` does), or a
            CUDA target where a GPU exists (host-timed to the end of the GPU's work).
        precision: What the target runs (:data:`kdedge.config.TARGET_PRECISIONS`): ``fp32``; ``int8``
            (onnxruntime's QDQ, per-channel, calibrated on ``inputs``; the edge runtime's INT8 of it, or ExecuTorch's
            and LiteRT's quantizer); ``fp16`` on CUDA.
        threads: Intra-op threads, as the deployment will use.
        batch: Batch size, as the deployment will use.
        cache: Where ratios are looked up and stored; None measures everything.
        group: Models timed together (anchor included).
        rounds: Interleaved blocks per model.
        log: Called with one line per measured group.
        exporter: ``"torchscript"`` (fast; falls back to torch.export's for a model it cannot export)
            or ``"dynamo"`` (torch.export's, what ships; never cached).
        calibration: What an INT8 :meth:`artifact` calibrates on instead of the first :attr:`CALIBRATION` ``inputs``: a
            file whose accuracy matters (:func:`kdedge.search.decide.decide`) is calibrated as ``kdedge export`` does.
    """

    def __init__(self, inputs: np.ndarray, *, num_classes: int, target: str = "ort-cpu", threads: int = 1, batch: int = 1,
                 cache: LatencyCache | None = None, group: int = 8, rounds: int = 7, log: Callable[[str], None] | None = None,
                 exporter: str = "torchscript", precision: str = "fp32", calibration: np.ndarray | None = None) -> None:
        if exporter not in ("dynamo", "torchscript"):
            raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
        if precision not in TARGET_PRECISIONS.get(target, ()):
            raise ConfigError(f"{target} does not time {precision}; it times {' or '.join(TARGET_PRECISIONS.get(target, ('nothing',)))}")
        self.exporter, self.precision = exporter, precision
        self.x = np.ascontiguousarray(inputs[:batch], dtype=np.float32)
        self.calibration = np.ascontiguousarray(inputs[: self.CALIBRATION] if calibration is None else calibration, dtype=np.float32)
        self.target, self.threads, self.batch, self.cache = target, threads, batch, cache
        self.group, self.rounds = max(2, group), rounds
        self.log = log or (lambda _line: None)
        self.anchor_spec = ModelSpec(ANCHOR, 1.0, num_classes, tuple(inputs.shape[1:]))  # type: ignore[arg-type]
        self.anchor_samples: list[float] = []
        self._work = tempfile.TemporaryDirectory(prefix="kdedge-search-")  # removed with the meter
        self._anchor: Callable[[], Any] | None = None
        self._failed: dict[str, str] = {}  # models measure(failures="record") could not time, and why
        self._record_failures = False

    #: Inputs an INT8 timing calibrates on: the kernels timed are the same whatever the scales, so a few suffice.
    CALIBRATION = 32

    #: The anchor's p50 is a median over at least this many groups, even when every candidate came from the cache.
    MIN_ANCHOR_GROUPS = 3

    @property
    def anchor_p50_ms(self) -> float:
        """The anchor's p50 over this run: the median of its per-group p50s."""
        while len(self.anchor_samples) < self.MIN_ANCHOR_GROUPS:
            self._measure_group([], {}, {}, {})
        return float(np.median(self.anchor_samples))

    #: A model whose per-round ratios to the anchor spread by more than this (p90 − p10 of the rounds, over their median) was
    #: timed while something else moved the machine's speed under it and not under the anchor's neighbouring blocks: it is
    #: timed again in another group, and its ratio is the median of both measurements' rounds.
    UNSTEADY = 0.15

    def measure(self, specs: dict[str, ModelSpec], *, modules: dict[str, nn.Module] | None = None,
                files: dict[str, Path] | None = None, exporter: str | None = None, fresh: bool = False,
                rounds: int | None = None, remeasure: bool = True, failures: str = "raise") -> dict[str, dict[str, Any]]:
        """Name -> ``{"p50_ms", "p90_ms", "ratio", "p90_ratio", "spread", "p50_range_ms", "remeasured", "cached"}``.

        ``ratio`` is the median over the rounds of the model's block p50 ÷ the anchor's in the same round (the
        same group); ``spread`` is how much those per-round ratios vary (p90 − p10 over the median) and
        ``p50_range_ms`` their p10 and p90 on the run's scale. A model measured with a spread over :attr:`UNSTEADY` is
        measured again (``remeasured``; ``remeasure=False`` leaves it, for callers that compare the models of one group with
        each other, as pruning does). ``modules`` times already built modules (a teacher) instead of building
        ``specs[name]``; ``files`` times ONNX files as they are (an ONNX teacher, ``ort-cpu`` only). Neither is cached.
        ``exporter`` overrides the meter's for these models (the anchor keeps the meter's). ``fresh`` ignores the cache
        (a head-to-head re-timing: models that fit one group are timed together; a decision-time measurement, not
        stored), and ``rounds`` overrides the meter's blocks per model. A cached entry that was unsteady and never
        measured again (a run killed between the two) is measured again, not trusted. A model that cannot be made into the
        target's file (a converter refusing it) raises its KdedgeError with ``failures="raise"``; with ``failures="record"``
        its entry is ``{"error": why, "cached": False}`` and the others are timed (a search drops that candidate instead of
        stopping).
        """
        if failures not in ("raise", "record"):
            raise ValueError(f"failures must be 'raise' or 'record', got {failures!r}")
        exporter = exporter or self.exporter
        if exporter not in ("dynamo", "torchscript"):
            raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
        modules = modules or {}
        files = files or {}
        if files and (self.target != "ort-cpu" or self.precision != "fp32"):
            raise ConfigError(f"an ONNX file can only be timed on ort-cpu at fp32, not {self.target} at {self.precision}")
        given = modules.keys() | files.keys()
        cacheable = {n for n in specs if self.cache is not None and n not in given and exporter == "torchscript" and not fresh}
        ratios: dict[str, dict[str, Any]] = {}
        todo = []
        for name, spec in specs.items():
            hit = self.cache.get(LatencyCache.key(name, spec.num_classes, spec.input_shape)) if name in cacheable else None  # type: ignore[union-attr]
            if hit is not None and "ratio" in hit and not (hit.get("spread", 0.0) > self.UNSTEADY and not hit.get("remeasured")):
                ratios[name] = hit | {"cached": True}
            else:
                todo.append(name)
        self._failed, self._record_failures = {}, failures == "record"
        try:
            measured = self._measure_groups(todo, specs, modules, files, exporter, rounds, cacheable)
        finally:
            self._record_failures = False
        failed, self._failed = self._failed, {}
        todo = [n for n in todo if n not in failed]
        unsteady = [n for n in todo if measured[n]["spread"] > self.UNSTEADY] if remeasure else []
        if unsteady:
            self.log(f"search: {len(unsteady)} unsteady measurement(s) timed again ({', '.join(unsteady)}: per-round spread "
                     f"{', '.join(format(measured[n]['spread'], '.0%') for n in unsteady)})")
            again = self._measure_groups(unsteady, specs, modules, files, exporter, rounds, cacheable)
            for n in unsteady:
                measured[n] = _pooled(measured[n], again[n])
        for n in todo:
            if n in cacheable:
                self.cache.put(LatencyCache.key(n, specs[n].num_classes, specs[n].input_shape), measured[n])  # type: ignore[union-attr]
            ratios[n] = measured[n] | {"cached": False}
        if self.cache is not None and unsteady:
            self.cache.save()
        anchor = self.anchor_p50_ms
        out = {}
        for n, r in ratios.items():
            per_round = r.get("rounds") or [r["ratio"]]  # an entry cached without its rounds counts as steady
            out[n] = {"p50_ms": r["ratio"] * anchor, "p90_ms": r["p90_ratio"] * anchor, "ratio": r["ratio"], "p90_ratio": r["p90_ratio"],
                      "spread": r.get("spread", 0.0), "p50_range_ms": [float(q) * anchor for q in np.percentile(per_round, [10, 90])],
                      "remeasured": bool(r.get("remeasured")), "cached": r["cached"]}
        return out | {n: {"error": why, "cached": False} for n, why in failed.items()}

    def _measure_groups(self, names: list[str], specs: dict[str, ModelSpec], modules: dict[str, nn.Module], files: dict[str, Path],
                        exporter: str, rounds: int | None, cacheable: set[str]) -> dict[str, dict[str, Any]]:
        step, out = self.group - 1, {}
        for start in range(0, len(names), step):
            out |= self._measure_group(names[start : start + step], specs, modules, files, exporter, rounds, cacheable)
        return out

    def _runner(self, spec: ModelSpec, module: nn.Module | None, path: Path, file: Path | None, exporter: str) -> Callable[[], Any]:
        if file is not None:
            runner = make_runner(self.target, path=file, threads=self.threads)
            runner.check_batch(self.batch)  # a fixed-batch ONNX file at another batch: a ConfigError naming it, not onnxruntime's traceback
            return runner.prepare(self.x)
        if module is None:
            torch.manual_seed(0)
            module = create_model(spec).eval()
        if TARGETS[self.target][0] == "torch":
            return synced(self.target, make_runner(self.target, module=module, precision=self.precision, threads=self.threads).prepare(self.x))
        work = path.parent / path.stem
        try:
            return synced(self.target, self._prepare(self.artifact(module, spec, work / "trial", exporter=exporter)))
        except Exception:  # noqa: BLE001 - a trace that does not run at this batch, or that a converter refuses: time the shipped export instead
            if exporter != "torchscript" or not self._from_onnx:
                raise
        return synced(self.target, self._prepare(self.artifact(module, spec, work / "shipped", exporter="dynamo")))

    @property
    def _from_onnx(self) -> bool:
        """Whether the target's file is made from an ONNX export (onnxruntime, OpenVINO, ORT format), not from the module (ExecuTorch, LiteRT)."""
        fmt = EDGE_FORMATS.get(TARGETS[self.target][0])
        return fmt is None or fmt.source == "onnx"

    def artifact(self, module: nn.Module, spec: ModelSpec, work: Path, *, exporter: str | None = None) -> Path:
        """The file this meter times for ``module``, written into ``work``: its ONNX export (TorchScript's with ``exporter="torchscript"``,
        else torch.export's, which ships) for onnxruntime; at ``int8`` that file quantized to QDQ (per-channel, calibrated on the meter's
        inputs, as ``kdedge export`` does); for OpenVINO and the ORT format, that file converted; for ExecuTorch and LiteRT, the
        runtime's own export of ``module`` (the quantizer's INT8). The weights are those given (a candidate's are random): the
        kernels timed, and so the latency, are the architecture's.

        Raises:
            ValueError: The target runs PyTorch modules, not files.
        """
        from kdedge.exporters.edge import export_edge
        from kdedge.exporters.onnx import export_onnx
        from kdedge.exporters.quantize import quantize_int8

        runtime = TARGETS[self.target][0]
        if runtime == "torch":
            raise ValueError(f"{self.target} times the module itself; it has no file")
        exporter = exporter or self.exporter
        work.mkdir(parents=True, exist_ok=True)
        shape = tuple(spec.input_shape)
        fmt = EDGE_FORMATS.get(runtime)
        if fmt is not None and fmt.source == "torch":
            out = work / f"model{fmt.suffix}"
            export_edge(fmt.name, out=out, precision=self.precision, model=module, input_shape=shape,
                        calibration=self.calibration if self.precision == "int8" else None, metadata={}, max_batch=self.batch)
            return out
        onnx = work / "model.onnx"
        if not (exporter == "torchscript" and self.precision != "fp16" and torchscript_export(module, onnx, shape)):
            export_onnx(module, onnx, input_shape=shape, precision="fp16" if self.precision == "fp16" else "fp32")
        if self.precision == "int8":
            quantize_int8(onnx, work / "model.int8.onnx", calibration=self.calibration)
            onnx = work / "model.int8.onnx"
        if fmt is None:
            return onnx
        out = work / f"model{fmt.suffix}"
        export_edge(fmt.name, out=out, precision=self.precision, onnx=onnx, input_shape=shape, metadata={}, max_batch=self.batch)
        return out

    def _prepare(self, artifact: Path) -> Callable[[], Any]:
        runner = make_runner(self.target, path=artifact, precision=self.precision, threads=self.threads)
        runner.check_batch(self.batch)
        return runner.prepare(self.x)

    def _measure_group(self, names: list[str], specs: dict[str, ModelSpec], modules: dict[str, nn.Module],
                       files: dict[str, Path], exporter: str | None = None, rounds: int | None = None,
                       cacheable: set[str] = frozenset()) -> dict[str, dict[str, Any]]:  # type: ignore[assignment]
        exporter = exporter or self.exporter
        t0 = time.perf_counter()
        torch_threads = torch.get_num_threads()  # a torch-cpu runner sets the deployment's; training must get its own back
        try:
            with tempfile.TemporaryDirectory(dir=self._work.name) as work:
                if self._anchor is None:
                    self._anchor = self._runner(self.anchor_spec, None, Path(self._work.name) / "anchor.onnx", None, self.exporter)
                fns = {"0": self._anchor}
                timed = []
                for i, name in enumerate(names, start=1):
                    try:
                        fns[f"{i}"] = self._runner(specs[name], modules.get(name), Path(work) / f"{i}.onnx", files.get(name), exporter)
                        timed.append((i, name))
                    except KdedgeError as exc:
                        if not self._record_failures:
                            raise
                        self._failed[name] = str(exc)
                        self.log(f"search: {name} cannot be timed on {self.target} {self.precision}: {exc}")
                stats = measure_interleaved(fns, rounds=rounds or self.rounds)
        finally:
            torch.set_num_threads(torch_threads)
        anchor = stats["0"].p50_ms
        self.anchor_samples.append(anchor)
        out = {}
        for i, name in timed:
            per_round = np.asarray(stats[str(i)].blocks_ms) / np.asarray(stats["0"].blocks_ms)  # paired: the same round, the same drift
            out[name] = {"ratio": float(np.median(per_round)), "p90_ratio": stats[str(i)].p90_ms / anchor, "rounds": [round(float(r), 5) for r in per_round],
                         "spread": _spread(per_round), "raw_p50_ms": stats[str(i)].p50_ms, "anchor_p50_ms": anchor,
                         "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if self.cache is not None and name in cacheable:
                self.cache.put(LatencyCache.key(name, specs[name].num_classes, specs[name].input_shape), out[name])
        if self.cache is not None and cacheable & set(names):
            self.cache.save()  # after every group: a killed search keeps what it measured
        if timed:
            self.log(f"search: timed {len(timed)} models + the anchor on {self.target} {self.precision} ({self.threads} thread{'s' if self.threads > 1 else ''}, "
                     f"batch {self.batch}) in {time.perf_counter() - t0:.1f} s")
        return out


def synced(target: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` on a CUDA target as one call that returns when the GPU has finished: the host clock then times the deployment's
    latency. A CPU target's ``fn`` as it is."""
    if TARGETS[target][1] == "cpu":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _spread(per_round: np.ndarray | list[float]) -> float:
    """How much a model's per-round ratios to the anchor vary: (p90 − p10) ÷ median."""
    p10, p50, p90 = np.percentile(np.asarray(per_round, dtype=np.float64), [10, 50, 90])
    return float((p90 - p10) / p50) if p50 > 0 else 0.0


def _pooled(first: dict[str, Any], again: dict[str, Any]) -> dict[str, Any]:
    """One entry from two measurements of a model: the median and spread of all their rounds."""
    rounds = first["rounds"] + again["rounds"]
    return again | {"ratio": float(np.median(rounds)), "p90_ratio": float(np.median([first["p90_ratio"], again["p90_ratio"]])), "rounds": rounds,
                    "spread": _spread(rounds), "remeasured": True, "first_spread": first["spread"]}


def time_candidates(specs: dict[str, ModelSpec], inputs: np.ndarray, *, target: str = "ort-cpu", threads: int = 1, batch: int = 1,
                    cache: LatencyCache | None = None, modules: dict[str, nn.Module] | None = None, group: int = 8, rounds: int = 7,
                    log: Callable[[str], None] | None = None, precision: str = "fp32") -> dict[str, dict[str, Any]]:
    """p50/p90 latency (ms) of each model at ``batch`` on ``target`` at ``precision``, from the cache or measured (see :class:`LatencyMeter`)."""
    num_classes = next(iter(specs.values())).num_classes if specs else 10
    meter = LatencyMeter(inputs, num_classes=num_classes, target=target, threads=threads, batch=batch, cache=cache, group=group, rounds=rounds, log=log,
                         precision=precision)
    return meter.measure(specs, modules=modules)
