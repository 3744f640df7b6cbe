"""The benchmark harness: models x variants x targets x batch sizes -> rows of measurements.

A *model* is what a user names (a checkpoint, run directory, export directory, ``.onnx`` or
``.plan``); its *variants* are the forms it can run in (``torch-fp32``, ``onnx-fp32``,
``onnx-int8``, ``onnx-fp16``, ``trt-fp16``...); a *target* is a runtime on a device
(``torch-cpu``, ``ort-cpu``, ``trt``...). Each (model, variant, target) gets one runner; accuracy
is measured through that runner on the test set, latency at every batch size on real test inputs.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge._version import __version__
from kdedge.bench.report import REPORT_SCHEMA, write_report
from kdedge.bench.env import capture_environment, current_rss_bytes, peak_rss_bytes, reset_peak_rss
from kdedge.bench.runners import EDGE_RUNTIMES, TARGETS, Runner, format_prefix, make_runner, target_available, variant_prefix
from kdedge.bench.timing import TimingPolicy, measure, measure_cuda
from kdedge.config import BenchConfig, ExportConfig
from kdedge.data import DataSplits, DatasetSpec
from kdedge.metrics import evaluation_from_predictions
from kdedge._fs import claimed
from kdedge.errors import BackendUnavailable, ConfigError, DataError, ModelError
from kdedge.data.pixels import InputFormat, recorded_input_format

__all__ = ["BenchModel", "benchmark", "compare_models", "resolve_bench_model", "run_bench"]


@dataclass
class BenchModel:
    """A model to benchmark: a torch module and/or artifact files, with what is known about its size.

    Attributes:
        name: Shown in reports.
        role: ``teacher``, ``student`` or ``model``; a teacher and students get a comparison.
        module: The PyTorch model (for ``torch-*`` targets, and exported on the fly for ``ort-*``).
        artifacts: Variant name -> file, e.g. ``{"onnx-int8": Path("model.int8.onnx")}``.
        params: Parameter count; FLOPs per sample (``torch.utils.flop_counter``); checkpoint bytes.
        recorded: What the model's files say about its training data (None: nothing).
    """

    name: str
    role: str = "model"
    module: nn.Module | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    params: int | None = None
    flops: int | None = None
    bytes: int | None = None
    source: str = ""
    recorded: RecordedData | None = None
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None  # the data's inputs -> this model's (e.g. a teacher's own normalization)
    # What its artifact files take when it is not the (preprocessed) inputs: uint8 pixels with the preprocessing in their graph
    # (kdedge.data.pixels). The benchmark feeds them its .feed of the inputs; a missing variant is exported the same way.
    file_input: InputFormat | None = None


@dataclass(frozen=True)
class RecordedData:
    """The dataset a model records (checkpoint spec, ``export.json``, ONNX metadata); None where it is silent.

    Attributes:
        name: Built-in name or path, as recorded (``DatasetSpec.name``).
        input_shape: One sample's ``(C, H, W)``.
        num_classes: Number of classes.
        files: sha256 of the dataset's source files by role; two paths with equal hashes hold the same data.
        resize: An image folder's shorter-side resize (``--image-size``) the model was trained with.
        norm: ``(mean, std)`` the model was trained with (an image folder's are reused, not re-measured).
    """

    name: str | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    files: dict[str, str] = field(default_factory=dict)
    resize: int | None = None
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def _onnx_params(path: Path) -> int | None:
    """Parameter count of an FP32/FP16 ONNX model: elements of its floating-point initializers."""
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # the runner reports an unreadable file with a clear message
        return None
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    return int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type in floats))


def _precision(variant: str) -> str:
    return variant.rsplit("-", 1)[-1]


def resolve_bench_model(ref: str, *, role: str = "model", data_name: str | None = None, trust_code: bool = False) -> BenchModel:
    """A :class:`BenchModel` from a run directory, checkpoint, export directory, ``.onnx``/``.plan`` or shipped zoo name.

    ``trust_code`` lets a checkpoint run the factory code it names (see :func:`~kdedge.models.load_checkpoint`).
    """
    from kdedge.models.zoo import count_flops, count_parameters, load_checkpoint, parse_model_name, pretrained_path

    path = Path(ref).expanduser()
    if path.is_dir() and (path / "export.json").is_file():
        manifest = json.loads((path / "export.json").read_text())
        artifacts = {}
        for a in manifest.get("artifacts", []):
            if a.get("details", {}).get("for") == "tensorrt":
                continue  # the symmetric INT8 ONNX only feeds TensorRT
            artifacts[artifact_variant(a)] = path / a["path"]
        fp32 = artifacts.get("onnx-fp32")
        return BenchModel(name=manifest.get("model") or path.name, role=role, artifacts=artifacts, params=_onnx_params(fp32) if fp32 else None,
                          bytes=fp32.stat().st_size if fp32 else None, source=str(path), recorded=_recorded_in_spec_dict(manifest.get("data")),
                          file_input=recorded_input_format(manifest.get("input"), manifest.get("preprocessing")))
    if path.is_file() and path.suffix == ".onnx":
        from kdedge.exporters.onnx import read_metadata

        try:
            meta = read_metadata(path)
        except Exception:  # not parseable: onnxruntime says why in one line, before "no dataset recorded" could mislead
            from kdedge.ort import ort_session

            ort_session(path)
            meta = {}
        precision = meta.get("kdedge.precision", "fp32")
        return BenchModel(name=path.stem, role=role, artifacts={f"onnx-{precision}": path}, params=_onnx_params(path) if precision != "int8" else None,
                          bytes=path.stat().st_size, source=str(path), recorded=_recorded_in_onnx(meta), file_input=_input_in_metadata(meta))
    edge = _edge_format_of(path)
    if edge is not None:
        from kdedge.exporters.edge import artifact_bytes, load_edge

        meta = _edge_metadata(edge, path)
        if not meta:
            load_edge(edge, path)  # an unreadable file: its runtime says why in one line, before "no dataset recorded" could mislead
        precision = meta.get("kdedge.precision", "fp32")
        return BenchModel(name=path.stem, role=role, artifacts={f"{edge}-{precision}": path}, bytes=artifact_bytes(edge, path),
                          source=str(path), recorded=_recorded_in_onnx(meta), file_input=_input_in_metadata(meta))
    if path.is_file() and path.suffix in (".plan", ".engine"):
        meta_path = path.with_name(path.name + ".json")
        precision = json.loads(meta_path.read_text()).get("precision", "fp16") if meta_path.is_file() else "fp16"
        return BenchModel(name=path.stem, role=role, artifacts={f"trt-{precision}": path}, bytes=path.stat().st_size, source=str(path),
                          recorded=_recorded_beside_plan(path))
    if not path.exists():
        try:
            arch, width = parse_model_name(ref)
        except ModelError as exc:
            raise ModelError(f"{ref}: no such file or directory, nor a shipped model name ({exc})") from None
        shipped = pretrained_path(arch, width, data_name or "fashion-mnist")
        if shipped is None:
            raise ModelError(f"{ref}: kdedge ships no weights for it on {data_name or 'fashion-mnist'}; pass a run directory or checkpoint")
        path = shipped
    ckpt = load_checkpoint(path, trust_code=trust_code)
    recorded = RecordedData(name=ckpt.data.name if ckpt.data else None, input_shape=tuple(ckpt.spec.input_shape),
                            num_classes=ckpt.spec.num_classes, files=dict(ckpt.data.files) if ckpt.data else {},
                            resize=ckpt.data.resize if ckpt.data else None, norm=(ckpt.data.mean, ckpt.data.std) if ckpt.data else None)
    return BenchModel(name=ckpt.spec.name, role=role, module=ckpt.model.eval(), params=count_parameters(ckpt.model),
                      flops=count_flops(ckpt.model, tuple(ckpt.spec.input_shape)), bytes=ckpt.path.stat().st_size, source=str(ckpt.path),
                      recorded=recorded)


def artifact_variant(a: dict[str, Any]) -> str:
    """The variant name of an ``export.json`` artifact: ``onnx-int8``, ``trt-fp16``, ``executorch-fp32``..."""
    return format_prefix(a["format"]) + a["precision"]


def _edge_format_of(path: Path) -> str | None:
    """The edge format of an artifact file, by its suffix (None: not an edge artifact)."""
    from kdedge.exporters.edge import EDGE_FORMATS

    if not path.is_file():
        return None
    return next((f.name for f in EDGE_FORMATS.values() if path.suffix == f.suffix), None)


def _edge_metadata(edge: str, path: Path) -> dict[str, str]:
    """The kdedge metadata of an edge artifact (embedded, or in its sidecar); ``{}`` when it has none or is unreadable."""
    import importlib

    from kdedge.exporters.edge import EDGE_FORMATS, edge_unavailable, read_sidecar

    if edge_unavailable(edge, purpose="run"):
        return read_sidecar(path)
    try:
        return importlib.import_module(EDGE_FORMATS[edge].module).read_metadata(path)
    except Exception:  # noqa: BLE001 - any reader failure means an unreadable file, which the runner reports in one line
        return read_sidecar(path)


def _input_in_metadata(meta: dict[str, str]) -> InputFormat | None:
    """:func:`~kdedge.data.pixels.recorded_input_format` of an artifact's ``kdedge.input`` and ``kdedge.preprocessing`` metadata
    (JSON strings, or parsed in a sidecar)."""
    def parsed(key: str) -> Any:
        value = meta.get(key)
        try:
            return json.loads(value) if isinstance(value, str) else value
        except ValueError:
            return None

    return recorded_input_format(parsed("kdedge.input"), parsed("kdedge.preprocessing"))


def _recorded_in_spec_dict(d: Any) -> RecordedData | None:
    """The dataset in a ``DatasetSpec.to_dict()`` (e.g. ``export.json["data"]``); tolerant of older or partial files."""
    if not isinstance(d, dict):
        return None
    name, shape, classes, files, resize = d.get("name"), d.get("input_shape"), d.get("num_classes"), d.get("files"), d.get("resize")
    return RecordedData(
        resize=resize if isinstance(resize, int) and not isinstance(resize, bool) else None,
        norm=_norm(d.get("mean"), d.get("std")),
        name=str(name) if name else None,
        input_shape=tuple(int(v) for v in shape) if isinstance(shape, list) and all(isinstance(v, int) for v in shape) else None,
        num_classes=classes if isinstance(classes, int) and not isinstance(classes, bool) else None,
        files={str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {},
    )


def _recorded_in_onnx(meta: dict[str, str]) -> RecordedData | None:
    """The dataset in an ONNX file's kdedge metadata: ``kdedge.dataset``, the input shape, the labels."""
    if not any(k.startswith("kdedge.") for k in meta):
        return None
    shape: tuple[int, ...] | None = None
    classes: int | None = None
    try:
        contract = json.loads(meta["kdedge.input"])
        dims = contract["shape"][1:]  # ["batch", C, H, W], or ["batch", H, W, C] for uint8 pixels in NHWC
        shape = tuple(int(v) for v in dims) if all(isinstance(v, int) for v in dims) else None
        if shape is not None and contract.get("layout") == "NHWC" and len(shape) == 3:
            shape = (shape[2], shape[0], shape[1])  # the model's (C, H, W)
    except (KeyError, TypeError, ValueError):
        pass
    try:
        labels = json.loads(meta["kdedge.labels"])
        classes = len(labels) if isinstance(labels, list) else None
    except (KeyError, TypeError, ValueError):
        pass
    resize, norm = None, None
    try:
        pre = json.loads(meta["kdedge.preprocessing"])
        rule = pre.get("resize")
        resize = int(rule["shorter_side"]) if isinstance(rule, dict) else None
        norm = _norm(pre.get("mean"), pre.get("std"))
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    return RecordedData(name=meta.get("kdedge.dataset") or None, input_shape=shape, num_classes=classes, resize=resize, norm=norm)


def _norm(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """A recorded ``(mean, std)``, or None when either is missing or malformed."""
    try:
        m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        return None
    return (m, s) if m and len(m) == len(s) else None


def _recorded_beside_plan(path: Path) -> RecordedData | None:
    """A TensorRT plan's sidecar does not name the data; the ``export.json`` that lists the plan does."""
    manifest_path = path.parent / "export.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not any(isinstance(a, dict) and a.get("path") == path.name for a in manifest.get("artifacts") or []):
        return None
    return _recorded_in_spec_dict(manifest.get("data"))


def _ensure_artifacts(model: BenchModel, data: DataSplits, config: BenchConfig, workdir: Path, log: Callable[[str], None]) -> None:
    """Export the module (parity-checked) to what the configured onnxruntime and edge targets run, where it has no such artifact."""
    if model.module is None:
        return
    wanted: list[str] = []
    runtimes = {TARGETS[t][0] for t in config.targets}
    if "onnxruntime" in runtimes:
        wanted += [{"fp32": "onnx", "int8": "onnx-int8", "fp16": "onnx-fp16"}[v] for v in config.export_variants if f"onnx-{v}" not in model.artifacts]
    for runtime in sorted(runtimes & set(EDGE_RUNTIMES)):
        for v in ("fp32", "int8"):
            if v in config.export_variants and f"{runtime}-{v}" not in model.artifacts:
                wanted.append(runtime if v == "fp32" else f"{runtime}-int8")
                if v == "int8" and runtime in ("openvino", "ort"):
                    wanted.append("onnx-int8")  # they are converted from it
    if not wanted:
        return
    from kdedge.exporters import export_model

    formats = tuple(dict.fromkeys(["onnx", *wanted]))
    out = workdir / f"{model.role}-{model.name}".replace("/", "_")
    log(f"bench: exporting {model.name} to {', '.join(formats)} for the {', '.join(config.targets)} targets")
    config = ExportConfig(formats=formats, evaluate=False, parity_samples=256, edge_max_batch=max(256, *config.batch_sizes),
                          input_format=model.file_input.name if model.file_input else "float")  # like its other files: fed alike
    result = export_model(model.module, out, data=data, config=config, model_name=model.name, log=log)
    for a in result.artifacts:
        model.artifacts.setdefault(artifact_variant(asdict(a)), out / a.path)


def _variants_for(model: BenchModel, target: str) -> list[tuple[str, Path | None]]:
    runtime, device = TARGETS[target]
    if runtime == "torch":
        if model.module is None:
            return []
        return [("torch-fp32", None)] + ([("torch-fp16", None)] if device == "cuda" else [])
    prefix = variant_prefix(target)
    return [(v, p) for v, p in sorted(model.artifacts.items()) if v.startswith(prefix)]


def _accuracy(runner: Runner, inputs: Callable[[], Iterator[np.ndarray]], data: DataSplits, batch_size: int) -> dict[str, Any]:
    logits = np.concatenate([runner.predict(x, batch_size=batch_size) for x in inputs()])
    ev = evaluation_from_predictions(torch.from_numpy(logits.argmax(-1)), data.test.labels, data.spec.num_classes)
    return {"top1": ev.accuracy, "macro_f1": ev.macro_f1, "samples": ev.num_samples}


def _multi_stream(make: Callable[[], Callable[[], Any]], streams: int, seconds: float, batch: int) -> dict[str, Any]:
    """Throughput with ``streams`` concurrent callers, each with its own prepared runner."""
    calls = [make() for _ in range(streams)]
    counts = [0] * streams
    stop = threading.Event()

    def worker(i: int) -> None:
        fn = calls[i]
        while not stop.is_set():
            fn()
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(max(seconds, 0.5))
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"streams": streams, "seconds": elapsed, "throughput_per_s": sum(counts) * batch / elapsed}


def benchmark(
    models: list[BenchModel],
    data: DataSplits,
    config: BenchConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every (model, variant, target, batch size); returns the report as a dict.

    Args:
        models: What to measure; ``role="teacher"`` on one of them adds teacher-vs-student ratios.
        data: Real inputs: test images for latency batches and for accuracy.
        config: Targets, batch sizes, timing policy, threads.
        log: Called with one line per finished measurement (e.g. ``print``).

    Raises:
        BackendUnavailable: A requested target's runtime is missing (the message names the package).
        ConfigError: A batch size the model's runtime cannot take.
    """
    config = config or BenchConfig()
    log = log or (lambda _line: None)
    _check_roles(models)
    for target in config.targets:
        why = target_available(target)
        if why:
            raise BackendUnavailable(why)
    threads = torch.get_num_threads()  # --threads is the benchmark's, not the caller's: restored after, so a later training run is unchanged
    try:
        return _benchmark(models, data, config, log)
    finally:
        torch.set_num_threads(threads)


def _benchmark(models: list[BenchModel], data: DataSplits, config: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.test_limit:
        data = data.limit(test=config.test_limit)
    policy = TimingPolicy(warmup_iters=config.warmup_iters, warmup_s=config.warmup_s, min_iters=config.min_iters, min_s=config.min_s)
    source = data.test.pass_source()  # (N, C, H, W) normalized: once for every model when small, streamed when large
    max_batch = max(config.batch_sizes)
    inputs = data.test.batch_of(max_batch)  # real images, repeated to fill the batch
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdedge-bench-") as work:
        for m in models:
            _ensure_artifacts(m, data, config, Path(work), log)
        for model in models:
            # A model's own input normalization (an ONNX teacher's) is applied before timing: a deployment feeds it prepared inputs.
            own = model.preprocess or (lambda x: x)
            model_inputs = own(inputs)
            test_inputs = (lambda own=own: (own(x) for x in source())) if config.accuracy else None
            # Its files may take uint8 pixels (preprocessing in their graph): fed once here, before timing, as a device hands them over.
            feed = model.file_input.feed if model.file_input else None
            file_inputs = feed(model_inputs) if feed is not None else model_inputs
            file_test = (lambda f=feed, t=test_inputs: (f(x) for x in t())) if feed is not None and test_inputs is not None else test_inputs
            for target in config.targets:
                for variant, path in _variants_for(model, target):
                    x, x_test = (model_inputs, test_inputs) if path is None else (file_inputs, file_test)
                    rows += _measure(model, target, variant, path, x, x_test, data, config, policy, log)
    report = {
        "schema": REPORT_SCHEMA,
        "kdedge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "env": capture_environment(config.threads),
        "config": config.to_dict(),
        "data": {"name": data.spec.name, "test_samples": len(data.test)},
        "models": [{"name": m.name, "role": m.role, "source": m.source, "params": m.params, "flops": m.flops, "bytes": m.bytes,
                    "variants": sorted(m.artifacts)} for m in models],
        "rows": rows,
    }
    report["comparison"] = compare_models(rows)
    return report


def _measure(model: BenchModel, target: str, variant: str, path: Path | None, inputs: np.ndarray,
             test_inputs: Callable[[], Iterator[np.ndarray]] | None, data: DataSplits,
             config: BenchConfig, policy: TimingPolicy, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One runner: its accuracy on the test set, then latency at every batch size; one row per batch size."""
    runtime, device = TARGETS[target]
    rss_before = current_rss_bytes()
    reset_peak_rss()
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    runner = make_runner(target, module=model.module, path=path, precision=_precision(variant), threads=config.threads, channels_last=config.channels_last)
    for b in config.batch_sizes:
        runner.check_batch(b)
    batch = min(config.accuracy_batch, getattr(runner, "max_batch", config.accuracy_batch))
    accuracy = _accuracy(runner, test_inputs, data, batch) if test_inputs is not None else None
    if path is None:
        artifact_bytes = model.bytes
    elif runtime in EDGE_RUNTIMES:
        from kdedge.exporters.edge import artifact_bytes as edge_bytes

        artifact_bytes = edge_bytes(runtime, path)
    else:
        artifact_bytes = path.stat().st_size
    group = []
    for b in config.batch_sizes:
        stats = (measure_cuda if runner.on_device_timing else measure)(runner.prepare(inputs[:b]), policy)
        row = {
            "model": model.name, "role": model.role, "variant": variant, "target": target, "runtime": runtime, "device": device,
            "precision": _precision(variant), "batch": b, "threads": config.threads, "latency_ms": stats.to_dict(),
            "throughput_per_s": b / (stats.p50_ms / 1e3), "accuracy": accuracy, "params": model.params, "flops": model.flops,
            "bytes": artifact_bytes, "timing": "cuda-events" if runner.on_device_timing else "host",
            "threads_used": _threads_used(runner),
            **({"runtime_version": runner.runtime_version} if hasattr(runner, "runtime_version") else {}),
        }
        if config.streams > 1:  # K independent sessions/copies, each fed by its own thread
            def fresh(b: int = b) -> Callable[[], Any]:
                return make_runner(target, module=model.module, path=path, precision=_precision(variant), threads=config.threads).prepare(inputs[:b])

            row["multi_stream"] = _multi_stream(fresh, config.streams, config.min_s, b)
        group.append(row)
        log(f"{model.name:<12} {variant:<11} {target:<10} batch {b:>4}  p50 {stats.p50_ms:9.4f} ms  {row['throughput_per_s']:>12,.0f}/s")
    peak = peak_rss_bytes()
    gpu_peak = int(torch.cuda.max_memory_allocated()) if device != "cpu" and runtime == "torch" else None
    for row in group:
        row["memory"] = {"peak_rss_bytes": peak, "rss_before_bytes": rss_before, "gpu_peak_bytes": gpu_peak}
    return group


def _threads_used(runner: Runner) -> int | None:
    """The thread count the runner really ran with, where the runtime says (None: onnxruntime's default, one per physical core)."""
    if getattr(runner, "threads_used", None) is not None:
        return int(runner.threads_used)  # type: ignore[attr-defined]
    if runner.runtime == "torch" and runner.device == "cpu":
        return torch.get_num_threads()
    return runner.threads


def compare_models(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Teacher vs student ratios: each student row against the teacher's FP32 rows at the same batch.

    Two baselines per student row: the teacher on the same target in its FP32 form, and the teacher
    in PyTorch eager on the CPU (what a user runs before adopting kdedge).
    """
    teachers = [r for r in rows if r["role"] == "teacher"]
    students = [r for r in rows if r["role"] == "student"]
    if not teachers or not students:
        return []
    by_key = {(r["target"], r["variant"], r["batch"]): r for r in teachers}
    out = []
    for s in students:
        same_runtime_fp32 = variant_prefix(s["target"]) + "fp32" if s["target"] in TARGETS else None
        baselines = []
        if same_runtime_fp32 and (s["target"], same_runtime_fp32, s["batch"]) in by_key:
            baselines.append(by_key[(s["target"], same_runtime_fp32, s["batch"])])
        eager = by_key.get(("torch-cpu", "torch-fp32", s["batch"]))
        if eager is not None and eager not in baselines:
            baselines.append(eager)
        for t in baselines:
            c: dict[str, Any] = {
                "student": s["model"], "student_variant": s["variant"], "student_target": s["target"],
                "teacher": t["model"], "teacher_variant": t["variant"], "teacher_target": t["target"], "batch": s["batch"],
                "latency_speedup": t["latency_ms"]["p50_ms"] / s["latency_ms"]["p50_ms"],
                "throughput_speedup": s["throughput_per_s"] / t["throughput_per_s"],
            }
            if s.get("params") and t.get("params"):
                c["params_ratio"] = t["params"] / s["params"]
            if s.get("flops") and t.get("flops"):
                c["flops_ratio"] = t["flops"] / s["flops"]
            if s.get("bytes") and t.get("bytes"):
                c["bytes_ratio"] = t["bytes"] / s["bytes"]
            if s.get("accuracy") and t.get("accuracy"):
                c["accuracy_delta_pt"] = 100 * (s["accuracy"]["top1"] - t["accuracy"]["top1"])
                c["accuracy_retention"] = s["accuracy"]["top1"] / t["accuracy"]["top1"]
            out.append(c)
    return out


def _check_roles(models: list[BenchModel]) -> None:
    if sum(m.role == "teacher" for m in models) > 1:
        raise ConfigError("at most one teacher per benchmark; pass the others as models")


def _dataset_key(name: str) -> str:
    """A built-in name as it is; a path made absolute, so ``data.npz`` and ``./data.npz`` are one dataset."""
    from kdedge.data import BUILTIN_DATASETS

    return name if name in BUILTIN_DATASETS else str(Path(name).expanduser().resolve())


def _label(model: BenchModel) -> str:
    return ("teacher " if model.role == "teacher" else "") + (model.source or model.name)


def _bench_data(models: list[BenchModel], data: str | None, *, test_limit: int | None, image_size: int | None = None,
                layout: str | None = None) -> DataSplits:
    """The test split to score ``models`` on: ``data``, else the dataset they record.

    Every recorded dataset must be that one: the same built-in name or the same path (absolute);
    two different paths are the same data only when the model recorded its files' sha256 and
    they match (a dataset moved elsewhere). Then the data's input shape and classes must be the
    models' wherever they record them.
    """
    from kdedge.data import BUILTIN_DATASETS, load_dataset

    named = [(m, m.recorded.name) for m in models if m.recorded is not None and m.recorded.name]
    listing = ", ".join(f"{_label(m)} records {name!r}" for m, name in named)
    if data is None and not named:
        raise ConfigError(f"no dataset is recorded with {', '.join(_label(m) for m in models)}; "
                          f"pass --data NAME_OR_PATH (the dataset {'it was' if len(models) == 1 else 'they were'} trained on)")
    choice = data if data is not None else named[0][1]

    def mismatch() -> DataError:
        if data is not None:
            return DataError(f"--data {data!r} is not the dataset the models were trained on ({listing}); "
                             "omit --data to score on the recorded dataset, or pass --data NAME_OR_PATH naming it")
        return DataError(f"the models were trained on different datasets ({listing}); benchmark the models of each dataset "
                         "in its own kdedge bench")

    others = [m for m, name in named if _dataset_key(name) != _dataset_key(choice)]
    if any(m.recorded.name in BUILTIN_DATASETS or choice in BUILTIN_DATASETS or not m.recorded.files for m in others):
        raise mismatch()  # decided by the names, before loading (and perhaps downloading) anything
    try:
        # An image folder at the size the models were trained on (a moved folder too), unless --image-size says otherwise.
        resize = image_size or next((m.recorded.resize for m, _name in named if m.recorded.resize is not None), None)
        norm = next((m.recorded.norm for m, _name in named if m.recorded.norm is not None), None)  # an image folder's recorded mean/std
        splits = load_dataset(choice, test_limit=test_limit, image_size=resize, layout=layout, norm=norm)
    except DataError as exc:
        if data is not None:
            raise
        raise DataError(f"{exc} (it is the dataset recorded with the models: {listing}; pass --data NAME_OR_PATH where it lies now)") from exc
    if any(m.recorded.files != splits.spec.files for m in others):
        raise mismatch()
    _check_fits(models, splits.spec)
    return splits


def _check_fits(models: list[BenchModel], spec: DatasetSpec) -> None:
    """DataError unless every model's recorded input shape and class count are ``spec``'s."""
    wrong = []
    for m in models:
        r = m.recorded
        if r is None:
            continue
        if (r.input_shape is not None and tuple(r.input_shape) != tuple(spec.input_shape)) or (r.num_classes is not None and r.num_classes != spec.num_classes):
            wrong.append(f"{_label(m)} takes inputs {r.input_shape or '(unknown)'} with {r.num_classes or 'unknown'} classes")
    if wrong:
        raise DataError(f"data {spec.name!r} has inputs {tuple(spec.input_shape)} and {spec.num_classes} classes, but {'; '.join(wrong)}; "
                        "pass --data NAME_OR_PATH with the data the models were trained on")


def run_bench(models: list[str], *, teacher: str | None = None, config: BenchConfig | None = None, log: Callable[[str], None] | None = None,
              trust_code: bool = False) -> tuple[dict[str, Any], Path]:
    """``kdedge bench``: resolve model references and data, benchmark, write the report directory.

    The test data is ``config.data``, else the dataset the models record (see :func:`_bench_data`).

    Returns:
        The report and the directory it was written to (``config.out`` or ``runs/bench-<time>``).

    Raises:
        DataError: The models record different datasets, ``config.data`` is not the one they
            record, or the data's input shape or classes are not the models'.
        ConfigError: Nothing to benchmark, or no dataset recorded and ``config.data`` not given.
    """
    config = config or BenchConfig()
    with claimed(config.out, "bench") as claim:  # the name is this run's from the start: a second run never takes it
        return _run_bench(models, teacher, config, claim, log=log, trust_code=trust_code)


def _run_bench(models: list[str], teacher: str | None, config: BenchConfig, claim: Any, *, log: Callable[[str], None] | None,
               trust_code: bool) -> tuple[dict[str, Any], Path]:
    if not models and teacher is None:
        raise ConfigError("nothing to benchmark; pass one or more MODELs (run directory, checkpoint, export directory, .onnx or .plan)")
    for target in config.targets:  # fail before loading anything when a runtime is missing
        why = target_available(target)
        if why:
            raise BackendUnavailable(why)
    resolved = [resolve_bench_model(teacher, role="teacher", data_name=config.data, trust_code=trust_code)] if teacher else []
    resolved += [resolve_bench_model(m, role="student" if teacher else "model", data_name=config.data, trust_code=trust_code) for m in models]
    data = _bench_data(resolved, config.data, test_limit=config.test_limit, image_size=config.image_size, layout=config.layout)
    report = benchmark(resolved, data, config, log=log)
    return report, write_report(report, claim, plots=config.plots)
