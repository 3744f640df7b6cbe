"""Edge runtimes: ExecuTorch (``.pte``, XNNPACK), LiteRT (``.tflite``), OpenVINO (IR ``.xml``/``.bin``) and ONNX Runtime's ORT format.

Each is an :class:`EdgeFormat`: how an artifact is made (from the PyTorch module, or converted
from the parity-checked ONNX artifact), which packages run it (an optional extra of
``kdedge-distill``; ORT format needs only onnxruntime) and the benchmark target that times it.
The pipeline treats every format alike: :func:`export_edge` writes the artifact,
:func:`load_edge` opens it in its own runtime as an :class:`EdgeSession`, and the export checks
its parity against PyTorch and measures its accuracy through that session, as it does for ONNX.

The backends live in their own modules (``pte``, ``tflite``, ``openvino_ir``, ``ort_format``) and
are imported only when a format is used, so ``import kdedge`` never loads a runtime.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from kdedge.errors import BackendUnavailable, ConfigError, ExportError, KdedgeError
from kdedge.exporters._native import cause
from kdedge.exporters.onnx import plain_strides
from kdedge.data.pixels import inner_model
from kdedge.models.qat import QATModel

__all__ = ["EDGE_FORMATS", "EDGE_SETTINGS", "EdgeFormat", "EdgeSession", "artifact_bytes", "artifact_files", "edge_format", "edge_predict",
           "edge_session_kwargs", "edge_unavailable", "export_edge", "load_edge", "read_sidecar", "sidecar_batch", "sidecar_path", "write_sidecar"]


@dataclass(frozen=True)
class EdgeFormat:
    """One edge runtime's artifact format.

    Attributes:
        name: The artifact's ``format`` in ``export.json`` and the prefix of its variants (``executorch-fp32``).
        target: The benchmark target that runs it (``executorch-cpu``).
        suffix: The artifact's file suffix.
        packages: Import names that must be importable to export it.
        run_packages: Import names that must be importable to run it (a device needs the runtime, not the converter).
        extra: The ``kdedge-distill`` extra that installs them (None: they come with kdedge).
        source: ``torch`` (exported from the PyTorch module) or ``onnx`` (converted from the ONNX artifact of the same precision).
        precisions: What it can be exported as.
        module: The kdedge module implementing it (``export`` and ``Session``).
        title: How people call the runtime.
        companions: Suffixes of the files written beside the artifact, named ``<stem><suffix>``
            (OpenVINO's weights ``model.bin``; ORT format's ``model.required_operators.config``,
            which configures a reduced onnxruntime build and is not needed to run the model).
    """

    name: str
    target: str
    suffix: str
    packages: tuple[str, ...]
    run_packages: tuple[str, ...]
    extra: str | None
    source: str
    precisions: tuple[str, ...]
    module: str
    title: str
    companions: tuple[str, ...] = ()


EDGE_FORMATS: dict[str, EdgeFormat] = {
    f.name: f
    for f in (
        EdgeFormat("executorch", "executorch-cpu", ".pte", ("executorch",), ("executorch",), "executorch", "torch", ("fp32", "int8"), "kdedge.exporters.pte",
                   "ExecuTorch (XNNPACK)"),
        EdgeFormat("litert", "litert-cpu", ".tflite", ("litert_torch", "ai_edge_litert"), ("ai_edge_litert",), "litert", "torch", ("fp32", "int8"), "kdedge.exporters.tflite",
                   "LiteRT (TFLite)"),
        EdgeFormat("openvino", "openvino-cpu", ".xml", ("openvino",), ("openvino",), "openvino", "onnx", ("fp32", "int8"), "kdedge.exporters.openvino_ir", "OpenVINO",
                   (".bin",)),
        EdgeFormat("ort", "ort-mobile-cpu", ".ort", ("onnxruntime",), ("onnxruntime",), None, "onnx", ("fp32", "int8"), "kdedge.exporters.ort_format",
                   "ONNX Runtime (ORT format)", (".required_operators.config",)),
    )
}


class EdgeSession(Protocol):
    """An artifact opened in its own runtime.

    Attributes:
        runtime: The runtime and its version, e.g. ``"executorch 1.4.1 XNNPACK"``.
        threads: The thread count it runs with (None: the runtime's default).
        max_batch: The largest batch one call takes (None: any); :func:`edge_predict` chunks to it.
        fixed_batch: When the artifact only takes exactly this batch size (None: any up to ``max_batch``).
    """

    runtime: str
    threads: int | None
    max_batch: int | None
    fixed_batch: int | None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(B, K)`` float32 for one batch ``x`` that the artifact accepts: ``(B, C, H, W)`` float32, or uint8 pixels
        (:mod:`kdedge.data.pixels`)."""
        ...

    def prepare(self, x: np.ndarray) -> Callable[[], Any]:
        """A callable performing exactly one inference on ``x``, with the input already in place (for timing).

        ExecuTorch and LiteRT sessions hold one input slot: a later ``run`` or ``prepare`` on the
        same session replaces what an earlier prepared callable feeds. Time one at a time.
        """
        ...


def edge_format(name: str) -> EdgeFormat:
    try:
        return EDGE_FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown edge format {name!r}; expected one of {', '.join(EDGE_FORMATS)}") from None


def _install_hint(fmt: EdgeFormat) -> str:
    return f"pip install 'kdedge-distill[{fmt.extra}]'" if fmt.extra else "pip install onnxruntime"


def edge_unavailable(name: str, *, purpose: str = "export") -> str | None:
    """None when format ``name`` can be exported (``purpose="export"``) or run (``"run"``) here, else one line naming the extra to install.

    Only looks for the packages (no import): cheap enough for ``formats: auto``.
    """
    fmt = edge_format(name)
    missing = []
    for package in fmt.packages if purpose == "export" else fmt.run_packages:
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a parent package set to None in sys.modules, or a broken spec
            found = False
        if not found:
            missing.append(package)
    if missing:
        return (f"{fmt.title} needs {', '.join(missing)} to {'export' if purpose == 'export' else 'run'}, which "
                f"{'is' if len(missing) == 1 else 'are'} not installed; {_install_hint(fmt)}")
    return None


def _backend(fmt: EdgeFormat, purpose: str):
    why = edge_unavailable(fmt.name, purpose=purpose)
    if why:
        raise BackendUnavailable(why)
    try:
        return importlib.import_module(fmt.module)
    except ImportError as exc:  # installed but broken (a missing shared library, an incompatible torch)
        raise BackendUnavailable(f"{fmt.title} is installed but does not import ({exc}); reinstall with {_install_hint(fmt)}") from exc


def export_edge(
    name: str,
    *,
    out: Path,
    precision: str,
    model: nn.Module | None = None,
    onnx: Path | None = None,
    input_shape: tuple[int, ...],
    calibration: np.ndarray | None = None,
    metadata: dict[str, str],
    max_batch: int = 256,
    keep_float: tuple[str, ...] = (),
    per_channel: bool = True,
) -> dict[str, Any]:
    """Write one edge artifact to ``out`` (its full file name, with the format's suffix); returns its ``details``.

    Args:
        name: The format (a key of :data:`EDGE_FORMATS`).
        out: The artifact's path. A format with companion files (OpenVINO's ``.bin``) writes them
            beside it; :func:`artifact_files` lists them.
        precision: ``fp32`` or ``int8``.
        model: The PyTorch model in eval mode on the CPU (formats whose ``source`` is ``torch``).
        onnx: The parity-checked ONNX artifact of the same precision (formats whose ``source`` is ``onnx``).
        input_shape: One sample's ``(C, H, W)``.
        calibration: Training inputs ``(N, C, H, W)`` float32 for INT8 calibration.
        metadata: The kdedge input contract (``onnx_metadata``); embedded where the format has a
            place for it, else written to the sidecar ``<artifact>.json``.
        max_batch: The largest batch the artifact must take (formats whose batch is bounded at export).
        keep_float: For a quantizer's INT8 (formats whose ``source`` is ``torch``), layers left in float
            (:mod:`kdedge.sensitivity`); an ONNX-sourced format converts a QDQ file that already has them float.
        per_channel: For a quantizer's INT8, one weight scale per output channel (True) or per tensor (for accelerators that
            take only that); an ONNX-sourced format converts a QDQ file quantized either way.

    The arguments are checked here, for every backend: the model or ONNX file its ``source``
    needs, calibration inputs for a quantizer's INT8, a batch bound of at least 1.

    Raises:
        BackendUnavailable: The runtime is not installed (one line naming the extra).
        ExportError: A missing model, ONNX file or calibration, or the converter fails on this model.
    """
    fmt = edge_format(name)
    if precision not in fmt.precisions:
        raise ConfigError(f"{fmt.title} artifacts are exported as {' or '.join(fmt.precisions)}, not {precision}")
    if fmt.source == "torch" and model is None:
        raise ExportError(f"{fmt.title} artifacts are exported from the PyTorch model, and none was given")
    if fmt.source == "onnx" and onnx is None:
        raise ExportError(f"{fmt.title} artifacts are converted from the ONNX artifact; pass onnx= the model.onnx (or model.int8.onnx) to convert")
    learned = isinstance(inner_model(model), QATModel) if model is not None else False  # scales from training, not calibration
    if fmt.source == "torch" and precision == "int8" and not learned and (calibration is None or len(calibration) == 0):
        raise ExportError(f"an INT8 {fmt.title} artifact needs calibration inputs (N, C, H, W); none were given")
    if max_batch < 1:
        raise ExportError(f"max_batch must be at least 1, got {max_batch}")
    if model is not None and fmt.source == "torch" and any(not plain_strides(t) for t in (*model.parameters(), *model.buffers())):
        # A model trained channels-last (kdedge's default on the CPU) keeps NHWC-strided weights; XNNPACK's lowering expects
        # NCHW constants ("Expected ..._fused_bn to be NCHW"), and the artifact's layout is the converter's business, not the trainer's.
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    backend = _backend(fmt, "export")
    try:
        return backend.export(out=out, precision=precision, model=model, onnx=onnx, input_shape=input_shape, calibration=calibration,
                              metadata=metadata, max_batch=max_batch, keep_float=tuple(keep_float) if precision == "int8" and not learned else (),
                              per_channel=per_channel)
    except KdedgeError:
        raise
    except Exception as exc:  # a converter failing where its backend did not expect it: still one line
        raise ExportError(f"{fmt.title} export of {out.name} failed ({cause(exc)}); kdedge --debug shows where") from exc


#: The settings each runtime's sessions take (a bundle's ``recommended[target]["settings"]``, found by
#: :func:`kdedge.bench.tuning.tune_edge`): ORT format's are onnxruntime's (:func:`kdedge.ort.session_kwargs`).
EDGE_SETTINGS: dict[str, tuple[str, ...]] = {"executorch": ("threads",), "litert": ("threads",), "openvino": ("threads", "performance_hint"),
                                             "ort": ("intra_op_threads", "graph_optimization_level", "execution_mode")}


def edge_session_kwargs(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The keywords of format ``name``'s session for a settings dict (:data:`EDGE_SETTINGS`); ConfigError for a key it does not take."""
    allowed = EDGE_SETTINGS[edge_format(name).name]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ConfigError(f"{edge_format(name).title} settings take {', '.join(allowed)}; not {', '.join(unknown)}")
    if name == "ort":
        from kdedge.ort import session_kwargs

        return session_kwargs(settings)
    return dict(settings)


def load_edge(name: str, path: str | Path, *, threads: int | None = None, settings: dict[str, Any] | None = None) -> EdgeSession:
    """Open ``path`` in format ``name``'s runtime, with ``threads`` threads (None: the runtime's default), or with ``settings``
    (:data:`EDGE_SETTINGS`: a tuned thread count, OpenVINO's performance hint, the ORT format's session options), which win.

    ExecuTorch has one thread pool per process: a session opened with ``threads`` replaces it
    (through ExecuTorch's private ``_unsafe_reset_threadpool``), and methods loaded before by code
    other than kdedge's sessions keep a pointer to the old pool. In a process that runs its own
    ExecuTorch programs, open ExecuTorch sessions with ``threads=None``.

    Raises:
        BackendUnavailable: The runtime is not installed.
        ExportError: The file cannot be loaded (truncated, corrupt, another format).
    """
    fmt = edge_format(name)
    kwargs = {"threads": threads} | (edge_session_kwargs(name, settings) if settings else {})
    backend = _backend(fmt, "run")
    try:
        return backend.Session(Path(path), **kwargs)
    except KdedgeError:
        raise
    except Exception as exc:  # a runtime refusing a file in a way its backend did not expect: still one line
        raise ExportError(f"{path}: {fmt.title} cannot load it ({cause(exc)}); is it truncated, corrupt or another format?") from exc


def edge_predict(session: EdgeSession, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Logits for all of ``x`` ``(N, ...)`` through ``session``, in batches it accepts, concatenated.

    A fixed-batch artifact gets batches of exactly that size, the last one zero-padded (its
    padding rows dropped from the output).
    """
    step = session.fixed_batch or min(batch_size, session.max_batch or batch_size)
    outputs = []
    for i in range(0, len(x), step):
        chunk = np.ascontiguousarray(x[i : i + step])  # the session casts to its input's dtype (float32, or uint8 pixels)
        n = len(chunk)
        if n < step and session.fixed_batch is not None:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(np.asarray(session.run(chunk), dtype=np.float32)[:n])
    return np.concatenate(outputs, axis=0) if outputs else np.zeros((0, 0), np.float32)


def artifact_files(name: str, path: Path) -> list[Path]:
    """The files an artifact consists of: itself, its format's companions (OpenVINO's weights, ORT format's operator config), a sidecar."""
    files = [path, *(path.with_name(path.stem + suffix) for suffix in edge_format(name).companions)]
    side = sidecar_path(path)
    if side.is_file():
        files.append(side)
    return files


def artifact_bytes(name: str, path: Path) -> int:
    """What the artifact weighs on the device: its files without the sidecar (OpenVINO: ``.xml`` + ``.bin``)."""
    side = sidecar_path(path)
    return sum(p.stat().st_size for p in artifact_files(name, path) if p != side and not p.name.endswith(".config") and p.is_file())


def sidecar_path(path: Path) -> Path:
    """``model.pte`` -> ``model.pte.json``: the input contract of a format with no metadata of its own."""
    return path.with_name(path.name + ".json")


def int8_scheme(quantizer: str, per_channel: bool) -> dict[str, str]:
    """How a PT2E quantizer's static INT8 artifact is quantized, for its ``details``."""
    return {"quantizer": quantizer, "weights": f"int8 symmetric per {'output channel' if per_channel else 'tensor'}",
            "activations": "int8 per tensor, static (histogram observer)"}


def write_sidecar(path: Path, metadata: dict[str, str], **details: Any) -> Path:
    """Write ``metadata`` (the ``kdedge.*`` strings of :func:`~kdedge.exporters.onnx_metadata`) beside ``path``.

    The JSON-valued keys are stored as JSON, not as strings, so a deployment reads one document.
    """
    doc: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            doc[key] = json.loads(value) if key in ("kdedge.input", "kdedge.preprocessing", "kdedge.labels") else value
        except ValueError:
            doc[key] = value
    doc.update(details)
    side = sidecar_path(path)
    side.write_text(json.dumps(doc, indent=2) + "\n")  # unsorted: read_sidecar then gives back the very strings it was given
    return side


def sidecar_batch(path: Path) -> dict[str, int]:
    """The batch contract an export recorded in the sidecar: ``{"min": 1, "max": M}`` or ``{"fixed": B}``; ``{}`` without a sidecar."""
    side = sidecar_path(path)
    try:
        batch = json.loads(side.read_text()).get("batch") if side.is_file() else None
        return {k: int(v) for k, v in batch.items() if k in ("min", "max", "fixed")} if isinstance(batch, dict) else {}
    except (OSError, ValueError, TypeError, AttributeError):
        raise ExportError(f"{side}: not a readable kdedge sidecar (JSON with an integer batch contract); re-export the artifact or delete the sidecar") from None


def read_sidecar(path: Path) -> dict[str, str]:
    """The metadata of :func:`write_sidecar` back as ``kdedge.*`` strings (as ONNX metadata reads); ``{}`` when absent."""
    side = sidecar_path(Path(path))
    if not side.is_file():
        return {}
    try:
        doc = json.loads(side.read_text())
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in doc.items() if k.startswith("kdedge.")}
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or not an object
        raise ExportError(f"{side}: not a readable kdedge sidecar (a JSON object); re-export the artifact or delete the sidecar") from None
