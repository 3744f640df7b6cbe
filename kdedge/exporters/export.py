"""The export pipeline: checkpoint -> ONNX FP32 -> INT8 / FP16 -> TensorRT, every step parity-checked.

An export directory holds the artifacts and ``export.json``: for each artifact its format,
precision, bytes, sha256, parity report against PyTorch and measured test accuracy. It is
built under a temporary name and renamed into place, so it is either complete or absent. When
TensorRT (or a GPU) is missing, the ONNX artifacts are still written and the result lists
``tensorrt`` under ``skipped`` with the reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge import __version__
from kdedge._fs import atomic_dir, file_sha256
from kdedge.config import ExportConfig
from kdedge.data import DataSplits, DatasetSpec, load_dataset
from kdedge.distill.metrics import evaluation_from_predictions
from kdedge.errors import BackendUnavailable, ConfigError, DataError, ModelError
from kdedge.exporters.onnx import export_onnx
from kdedge.exporters.ort import ort_predict, ort_session
from kdedge.exporters.parity import ParityReport, Tolerance, check_parity, compare_outputs
from kdedge.exporters.quantize import quantize_int8

__all__ = ["Artifact", "ExportResult", "export_model", "export_checkpoint", "onnx_metadata", "tolerances"]

EXPORT_SCHEMA = 1


@dataclass
class Artifact:
    """One exported file and the evidence that it computes what the PyTorch model computes."""

    path: str  # relative to the export directory
    format: str  # onnx | tensorrt
    precision: str  # fp32 | fp16 | int8
    bytes: int
    sha256: str
    parity: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote to ``out``; ``skipped`` maps a format to why it was not built."""

    out: Path
    artifacts: list[Artifact]
    skipped: dict[str, str]
    manifest: dict[str, Any]

    def artifact(self, file_name: str) -> Artifact:
        for a in self.artifacts:
            if a.path == file_name:
                return a
        raise KeyError(file_name)


def tolerances(config: ExportConfig) -> dict[str, Tolerance]:
    """Parity tolerance per precision, from the config."""
    return {
        "fp32": Tolerance(atol=config.fp32_atol),
        "fp16": Tolerance(atol=config.fp16_atol, rtol=config.fp16_rtol),
        "int8": Tolerance(atol=None, min_agreement=config.int8_min_agreement),
    }



def onnx_metadata(spec: DatasetSpec, *, model_name: str, source_sha256: str | None, input_name: str = "input") -> dict[str, str]:
    """``metadata_props`` for an artifact: enough to preprocess an input and name the output."""
    return {
        "kdedge.version": __version__,
        "kdedge.model": model_name,
        "kdedge.source_sha256": source_sha256 or "",
        "kdedge.dataset": spec.name,
        "kdedge.input": json.dumps({"name": input_name, "shape": ["batch", *spec.input_shape], "dtype": "float32", "layout": "NCHW"}),
        "kdedge.preprocessing": json.dumps(
            {"scale": 1 / 255, "mean": list(spec.mean), "std": list(spec.std), "formula": "x = (pixel * scale - mean[c]) / std[c]"}
        ),
        "kdedge.labels": json.dumps(list(spec.labels)),
        "kdedge.precision": "fp32",
    }


def _accuracy(session, data: DataSplits, *, batch_size: int = 500) -> dict[str, Any]:
    logits = ort_predict(session, data.test.inputs().numpy(), batch_size=batch_size)
    ev = evaluation_from_predictions(torch.from_numpy(logits.argmax(-1)), data.test.labels, data.spec.num_classes)
    return {"accuracy": ev.accuracy, "macro_f1": ev.macro_f1, "samples": ev.num_samples, "runtime": "onnxruntime cpu"}


def _calibration(data: DataSplits, n: int, seed: int = 0) -> np.ndarray:
    """``n`` training inputs drawn without replacement with a fixed seed (covers every class)."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train), generator=g)[: min(n, len(data.train))]
    return data.train.inputs(index.sort().values).numpy()


def _check_data(model_input: tuple[int, ...] | None, num_classes: int | None, spec: DatasetSpec) -> None:
    if model_input is not None and tuple(model_input) != tuple(spec.input_shape) or num_classes is not None and num_classes != spec.num_classes:
        raise DataError(
            f"the model expects inputs {tuple(model_input or ())} and {num_classes} classes, but data {spec.name!r} has inputs "
            f"{tuple(spec.input_shape)} and {spec.num_classes} classes; pass the dataset the model was trained on with --data"
        )


def export_model(
    model: nn.Module,
    out: str | Path,
    *,
    data: DataSplits,
    config: ExportConfig | None = None,
    model_name: str | None = None,
    source_sha256: str | None = None,
) -> ExportResult:
    """Export ``model`` to every format in ``config.formats``, checking each against PyTorch.

    Args:
        model: A classifier ``(B, C, H, W) -> (B, K)`` in any mode; it is exported in eval mode.
        out: The export directory to create (must not exist).
        data: Real data: the first ``config.parity_samples`` test inputs drive parity, a seeded
            sample of ``config.calibration_samples`` training inputs calibrates INT8, and the
            whole test split measures each artifact's accuracy.
        config: Formats, tolerances, calibration, TensorRT profile.
        model_name: Recorded in the metadata (default: the class name).
        source_sha256: sha256 of the checkpoint the model came from, recorded in the metadata.

    Raises:
        ParityError: An artifact's outputs differ from PyTorch beyond tolerance (unless
            ``config.allow_mismatch``); nothing is written.
        ExportError, DataError: The model cannot be exported, or the data does not fit it.
    """
    config = config or ExportConfig()
    out = Path(out)
    if out.exists():
        raise ConfigError(f"output directory {out} already exists; pass another --out or remove it")
    spec = data.spec
    model = model.eval().cpu()
    model_name = model_name or type(model).__name__
    tol = tolerances(config)
    parity_inputs = data.test.inputs(slice(0, config.parity_samples))
    with torch.inference_mode():
        out_shape = model(parity_inputs[:2]).shape
    _check_data(None, int(out_shape[-1]), spec)

    artifacts: list[Artifact] = []
    skipped: dict[str, str] = {}
    timings: dict[str, float] = {}
    meta = onnx_metadata(spec, model_name=model_name, source_sha256=source_sha256)
    with atomic_dir(out) as tmp:
        with torch.inference_mode():
            reference_logits = model(parity_inputs).numpy()

        def add(path: Path, fmt: str, precision: str, parity: ParityReport | None, accuracy: dict | None, details: dict) -> Artifact:
            a = Artifact(path=path.name, format=fmt, precision=precision, bytes=path.stat().st_size, sha256=file_sha256(path),
                         parity=parity.to_dict() if parity else None, accuracy=accuracy, details=details)
            artifacts.append(a)
            return a

        def checked(path: Path, precision: str) -> tuple[Any, ParityReport, dict | None]:
            session = ort_session(path)
            report = check_parity(path, lambda _x: reference_logits, parity_inputs, tolerance=tol[precision], allow_mismatch=config.allow_mismatch, session=session)
            return session, report, (_accuracy(session, data) if config.evaluate else None)

        start = time.perf_counter()
        fp32 = export_onnx(model, tmp / "model.onnx", input_shape=tuple(spec.input_shape), opset=config.opset, metadata=meta, slim=config.slim)
        timings["export_fp32"] = time.perf_counter() - start
        start = time.perf_counter()
        _, report, fp32_acc = checked(fp32.path, "fp32")
        timings["parity_fp32"] = time.perf_counter() - start
        add(fp32.path, "onnx", "fp32", report, fp32_acc, {"opset": fp32.opset, "nodes": fp32.nodes, "nodes_before_slim": fp32.nodes_before_slim})

        if "onnx-int8" in config.formats:
            start = time.perf_counter()
            calibration = _calibration(data, config.calibration_samples) if config.quantization == "static" else None
            info = quantize_int8(fp32.path, tmp / "model.int8.onnx", calibration=calibration, mode=config.quantization,
                                 method=config.calibration_method, per_channel=config.per_channel, reduce_range=config.reduce_range)
            timings["quantize_int8"] = time.perf_counter() - start
            _, report, acc = checked(tmp / "model.int8.onnx", "int8")
            if acc and fp32_acc:
                acc["drop_vs_fp32_pt"] = 100 * (fp32_acc["accuracy"] - acc["accuracy"])
            add(tmp / "model.int8.onnx", "onnx", "int8", report, acc, {"quantization": asdict(info)})

        want_trt = "tensorrt" in config.formats
        trt_reason = None
        if want_trt:
            trt_reason = _tensorrt_unavailable()
            if trt_reason:
                skipped["tensorrt"] = trt_reason
        need_fp16 = "onnx-fp16" in config.formats or (want_trt and not trt_reason and config.trt_precision == "fp16")
        if need_fp16:
            start = time.perf_counter()
            fp16 = export_onnx(model, tmp / "model.fp16.onnx", input_shape=tuple(spec.input_shape), opset=config.opset,
                               precision="fp16", metadata=meta | {"kdedge.precision": "fp16"})
            timings["export_fp16"] = time.perf_counter() - start
            _, report, acc = checked(fp16.path, "fp16")
            add(fp16.path, "onnx", "fp16", report, acc, {"opset": fp16.opset, "nodes": fp16.nodes, "io": "float32"})

        if want_trt and not trt_reason:
            if config.trt_precision == "int8":
                info = quantize_int8(fp32.path, tmp / "model.int8-trt.onnx", calibration=_calibration(data, config.calibration_samples),
                                     method=config.calibration_method, per_channel=config.per_channel, target="tensorrt")
                _, report, acc = checked(tmp / "model.int8-trt.onnx", "int8")
                add(tmp / "model.int8-trt.onnx", "onnx", "int8", report, acc, {"quantization": asdict(info), "for": "tensorrt"})
            start = time.perf_counter()
            artifacts.append(_tensorrt_artifact(tmp, config, spec, parity_inputs, reference_logits, tol, data))
            timings["tensorrt"] = time.perf_counter() - start

        manifest = {
            "schema": EXPORT_SCHEMA,
            "kdedge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model_name,
            "source_sha256": source_sha256,
            "data": spec.to_dict(),
            "input": json.loads(meta["kdedge.input"]),
            "preprocessing": json.loads(meta["kdedge.preprocessing"]),
            "reference": {"runtime": f"torch {torch.__version__} cpu", "parity_samples": int(len(parity_inputs))},
            "config": config.to_dict(),
            "artifacts": [asdict(a) for a in artifacts],
            "skipped": skipped,
            "seconds": timings,
        }
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(out=out, artifacts=artifacts, skipped=skipped, manifest=manifest)


def _tensorrt_unavailable() -> str | None:
    """Why no engine can be built here, or None."""
    from kdedge.exporters.tensorrt import gpu_info, tensorrt_module

    try:
        tensorrt_module()
        gpu_info()
    except BackendUnavailable as exc:
        return str(exc)
    return None


def _tensorrt_artifact(tmp: Path, config: ExportConfig, spec: DatasetSpec, parity_inputs: torch.Tensor, reference: np.ndarray,
                       tol: dict[str, Tolerance], data: DataSplits) -> Artifact:
    from kdedge.exporters.parity import ParityReport
    from kdedge.exporters.tensorrt import EngineProfile, TensorRTEngine, build_engine, plan_engine, tensorrt_module

    trt = tensorrt_module()
    profile = EngineProfile(*config.trt_batch)
    plan = plan_engine(trt.__version__, config.trt_precision, onnx_dir=tmp, input_name="input", sample_shape=tuple(spec.input_shape),
                       profile=profile, workspace_mib=config.trt_workspace_mib)
    engine_path = tmp / f"model.{config.trt_precision}.plan"
    meta = build_engine(plan, engine_path)
    engine = TensorRTEngine(engine_path)

    def run(x: torch.Tensor) -> np.ndarray:
        chunks = [engine(x[i : i + profile.max]).float().cpu().numpy() for i in range(0, len(x), profile.max)]
        return np.concatenate(chunks)

    outputs = run(parity_inputs)
    batch1 = np.concatenate([run(parity_inputs[i : i + 1]) for i in range(min(16, len(parity_inputs)))]) if profile.min == 1 else outputs[:0]
    stats = compare_outputs([outputs], [reference], [batch1], ["logits"], tol[config.trt_precision])
    failures = [f for s in stats for f in s.failures(tol[config.trt_precision])]
    report = ParityReport(artifact=engine_path.name, reference=f"torch {torch.__version__} cpu", runtime=f"tensorrt {trt.__version__} {meta['gpu']['name']}",
                          samples=len(parity_inputs), batch1_samples=len(batch1), tolerance=asdict(tol[config.trt_precision]), outputs=stats,
                          passed=not failures, failures=failures)
    if failures and not config.allow_mismatch:
        from kdedge.errors import ParityError

        raise ParityError(f"{engine_path.name} does not match PyTorch: " + "; ".join(failures) + " (pass --allow-mismatch to keep it anyway)")
    accuracy = None
    if config.evaluate:
        logits = run(data.test.inputs())
        ev = evaluation_from_predictions(torch.from_numpy(logits.argmax(-1)), data.test.labels, spec.num_classes)
        accuracy = {"accuracy": ev.accuracy, "macro_f1": ev.macro_f1, "samples": ev.num_samples, "runtime": report.runtime}
    return Artifact(path=engine_path.name, format="tensorrt", precision=config.trt_precision, bytes=engine_path.stat().st_size,
                    sha256=file_sha256(engine_path), parity=report.to_dict(), accuracy=accuracy, details={"engine": meta})


def export_checkpoint(source: str | Path, config: ExportConfig | None = None) -> ExportResult:
    """``kdedge export``: a run directory, a ``.safetensors`` checkpoint or a shipped zoo name.

    The data for parity, calibration and accuracy is ``config.data``, else the dataset named in
    the checkpoint.
    """
    from kdedge.models.zoo import load_checkpoint, parse_model_name, pretrained_path
    from kdedge.runs import default_out

    config = config or ExportConfig()
    out = Path(config.out) if config.out else default_out("export")
    if out.exists():
        raise ConfigError(f"output directory {out} already exists; pass another --out or remove it")
    path = Path(source).expanduser()
    if not path.exists():
        try:
            arch, width = parse_model_name(str(source))
        except ModelError as exc:
            raise ModelError(f"{source}: no such run directory or checkpoint, nor a shipped model name ({exc})") from None
        shipped = pretrained_path(arch, width, config.data or "fashion-mnist")
        if shipped is None:
            raise ModelError(f"{source}: no such run directory or checkpoint, and kdedge ships no {source} weights for {config.data or 'fashion-mnist'}")
        path = shipped
    ckpt = load_checkpoint(path)
    data_name = config.data or (ckpt.data.name if ckpt.data else None)
    if data_name is None:
        raise DataError(f"{ckpt.path}: records no dataset; pass --data NAME_OR_PATH for parity, calibration and accuracy")
    data = load_dataset(data_name)
    _check_data(tuple(ckpt.spec.input_shape), ckpt.spec.num_classes, data.spec)
    return export_model(ckpt.model, out, data=data, config=config, model_name=ckpt.spec.name, source_sha256=ckpt.sha256)
