"""The export pipeline: checkpoint -> ONNX FP32 -> INT8 / FP16 -> TensorRT and edge formats, every step parity-checked.

An export directory holds the artifacts and ``export.json``: for each artifact its format,
precision, bytes, sha256, parity report against PyTorch and measured test accuracy. It is
built under a temporary name and renamed into place, so it is either complete or absent. When
TensorRT (or a GPU) is missing, the ONNX artifacts are still written and the result lists
``tensorrt`` under ``skipped`` with the reason.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge._version import __version__
from kdedge._fs import Claim, claimed, file_sha256, publish_dir
from kdedge.config import EDGE_EXPORT_FORMATS, ExportConfig
from kdedge.data import DataSplits, DatasetSpec, ImageDataset, load_dataset
from kdedge.data.pixels import InputFormat, input_format
from kdedge.data.spec import stratified_rows
from kdedge.metrics import evaluation_from_predictions
from kdedge.errors import BackendUnavailable, ConfigError, DataError, ExportError, ModelError, ParityError
from kdedge.exporters.onnx import cpu_eval, export_onnx
from kdedge.ort import ort_predict, ort_session
from kdedge.exporters.parity import ParityReport, Tolerance, check_outputs, check_parity, compare_outputs
from kdedge.exporters.quantize import quantize_int8
from kdedge.models.dead_channels import silence_dead_channels
from kdedge.models.qat import QATModel
from kdedge.models.zoo import Checkpoint, load_checkpoint, parse_model_name, pretrained_path

__all__ = ["Artifact", "ExportResult", "export_model", "export_checkpoint", "onnx_metadata", "tolerances"]

EXPORT_SCHEMA = 1


@dataclass
class Artifact:
    """One exported file and the evidence that it computes what the PyTorch model computes."""

    path: str  # relative to the export directory
    format: str  # onnx | tensorrt | executorch | litert | openvino | ort
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



def preprocessing(spec: DatasetSpec, fmt: InputFormat | None = None) -> dict[str, Any]:
    """The whole input contract of a model trained on ``spec``: from an image file (or array) to the input tensor.

    ``color`` is the channel order of the pixels (``L``, ``RGB``; None: as the training array stored
    them), ``resize`` the image-folder rule (None: images used at ``size``), then
    ``x = (pixel * scale - mean[c]) / std[c]`` into an NCHW float32 batch, by the caller, or (``fmt``
    a uint8 format; ``in_graph`` true) in the artifact's own graph, fed the pixels as ``input_format``
    says (``uint8-nhwc``: ``(B, H, W, C)``, as decoded).
    """
    fmt = fmt or InputFormat("float", spec.scale or 1.0, tuple(spec.mean), tuple(spec.std))
    c, h, w = spec.input_shape
    resize = None if spec.resize is None else {
        "shorter_side": spec.resize, "interpolation": "bilinear (Pillow Image.Resampling.BILINEAR, antialiased)",
        "crop": "center", "long_side": "int(shorter_side * long / short)", "crop_offset": "round((resized - size) / 2)",
    }
    return {
        "color": spec.color, "channels": c, "channel_order": list(spec.color) if spec.color in ("RGB", "RGBA") else None,
        "layout": fmt.layout, "input_format": fmt.name, "dtype": fmt.dtype, "in_graph": fmt.raw, "size": [h, w], "resize": resize,
        "image_file": ("PIL.ImageOps.exif_transpose, then Image.convert(color); 16-bit grayscale keeps its top 8 bits (pixel >> 8)"
                       if spec.color is not None else None),
        "scale": spec.scale, "mean": list(spec.mean), "std": list(spec.std), "formula": "x = (pixel * scale - mean[c]) / std[c]",
    }


def onnx_metadata(spec: DatasetSpec, *, model_name: str, source_sha256: str | None, input_name: str = "input",
                  fmt: InputFormat | None = None) -> dict[str, str]:
    """``metadata_props`` for an artifact: enough to preprocess an input and name the output.

    The preprocessing is the spec's own (``scale``, ``mean``, ``std``), the values
    :class:`~kdedge.data.ArrayDataset` applied to every input the artifact was checked on; with
    ``fmt`` a uint8 format the artifact does it in its graph and takes the pixels.

    Raises:
        DataError: ``spec`` records no pixel scale (read from a file older than the field).
    """
    if spec.scale is None:
        raise DataError(f"dataset spec {spec.name!r} records no pixel scale, so the preprocessing cannot be declared; "
                        "export with the dataset loaded by kdedge.load_dataset (its spec carries the scale)")
    return {
        "kdedge.version": __version__,
        "kdedge.model": model_name,
        "kdedge.source_sha256": source_sha256 or "",
        "kdedge.dataset": spec.name,
        "kdedge.input": json.dumps(fmt.contract(spec.input_shape, name=input_name) if fmt else
                                   {"name": input_name, "shape": ["batch", *spec.input_shape], "dtype": "float32", "layout": "NCHW", "format": "float"}),
        "kdedge.preprocessing": json.dumps(preprocessing(spec, fmt)),
        "kdedge.labels": json.dumps(list(spec.labels)),
        "kdedge.precision": "fp32",
    }


def _accuracy(predict: Callable[[np.ndarray], np.ndarray], inputs: Callable[[], Iterator[np.ndarray]], split: ImageDataset, *,
              runtime: str = "onnxruntime cpu") -> dict[str, Any]:
    """Accuracy over ``split`` of ``predict`` (a batch of normalized inputs -> logits), fed ``inputs()`` in order."""
    logits = np.concatenate([predict(x) for x in inputs()])
    ev = evaluation_from_predictions(torch.from_numpy(logits.argmax(-1)), split.labels, split.spec.num_classes)
    return {"accuracy": ev.accuracy, "macro_f1": ev.macro_f1, "samples": ev.num_samples, "runtime": runtime}


def _calibration(data: DataSplits, n: int, seed: int = 0) -> np.ndarray:
    """``n`` training inputs, a seeded subset that holds every class in its share (:func:`~kdedge.data.spec.stratified_rows`)."""
    return data.train.sample(n, seed=seed).numpy()


def _check_data(model_input: tuple[int, ...] | None, num_classes: int | None, spec: DatasetSpec) -> None:
    if model_input is not None and tuple(model_input) != tuple(spec.input_shape) or num_classes is not None and num_classes != spec.num_classes:
        raise DataError(
            f"the model expects inputs {tuple(model_input or ())} and {num_classes} classes, but data {spec.name!r} has inputs "
            f"{tuple(spec.input_shape)} and {spec.num_classes} classes; pass the dataset the model was trained on with --data"
        )


def export_model(
    model: nn.Module,
    out: str | Path | Claim | None,
    *,
    data: DataSplits,
    config: ExportConfig | None = None,
    model_name: str | None = None,
    source_sha256: str | None = None,
    log: Callable[[str], None] | None = None,
    int8_model: QATModel | None = None,
) -> ExportResult:
    """Export ``model`` to every format in ``config.formats``, checking each against PyTorch.

    Args:
        model: A classifier ``(B, C, H, W) -> (B, K)`` in any mode, on any device; it is exported
            in eval mode from the CPU and left as it was.
        out: The export directory to create (must not exist; None: ``runs/export-<time>``). It is
            claimed when the export starts, so two exports never write the same directory.
        data: Real data: ``config.parity_samples`` test inputs drive parity and
            ``config.calibration_samples`` training inputs calibrate INT8 (seeded subsets holding
            every class in its share, :func:`~kdedge.data.spec.stratified_rows`), and the
            whole test split measures each artifact's accuracy.
        config: Formats, tolerances, calibration, TensorRT profile.
        model_name: Recorded in the metadata (default: the class name).
        source_sha256: sha256 of the checkpoint the model came from, recorded in the metadata.
        log: Called with one line per stage (export, parity, calibration, accuracy).
        int8_model: The quantization-aware model trained from ``model`` (:func:`kdedge.qat_distill`): every INT8
            format (but TensorRT's, still calibrated) is built from it, with the scales it was trained with (no
            calibration), and checked against its INT8 graph in PyTorch (``convert_pt2e``), its agreement with the fake
            quantization recorded; FP32 and FP16 come from ``model``, and each INT8 artifact's ``drop_vs_fp32_pt`` is
            against ``model``'s FP32 ONNX file. None: INT8 is post-training quantized.

    Raises:
        ParityError: An artifact's outputs differ from PyTorch beyond tolerance (unless
            ``config.allow_mismatch``); nothing is written.
        BackendUnavailable: An edge format's runtime is not installed (checked first; the
            message names the extra to install).
        ExportError, DataError: The model cannot be exported, or the data does not fit it.
    """
    config = config or ExportConfig()
    if int8_model is not None and (not isinstance(int8_model, QATModel) or isinstance(model, QATModel)):
        raise ConfigError("int8_model is the quantization-aware model (kdedge.qat_distill) trained from model, the FP32 one; "
                          f"got {type(int8_model).__name__} for int8_model and {type(model).__name__} for model")
    _check_edge_runtimes(config.formats)
    with claimed(out, "export") as claim:
        return _export(model, claim.path, data=data, config=config, model_name=model_name or type(model).__name__, source_sha256=source_sha256, log=log,
                       int8_model=int8_model)


def _export(model: nn.Module, out: Path, *, data: DataSplits, config: ExportConfig, model_name: str, source_sha256: str | None,
            log: Callable[[str], None] | None, int8_model: QATModel | None = None) -> ExportResult:
    _check_float_layers(model, int8_model, config)
    _check_granularity(model, int8_model, config)
    fmt = input_format(config.input_format, data.spec)
    quantized = cpu_eval(int8_model) if int8_model is not None else contextlib.nullcontext(None)
    with cpu_eval(model) as cpu_model, quantized as cpu_int8, publish_dir(out) as tmp:
        writer = _ArtifactWriter(cpu_model, tmp, data=data, config=config, log=log or (lambda _line: None),
                                 meta=onnx_metadata(data.spec, model_name=model_name, source_sha256=source_sha256, fmt=fmt), fmt=fmt)
        # INT8 from the quantization-aware model, checked against its INT8 graph; the rest from the FP32 model.
        int8_writer = writer.sharing(cpu_int8) if cpu_int8 is not None else writer
        qat = cpu_model.qat_formats if isinstance(cpu_model, QATModel) else None
        if qat is not None:  # a quantization-aware model ships INT8 with the scales it was trained with, in the runtimes that take them
            for name in config.formats:
                if name not in qat:
                    writer.skipped[name] = (f"a quantization-aware ({cpu_model.scheme}) model ships INT8 with the scales it was trained with, through "
                                            f"{', '.join(qat)}; export the FP32 student it was trained from for {name}")
            if not any(name in qat for name in config.formats):
                raise ConfigError(f"a quantization-aware model exports to {', '.join(qat)}, none of which was asked for "
                                  f"({', '.join(config.formats)}); pass --format {','.join(qat)}")
            fp32 = None
        else:
            fp32 = writer.fp32()
        if "onnx-int8" in config.formats and int8_writer is not writer:
            int8_writer.qat_int8(fp32)
        elif "onnx-int8" in config.formats and fp32 is not None:
            writer.int8(fp32)
        elif "onnx-int8" in config.formats and qat is not None:
            writer.qat_int8()
        trt_reason = _tensorrt_unavailable() if "tensorrt" in config.formats else None
        if trt_reason:
            writer.skipped["tensorrt"] = trt_reason
        want_trt = "tensorrt" in config.formats and not trt_reason and fp32 is not None
        if fp32 is None:
            pass
        elif "onnx-fp16" in config.formats or (want_trt and config.trt_precision == "fp16"):
            writer.fp16()
        if want_trt:
            writer.tensorrt(fp32)
        onnx_by_precision = {a.precision: a for a in writer.artifacts if a.format == "onnx" and a.details.get("for") != "tensorrt"}
        for name in EDGE_EXPORT_FORMATS:  # in a fixed order, whatever order the formats were given in
            if name in config.formats and name not in writer.skipped:
                fmt, precision = (name[: -len("-int8")], "int8") if name.endswith("-int8") else (name, "fp32")
                w = int8_writer if precision == "int8" else writer
                try:
                    w.edge(fmt, precision, onnx_by_precision, fp32)
                except ExportError as exc:  # ParityError included: this runtime's INT8 is named and left out; the other artifacts stand
                    if precision != "int8" or not config.skip_failed_int8:
                        raise
                    w.discard(fmt, precision)
                    writer.skipped[name] = f"{name} failed and was left out: {exc}"
                    writer.log(f"skipped {name}: {exc}")
        int8_reference = ({"runtime": f"torch {torch.__version__} cpu", "model": "the quantization-aware model converted to INT8 (torchao convert_pt2e: "
                           "the scales it trained with), not the FP32 one; agreement with its fake quantization under each artifact's parity.fake_quant",
                           "quantization": int8_model.quantization()} if int8_model is not None else None)
        manifest = {
            "schema": EXPORT_SCHEMA,
            "kdedge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model_name,
            "source_sha256": source_sha256,
            "data": data.spec.to_dict(),
            "input": json.loads(writer.meta["kdedge.input"]),
            "preprocessing": json.loads(writer.meta["kdedge.preprocessing"]),
            "reference": {"runtime": f"torch {torch.__version__} cpu", "parity_samples": int(len(writer.parity_inputs)),
                      "parity_classes": writer.parity_classes, **({"int8": int8_reference} if int8_reference else {})},
            "config": config.to_dict(),
            "artifacts": [asdict(a) for a in writer.artifacts],
            "skipped": writer.skipped,
            "seconds": writer.timings,
        }
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(out=out, artifacts=writer.artifacts, skipped=writer.skipped, manifest=manifest)


def _check_granularity(model: nn.Module, int8_model: QATModel | None, config: ExportConfig) -> None:
    """A quantization-aware model ships the weight granularity it was trained with: asking for the other one is refused."""
    trained = int8_model if int8_model is not None else model if isinstance(model, QATModel) else None
    if trained is None or config.per_channel is None or config.per_channel == trained.per_channel:
        return
    have, want = ("per-channel", "per-tensor") if trained.per_channel else ("per-tensor", "per-channel")
    other = trained.scheme.removesuffix("-per-tensor") + ("-per-tensor" if trained.per_channel else "")
    raise ConfigError(f"--{want}: the quantization-aware model was trained with {have} weight scales (scheme {trained.scheme}) and its INT8 "
                      f"ships them; drop --{want}, or train it with --qat-scheme {other}")


def _check_float_layers(model: nn.Module, int8_model: QATModel | None, config: ExportConfig) -> None:
    """``config.keep_float`` names layers of ``model``; a quantization-aware model ships the float layers it was trained with."""
    if not config.keep_float:
        return
    trained = int8_model if int8_model is not None else model if isinstance(model, QATModel) else None
    if trained is not None:
        if tuple(sorted(set(config.keep_float))) != trained.keep_float:
            raise ConfigError(f"keep_float {', '.join(config.keep_float)}: a quantization-aware model ships INT8 with the float layers it was trained "
                              f"with ({', '.join(trained.keep_float) or 'none'}); train it with --keep-float, or drop the option here")
        return
    if not any(f.endswith("-int8") for f in config.formats):
        raise ConfigError(f"keep_float {', '.join(config.keep_float)} keeps layers of an INT8 artifact in float, but no INT8 format was asked for "
                          f"({', '.join(config.formats)}); add onnx-int8 or drop --keep-float")
    from kdedge.models.float_layers import check_float_layers

    check_float_layers(model, config.keep_float)


class _ArtifactWriter:
    """Writes the artifacts of one export into ``tmp``, each checked against the PyTorch reference."""

    def __init__(self, model: nn.Module, tmp: Path, *, data: DataSplits, config: ExportConfig, log: Callable[[str], None], meta: dict[str, str],
                 fmt: InputFormat) -> None:
        self.model, self.tmp, self.data, self.config, self.log, self.meta, self.fmt = model, tmp, data, config, log, meta, fmt
        # What is exported: the model, or the model behind its preprocessing (uint8 pixels in). Parity and accuracy feed each artifact
        # the same images as the reference, as it takes them (fmt.feed), and compare with the float model on the normalized inputs.
        self.exported = fmt.wrap(model).eval()
        self.input_shape = fmt.shape(tuple(data.spec.input_shape))
        # Layer names are the model's; behind the wrapper the ONNX file names its weights "model.<layer>.weight" (the PT2E
        # quantizers are told the wrapper instead, and record the model's names)
        self.onnx_keep_float = tuple(f"model.{n}" for n in config.keep_float) if fmt.raw else tuple(config.keep_float)
        self.tol = tolerances(config)
        rows = stratified_rows(data.test.labels, config.parity_samples)  # every class in its share, never the first N files
        self.parity_inputs = data.test.inputs(rows)
        self.parity_classes = int(torch.unique(data.test.labels[rows]).numel())
        with torch.inference_mode():  # in batches: 1,000 images of 3×224×224 through a large model at once would not fit
            self.reference = torch.cat([model(x) for x in self.parity_inputs.split(64)]).numpy()  # (N, K): what every artifact must reproduce
        _check_data(None, int(self.reference.shape[-1]), data.spec)
        # INT8 from a quantization-aware model is checked against its INT8 graph in PyTorch (torchao's convert_pt2e of the trained
        # model: the scales it trained with), in steps of its INT8 output: every runtime computes those integers up to its kernels'
        # rounding (measured: within 1 step), so this is far tighter than a PTQ file's agreement, and a file with other scales
        # fails it. Its agreement with the fake-quantized model that training evaluated is measured beside it (PT2E's fake
        # quantization is not bit-exact with its own conversion: 4-11 steps apart, measured), and recorded, not gated.
        self.int8_step: float | None = None
        self.fake_quant: np.ndarray | None = None
        if isinstance(model, QATModel):
            graph = model.converted()
            self.int8_step = model.output_scale(graph)
            with torch.inference_mode():
                self.fake_quant, self.reference = self.reference, torch.cat([graph(x) for x in self.parity_inputs.split(64)]).numpy()
            if self.int8_step:
                self.tol = self.tol | {"int8": Tolerance(atol=config.qat_max_steps * self.int8_step, min_agreement=config.qat_min_agreement)}
            else:
                log("parity: the quantization-aware model's output is not quantized; its INT8 artifacts are judged by argmax agreement only")
        self._silenced: tuple[nn.Module, dict[str, list[int]]] | None = None  # what PTQ quantizes: see _ptq_source
        self._sources: dict[str, Callable[[], Iterator[np.ndarray]]] = {}  # split -> its normalized inputs, built once per export
        self.artifacts: list[Artifact] = []
        self.skipped: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def sharing(self, model: nn.Module) -> _ArtifactWriter:
        """A writer for ``model`` (its own PyTorch reference) that records into this one's artifacts, skips and timings."""
        other = _ArtifactWriter(model, self.tmp, data=self.data, config=self.config, log=self.log, meta=self.meta, fmt=self.fmt)
        other.artifacts, other.skipped, other.timings, other._sources = self.artifacts, self.skipped, self.timings, self._sources
        return other

    def _ptq_source(self) -> tuple[nn.Module, dict[str, list[int]]]:
        """The model post-training quantization calibrates and converts: the exported one, with its dead BatchNorm channels
        silenced for per-tensor weights (:mod:`kdedge.models.dead_channels`: the same function on the data, no outlier in the
        folded weights), and ``{BatchNorm: [channel, ...]}`` silenced (empty: the exported model itself)."""
        if self._silenced is None:
            model, silenced = (self.model, {}) if self.config.weights_per_channel else silence_dead_channels(self.model, tuple(self.data.spec.input_shape))
            self._silenced = (self.fmt.wrap(model).eval() if silenced else self.exported, silenced)
            if silenced:
                self.log(f"int8: {sum(map(len, silenced.values()))} constant BatchNorm channel(s) (running variance or γ 0) silenced before "
                         f"per-tensor quantization ({', '.join(silenced)})")
        return self._silenced

    def _ptq_onnx(self, fp32: Artifact, work: Path) -> Path:
        """The FP32 ONNX file the ONNX INT8 files quantize: the shipped one, or the silenced model's, exported into ``work``."""
        model, silenced = self._ptq_source()
        if not silenced:
            return self.tmp / fp32.path
        return export_onnx(model, work / "silenced.onnx", input_shape=self.input_shape, opset=self.config.opset, metadata=self.meta,
                           slim=self.config.slim).path

    def discard(self, name: str, precision: str) -> None:
        """Remove whatever a failed edge export of ``name`` at ``precision`` left in the export directory."""
        from kdedge.exporters.edge import artifact_files, edge_format

        path = self.tmp / (("model" if precision == "fp32" else f"model.{precision}") + edge_format(name).suffix)
        for f in artifact_files(name, path):
            f.unlink(missing_ok=True)

    def _source(self, split: str, data: ImageDataset) -> Callable[[], Iterator[np.ndarray]]:
        if split not in self._sources:
            self._sources[split] = data.pass_source()  # a small split normalized once; a large one streamed per pass
        return self._sources[split]

    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        self.timings[key] = time.perf_counter() - start
        return result

    def _checked(self, path: Path, precision: str, fmt: str, details: dict[str, Any], *, fp32_accuracy: dict | None = None) -> Artifact:
        """Parity (and accuracy) of ``path`` in onnxruntime; the artifact is recorded only when it passes."""
        self.log(f"parity: {path.name} vs PyTorch on {len(self.parity_inputs)} test images ({precision} tolerance)")
        session = ort_session(path)
        report = self._timed(f"parity_{path.stem}", lambda: check_parity(path, lambda _x: self.reference, self.parity_inputs, tolerance=self.tol[precision],
                                                                            allow_mismatch=self.config.allow_mismatch, session=session, feed=self.fmt.feed))
        return self._record(path, precision, fmt, details, report, lambda x: ort_predict(session, self.fmt.feed(x), batch_size=500), "onnxruntime cpu",
                            fp32_accuracy=fp32_accuracy)

    def _record(self, path: Path, precision: str, fmt: str, details: dict[str, Any], report: ParityReport, predict: Callable[[np.ndarray], np.ndarray],
                runtime: str, *, fp32_accuracy: dict | None = None) -> Artifact:
        """Measure the accuracy of an artifact that passed parity (through ``predict``, its own runtime) and record it."""
        accuracy = None
        if self.config.evaluate:
            self.log(f"accuracy: {path.name} on {len(self.data.test)} test images" + (f" and {len(self.data.val)} validation images" if self.data.val else ""))
            accuracy = _accuracy(predict, self._source("test", self.data.test), self.data.test, runtime=runtime)
            if self.data.val is not None:  # what the gates of compress-and-export judge
                accuracy["val_accuracy"] = _accuracy(predict, self._source("val", self.data.val), self.data.val, runtime=runtime)["accuracy"]
            if fp32_accuracy:
                accuracy["drop_vs_fp32_pt"] = 100 * (fp32_accuracy["accuracy"] - accuracy["accuracy"])
                if "val_accuracy" in accuracy:
                    accuracy["val_drop_vs_fp32_pt"] = 100 * (fp32_accuracy["val_accuracy"] - accuracy["val_accuracy"])
        parity = report.to_dict()
        if precision == "int8" and self.int8_step:
            parity |= {"reference_graph": "the quantization-aware model converted to INT8 (torchao convert_pt2e)",
                       "output_step": self.int8_step, "max_abs_diff_steps": report.outputs[0].max_abs_diff / self.int8_step}
        if precision == "int8" and self.fake_quant is not None:
            out = predict(self.parity_inputs.numpy()).astype(np.float64)
            diff = np.abs(out - self.fake_quant)
            parity["fake_quant"] = {"argmax_agreement": float((out.argmax(-1) == self.fake_quant.argmax(-1)).mean()), "samples": int(len(out)),
                                    "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
            if self.int8_step:
                parity["fake_quant"] |= {"max_abs_diff_steps": float(diff.max()) / self.int8_step, "mean_abs_diff_steps": float(diff.mean()) / self.int8_step}
        a = Artifact(path=path.name, format=fmt, precision=precision, bytes=path.stat().st_size, sha256=file_sha256(path),
                     parity=parity, accuracy=accuracy, details=details)
        self.artifacts.append(a)
        return a

    def fp32(self) -> Artifact:
        self.log(f"export: ONNX FP32 (opset {self.config.opset})")
        fp32 = self._timed("export_fp32", lambda: export_onnx(self.exported, self.tmp / "model.onnx", input_shape=self.input_shape, opset=self.config.opset,
                                                               metadata=self.meta, slim=self.config.slim))
        return self._checked(fp32.path, "fp32", "onnx", {"opset": fp32.opset, "nodes": fp32.nodes, "nodes_before_slim": fp32.nodes_before_slim})

    def int8(self, fp32: Artifact) -> Artifact:
        c = self.config
        static = c.quantization == "static"
        self.log(f"int8: {'calibrating on %d training images (%s)' % (min(c.calibration_samples, len(self.data.train)), c.calibration_method) if static else 'dynamic quantization'}")
        calibration = self.fmt.feed(_calibration(self.data, c.calibration_samples)) if static else None
        path = self.tmp / "model.int8.onnx"
        with tempfile.TemporaryDirectory(prefix="kdedge-ptq-") as work:
            source = self._ptq_onnx(fp32, Path(work))
            info = self._timed("quantize_int8", lambda: quantize_int8(source, path, calibration=calibration, mode=c.quantization,
                                                                       method=c.calibration_method, per_channel=c.weights_per_channel,
                                                                       reduce_range=c.reduce_range, keep_float=self.onnx_keep_float))
        info.float_layers = list(c.keep_float) or None  # as the user named them
        return self._checked(path, "int8", "onnx", {"quantization": asdict(info) | self._silenced_record()}, fp32_accuracy=fp32.accuracy)

    def _silenced_record(self) -> dict[str, Any]:
        silenced = self._silenced[1] if self._silenced else {}
        return {"dead_channels_silenced": silenced} if silenced else {}

    def qat_int8(self, fp32: Artifact | None = None) -> Artifact:
        """The QDQ ONNX file of a quantization-aware model: its converted graph exported as it is, with the scales it was trained with."""
        self.log("export: ONNX INT8 (QDQ) with the scales the quantization-aware model was trained with")
        path = self.tmp / "model.int8.onnx"
        onnx = self._timed("export_int8", lambda: export_onnx(self.fmt.wrap(self.model.deployable()), path, input_shape=self.input_shape,  # type: ignore[operator]
                                                                opset=self.config.opset, metadata=self.meta | {"kdedge.precision": "int8"}))
        return self._checked(onnx.path, "int8", "onnx", {"opset": onnx.opset, "nodes": onnx.nodes, "quantization": self.model.quantization()},  # type: ignore[operator]
                             fp32_accuracy=fp32.accuracy if fp32 is not None else None)

    def fp16(self) -> Artifact:
        self.log("export: ONNX FP16 (FP32 inputs and outputs)")
        path = self.tmp / "model.fp16.onnx"
        fp16 = self._timed("export_fp16", lambda: export_onnx(self.exported, path, input_shape=self.input_shape, opset=self.config.opset,
                                                               precision="fp16", metadata=self.meta | {"kdedge.precision": "fp16"}))
        return self._checked(fp16.path, "fp16", "onnx", {"opset": fp16.opset, "nodes": fp16.nodes, "io": "float32"})

    def edge(self, name: str, precision: str, onnx: dict[str, Artifact], fp32: Artifact | None) -> Artifact:
        """An edge artifact (``kdedge.exporters.edge``), parity-checked and scored in its own runtime."""
        from kdedge.exporters.edge import artifact_bytes, artifact_files, edge_format, edge_predict, export_edge, load_edge

        c, fmt = self.config, edge_format(name)
        path = self.tmp / (("model" if precision == "fp32" else f"model.{precision}") + fmt.suffix)
        source = onnx.get(precision) if fmt.source == "onnx" else None
        self.log(f"export: {fmt.title} {precision.upper()}" + (f" from {source.path}" if source else ""))
        qat = isinstance(self.model, QATModel)  # its scales come from training: no calibration
        ptq = precision == "int8" and fmt.source == "torch" and not qat
        calibration = self.fmt.feed(_calibration(self.data, c.calibration_samples)) if ptq else None
        details = self._timed(f"export_{name}_{precision}", lambda: export_edge(
            name, out=path, precision=precision, model=self._ptq_source()[0] if ptq else self.exported, onnx=self.tmp / source.path if source else None,
            input_shape=self.input_shape, calibration=calibration, metadata=self.meta | {"kdedge.precision": precision},
            max_batch=c.edge_max_batch, keep_float=c.keep_float, per_channel=c.weights_per_channel))
        if ptq or (precision == "int8" and source is not None and not qat):  # OpenVINO and the ORT format convert the PTQ QDQ file
            details |= self._silenced_record()
        details["files"] = {p.name: file_sha256(p) for p in artifact_files(name, path)[1:]}  # companions: OpenVINO's .bin, a sidecar
        session = load_edge(name, path)
        details["runtime"] = session.runtime
        self.log(f"parity: {path.name} in {session.runtime} vs PyTorch on {len(self.parity_inputs)} test images ({precision} tolerance)")

        def predict(x: np.ndarray) -> np.ndarray:
            return edge_predict(session, self.fmt.feed(x), batch_size=500)

        report = self._timed(f"parity_{path.name}", lambda: check_outputs(predict, lambda _x: self.reference, self.parity_inputs, artifact=path.name,
                                                                         runtime=session.runtime, tolerance=self.tol[precision],
                                                                         allow_mismatch=c.allow_mismatch))
        a = self._record(path, precision, name, details, report, predict, session.runtime,
                         fp32_accuracy=fp32.accuracy if precision != "fp32" and fp32 is not None else None)
        a.bytes = artifact_bytes(name, path)
        return a

    def tensorrt(self, fp32: Artifact) -> Artifact:
        c = self.config
        if c.trt_precision == "int8":
            self.log(f"int8 (TensorRT): symmetric Q/DQ, calibrating on {min(c.calibration_samples, len(self.data.train))} training images")
            path = self.tmp / "model.int8-trt.onnx"
            with tempfile.TemporaryDirectory(prefix="kdedge-ptq-") as work:
                info = quantize_int8(self._ptq_onnx(fp32, Path(work)), path, calibration=_calibration(self.data, c.calibration_samples),
                                     method=c.calibration_method, per_channel=c.weights_per_channel, target="tensorrt", keep_float=c.keep_float)
            self._checked(path, "int8", "onnx", {"quantization": asdict(info) | self._silenced_record(), "for": "tensorrt"})
        self.log(f"export: TensorRT {c.trt_precision} engine (batch {','.join(map(str, c.trt_batch))})")
        a = self._timed("tensorrt", lambda: _tensorrt_artifact(self.tmp, c, self.data.spec, self.parity_inputs, self.reference, self.tol, self.data))
        self.artifacts.append(a)
        return a


def _check_edge_runtimes(formats: tuple[str, ...]) -> None:
    """BackendUnavailable, before any work, when an edge format is asked for and its runtime is not installed."""
    from kdedge.exporters.edge import edge_unavailable

    missing = [why for name in dict.fromkeys(f.removesuffix("-int8") for f in formats if f in EDGE_EXPORT_FORMATS) if (why := edge_unavailable(name))]
    if missing:
        raise BackendUnavailable("; ".join(missing))


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
        raise ParityError(f"{engine_path.name} does not match PyTorch: " + "; ".join(failures) + " (pass --allow-mismatch to keep it anyway)")
    accuracy = None
    if config.evaluate:
        logits = np.concatenate([run(x) for x in data.test.pass_source()()])
        ev = evaluation_from_predictions(torch.from_numpy(logits.argmax(-1)), data.test.labels, spec.num_classes)
        accuracy = {"accuracy": ev.accuracy, "macro_f1": ev.macro_f1, "samples": ev.num_samples, "runtime": report.runtime}
    return Artifact(path=engine_path.name, format="tensorrt", precision=config.trt_precision, bytes=engine_path.stat().st_size,
                    sha256=file_sha256(engine_path), parity=report.to_dict(), accuracy=accuracy, details={"engine": meta})


def export_checkpoint(source: str | Path, config: ExportConfig | None = None, *, trust_code: bool = False,
                      log: Callable[[str], None] | None = None) -> ExportResult:
    """``kdedge export``: a run directory, a ``.safetensors`` checkpoint or a shipped zoo name.

    The data for parity, calibration and accuracy is ``config.data``, else the dataset named in
    the checkpoint. ``trust_code`` lets a checkpoint run the factory code it names (see
    :func:`~kdedge.models.load_checkpoint`).
    """
    config = config or ExportConfig()
    with claimed(config.out, "export") as claim:  # claimed before anything is loaded: a taken --out fails at once
        return _export_checkpoint(source, config, claim, trust_code=trust_code, log=log)


def _export_checkpoint(source: str | Path, config: ExportConfig, out: Claim, *, trust_code: bool, log: Callable[[str], None] | None) -> ExportResult:
    ckpt, data = load_source(source, data=config.data, image_size=config.image_size, layout=config.layout, trust_code=trust_code)
    return export_model(ckpt.model, out, data=data, config=config, model_name=ckpt.spec.name, source_sha256=ckpt.sha256, log=log)


def load_source(source: str | Path, *, data: str | None = None, image_size: int | None = None, layout: str | None = None,
                val_split: float | None = None, trust_code: bool = False) -> tuple[Checkpoint, DataSplits]:
    """A run directory, ``.safetensors`` checkpoint or shipped zoo name, and its data (``data``, else the dataset it records).

    An image folder is loaded at the size and with the mean/std the model was trained with.
    """
    path = Path(source).expanduser()
    if not path.exists():
        try:
            arch, width = parse_model_name(str(source))
        except ModelError as exc:
            raise ModelError(f"{source}: no such run directory or checkpoint, nor a shipped model name ({exc})") from None
        shipped = pretrained_path(arch, width, data or "fashion-mnist")
        if shipped is None:
            raise ModelError(f"{source}: no such run directory or checkpoint, and kdedge ships no {source} weights for {data or 'fashion-mnist'}")
        path = shipped
    ckpt = load_checkpoint(path, trust_code=trust_code)
    data_name = data or (ckpt.data.name if ckpt.data else None)
    if data_name is None:
        raise DataError(f"{ckpt.path}: records no dataset; pass --data NAME_OR_PATH for parity, calibration and accuracy")
    recorded = ckpt.data
    resize = image_size or (recorded.resize if recorded is not None else None)  # an image folder at the size the model was trained on
    # An image folder's mean/std are measured on a sample of it: reuse the model's, so a folder that gained images since keeps its contract.
    norm = (recorded.mean, recorded.std) if recorded is not None else None  # (load_dataset applies it to image folders only)
    splits = load_dataset(data_name, image_size=resize, layout=layout, norm=norm, val_split=val_split)
    _check_data(tuple(ckpt.spec.input_shape), ckpt.spec.num_classes, splits.spec)
    return ckpt, splits
