"""OpenVINO IR (``model.xml`` + ``model.bin``), converted from kdedge's parity-checked ONNX artifact.

The ONNX frontend reads the artifact as it is: its symbolic batch dimension stays symbolic (one IR
takes any batch), and the Q/DQ pairs of an INT8 artifact become FakeQuantize nodes that the CPU
plugin's low-precision transformations turn into INT8 kernels, with the weights stored as int8 in
the ``.bin``. Weights are saved as they are (``compress_to_fp16=False``; OpenVINO's default would
round an FP32 artifact's weights to FP16). The ``kdedge.*`` metadata lives in the IR's ``rt_info``
(section ``kdedge``), next to the compile settings the artifact was checked with.

Every IR is compiled with :data:`COMPILE_CONFIG`. ``INFERENCE_PRECISION_HINT=f32`` is part of the
artifact's contract: on a CPU with AVX-512 BF16 or AMX the plugin otherwise runs FP32 layers in
bf16 (max |Δ| 0.21 on the shipped teacher's logits).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from kdedge.errors import BackendUnavailable, ConfigError, ExportError
from kdedge.data.pixels import artifact_input

__all__ = ["COMPILE_CONFIG", "RUNTIME_CONFIG_KEY", "Session", "exec_precisions", "export", "read_metadata"]

#: How every IR is compiled (``INFERENCE_NUM_THREADS`` is added when a thread count is given).
#: f32: no silent bf16 on CPUs that have it; LATENCY with one stream: one request uses all its threads;
#: DYNAMIC_QUANTIZATION_GROUP_SIZE=0: the plugin never quantizes activations at run time on its own.
COMPILE_CONFIG: dict[str, str] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
#: The metadata key (in the IR's ``rt_info``) holding :data:`COMPILE_CONFIG` as JSON, for runtimes outside kdedge.
RUNTIME_CONFIG_KEY = "kdedge.openvino_config"
_SECTION = "kdedge"  # rt_info section of the kdedge.* strings
# Exec-graph layer types that move or hold data rather than compute.
_BOOKKEEPING = frozenset({"Const", "Input", "Output", "Parameter", "Result", "Reshape", "Reorder"})
_COMPUTE = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"})


def _openvino():
    """The openvino module, imported with its usage telemetry declined.

    ``import openvino`` sends a telemetry event, from a forked process, unless the user opted out
    with OpenVINO's ``opt_in_out`` script; it writes a client id into the home directory. kdedge
    does not phone home for its users, and a fork in a process already running threads (JAX,
    onnxruntime, a DataLoader) can deadlock: the import is made with ``CI=true``, which OpenVINO's
    own check treats as "declined". ``KDEDGE_OPENVINO_TELEMETRY=1`` leaves OpenVINO's default.
    """
    if "openvino" not in sys.modules and os.environ.get("KDEDGE_OPENVINO_TELEMETRY") != "1":
        saved = os.environ.get("CI")
        os.environ["CI"] = "true"
        try:
            return _import_openvino()
        finally:
            if saved is None:
                os.environ.pop("CI", None)
            else:
                os.environ["CI"] = saved
    return _import_openvino()


def _import_openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable("OpenVINO is not installed; pip install 'kdedge-distill[openvino]'") from exc
    return ov


def _version(ov) -> str:
    return ov.__version__.split("-")[0]  # "2026.4.1-22982-e213a147257-releases/2026/4" -> "2026.4.1"


def _first_line(exc: BaseException) -> str:
    """The line of an OpenVINO error that says what went wrong.

    Its messages read "Exception from src/...cpp:84:", "Check '...' failed at src/...", then the reason.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return ((reasons or lines or [type(exc).__name__])[-1 if reasons else 0])[:300]


#: ``PERFORMANCE_HINT`` values a session may ask for: LATENCY (one stream: one request uses all its threads, kdedge's default)
#: or THROUGHPUT (the plugin picks the streams: several requests at once; a batch-1 caller waits on one of them).
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


def _config(threads: int | None, performance_hint: str = "LATENCY") -> dict[str, str]:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ConfigError(f"OpenVINO: threads {threads!r} is not a thread count; pass an integer >= 1 (0 or None: OpenVINO's choice)")
    if performance_hint not in PERFORMANCE_HINTS:
        raise ConfigError(f"OpenVINO: performance_hint {performance_hint!r} is not one of {', '.join(PERFORMANCE_HINTS)}")
    config = COMPILE_CONFIG | ({"INFERENCE_NUM_THREADS": str(threads)} if threads else {})
    if performance_hint != "LATENCY":
        config = {k: v for k, v in config.items() if k != "NUM_STREAMS"} | {"PERFORMANCE_HINT": performance_hint}
    return config


def export(*, out: Path, precision: str, model: nn.Module | None, onnx: Path | None, input_shape: tuple[int, ...],
           calibration: np.ndarray | None, metadata: dict[str, str], max_batch: int, keep_float: tuple[str, ...] = (),
           per_channel: bool = True) -> dict[str, Any]:
    """Convert ``onnx`` (``model.onnx``, or the QDQ ``model.int8.onnx``) to the IR ``out`` and ``out.with_suffix('.bin')``.

    ``model``, ``calibration``, ``max_batch`` and ``per_channel`` are not used: the IR is the ONNX artifact's graph,
    INT8 comes from its Q/DQ scales and its batch stays dynamic.

    Returns:
        The artifact's details: converter, weights file and bytes, compile settings, the compiled
        model's layer precisions (INT8 evidence) and seconds.

    Raises:
        ExportError: OpenVINO cannot read, convert or compile it (the arguments are checked by ``export_edge``).
    """
    del model, calibration, max_batch, keep_float, per_channel  # the QDQ file has its float layers and weight scales already
    ov = _openvino()
    out, onnx = Path(out), Path(onnx)
    start = time.perf_counter()
    core = ov.Core()
    ir = _read_onnx(ov, core, onnx, input_shape)
    for key, value in (metadata | {RUNTIME_CONFIG_KEY: json.dumps(COMPILE_CONFIG, sort_keys=True)}).items():
        ir.set_rt_info(str(value), [_SECTION, key])
    _canonical_names(ir)
    _save(ov, ir, out)
    converted = time.perf_counter() - start
    compiled = _compile(core, out, threads=None)  # what Session will run: proves the IR loads, shows the kernels' precisions
    layers = exec_precisions(compiled)
    int8 = sum(n for by in layers.values() for p, n in by.items() if p in ("u8", "i8"))
    details: dict[str, Any] = {
        "converter": f"openvino {_version(ov)}: Core.read_model (ONNX frontend), save_model(compress_to_fp16=False)",
        "source": onnx.name, "weights": out.with_suffix(".bin").name, "weights_bytes": out.with_suffix(".bin").stat().st_size,
        "batch": "dynamic", "runtime_config": dict(COMPILE_CONFIG), "exec_precisions": layers, "int8_layers": int8,
        "seconds": {"convert": round(converted, 3), "compile": round(time.perf_counter() - start - converted, 3)},
    }
    if precision == "int8":
        details["int8_execution"] = int8 > 0  # False: this CPU emulates the FakeQuantize nodes in f32
    return details


def _read_onnx(ov, core, onnx: Path, input_shape: tuple[int, ...]):
    """The ONNX artifact as an ``ov.Model`` with a dynamic batch dimension."""
    try:
        ir = core.read_model(str(onnx))
    except Exception as exc:  # openvino raises RuntimeError subclasses with multi-line messages
        raise ExportError(f"OpenVINO cannot read {onnx.name} ({_first_line(exc)}); check that it is the ONNX artifact kdedge exported") from exc
    if len(ir.inputs) != 1:
        raise ExportError(f"{onnx.name} has {len(ir.inputs)} inputs; an OpenVINO artifact is converted from a one-input classifier")
    shape = ir.inputs[0].get_partial_shape()
    sample = [d.get_length() if d.is_static else -1 for d in list(shape)[1:]]
    if shape.rank.is_dynamic or tuple(sample) != tuple(input_shape):
        raise ExportError(f"{onnx.name} takes input {shape}, but the model's input shape is (batch, {', '.join(map(str, input_shape))}); "
                          "convert the ONNX artifact exported for this model")
    if shape[0].is_static:  # a fixed-batch graph: make it take any batch, as kdedge's ONNX does
        try:
            ir.reshape({ir.inputs[0]: ov.PartialShape([-1, *input_shape])})
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot make the batch of {onnx.name} dynamic ({_first_line(exc)}); "
                              "export the ONNX with a dynamic batch dimension") from exc
    return ir


def _canonical_names(ir) -> None:
    """Renumber the node names OpenVINO generates (``Constant_19891``) by the node's position in the graph.

    Their numbers come from a counter shared by the whole process: the same ONNX file converted after
    other conversions (a bundle that also converted its teacher) gave ``Constant_19891`` where a fresh
    process gave ``Constant_5561``, so the ``.xml`` bytes depended on what the process did before.
    Renumbered, they depend on the model alone. Names from the ONNX graph are kept.
    """
    for i, op in enumerate(ir.get_ordered_ops()):
        kind = op.get_type_name()
        if re.fullmatch(rf"{re.escape(kind)}_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{kind}_{i}")


def _save(ov, ir, out: Path) -> None:
    """``ir`` to ``out`` (+ ``.bin``), written in a temporary sibling directory and renamed into place (weights first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        try:
            ov.save_model(ir, str(tmp / out.name), compress_to_fp16=False)
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot save {out.name} ({_first_line(exc)}); check free space and permissions in {out.parent}") from exc
        os.replace(tmp / out.with_suffix(".bin").name, out.with_suffix(".bin"))
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compile(core, path: Path, *, threads: int | None, performance_hint: str = "LATENCY"):
    """``path`` read and compiled for the CPU with :data:`COMPILE_CONFIG`; ExportError naming the file when it cannot be."""
    config = _config(threads, performance_hint)
    ir = _read_ir(core, path)
    try:
        return core.compile_model(ir, "CPU", config)
    except Exception as exc:
        raise ExportError(f"{path}: OpenVINO cannot compile it ({_first_line(exc)}); export it again with this OpenVINO") from exc


def _read_ir(core, path: Path):
    """``path`` and its ``.bin`` as an ``ov.Model``; ExportError naming the file when they are not a readable IR.

    Only an IR: ``read_model`` would also open an ONNX, TensorFlow or PaddlePaddle file under the same name.
    """
    if not path.is_file():
        raise ExportError(f"{path}: no such OpenVINO IR; export it first (kdedge export --format openvino)")
    with path.open("rb") as f:
        head = f.read(512)
    if b"<net " not in head:
        raise ExportError(f"{path}: not an OpenVINO IR (no <net> element at its start); pass the .xml that kdedge exported")
    try:
        return core.read_model(str(path))
    except Exception as exc:  # RuntimeError whose message spans lines
        raise ExportError(f"{path}: OpenVINO cannot read it ({_first_line(exc)}); is it or its {path.with_suffix('.bin').name} truncated "
                          "or corrupt? export it again") from exc


def exec_precisions(compiled) -> dict[str, dict[str, int]]:
    """The compiled model's compute layers: ``{layer type: {runtime precision: count}}`` (e.g. ``{"Convolution": {"u8": 17}}``)."""
    counts: Counter[tuple[str, str]] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind not in _BOOKKEEPING:
            counts[kind, info["runtimePrecision"].astype(str)] += 1
    layers: dict[str, dict[str, int]] = {}
    for (kind, precision), n in sorted(counts.items()):
        layers.setdefault(kind, {})[precision] = n
    return layers


class Session:
    """An IR compiled for OpenVINO's CPU plugin with :data:`COMPILE_CONFIG`.

    Attributes:
        runtime: ``openvino <version> CPU <f32|int8>`` (int8 when any compute layer runs int8 kernels).
        precisions: :func:`exec_precisions` of the compiled model.
    """

    max_batch: int | None = None

    def __init__(self, path: Path, *, threads: int | None = None, performance_hint: str = "LATENCY") -> None:
        ov = _openvino()
        self.path, self.threads, self.performance_hint = Path(path), threads or None, performance_hint
        self._compiled = _compile(ov.Core(), self.path, threads=threads, performance_hint=performance_hint)
        shape = self._compiled.inputs[0].get_partial_shape()
        self.fixed_batch: int | None = shape[0].get_length() if shape[0].is_static else None
        self._sample = tuple(d.get_length() if d.is_static else None for d in list(shape)[1:])
        self._dtype = np.dtype(self._compiled.inputs[0].get_element_type().to_dtype())  # float32, or uint8 (preprocessing in the graph)
        self.precisions = exec_precisions(self._compiled)
        # int8 when a conv or matmul runs int8 kernels; an input-side Eltwise reading uint8 pixels (preprocessing in the graph) is not
        int8 = any(p in ("u8", "i8") for kind, by in self.precisions.items() if kind in _COMPUTE for p in by)
        self.runtime = f"openvino {_version(ov)} CPU {'int8' if int8 else 'f32'}"
        self._request = self._compiled.create_infer_request()

    def _input(self, x: np.ndarray) -> np.ndarray:
        x = artifact_input(x, self._dtype, self.path.name)
        if x.ndim != 1 + len(self._sample) or any(s is not None and s != n for s, n in zip(self._sample, x.shape[1:])):
            raise ConfigError(f"{self.path.name} takes inputs (batch, {', '.join(str(s or '?') for s in self._sample)}) "
                              f"{self._dtype.name}; got {tuple(x.shape)}")
        return x

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(B, K)`` for ``x`` ``(B, C, H, W)``."""
        result = self._request.infer({0: self._input(x)}, share_inputs=True)
        return np.array(result[0], dtype=np.float32)

    def prepare(self, x: np.ndarray) -> Callable[[], Any]:
        """``InferRequest.infer`` on its own request with ``x`` bound once (shared, not copied)."""
        import openvino as ov

        x = self._input(x)
        request = self._compiled.create_infer_request()  # its own request: run() stays usable while this one is timed
        request.set_input_tensor(ov.Tensor(x, shared_memory=True))
        return _Bound(request.infer, x)


class _Bound:
    """One ``infer()`` of a request whose input tensor shares ``x``'s memory (kept alive here)."""

    __slots__ = ("infer", "x")

    def __init__(self, infer: Callable[[], Any], x: np.ndarray) -> None:
        self.infer, self.x = infer, x

    def __call__(self) -> Any:
        return self.infer()


def read_metadata(path: Path) -> dict[str, str]:
    """The ``kdedge.*`` strings in the IR's ``rt_info`` (``{}`` when it has none)."""
    ir = _read_ir(_openvino().Core(), Path(path))
    if not ir.has_rt_info([_SECTION]):
        return {}
    return {key: value.astype(str) for key, value in ir.get_rt_info()[_SECTION].items()}
