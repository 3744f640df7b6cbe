"""LiteRT (TFLite) ``.tflite`` models, converted with ``litert_torch`` and run by ``ai_edge_litert`` (``litert`` extra).

**Batch.** ``litert_torch`` cannot convert a dynamic batch today: with
``dynamic_shapes`` its JAX-bridged lowerings (``view`` from ``flatten``, ``mul``, ``relu``) reject
symbolic sizes. So the model is converted at a static example batch, and the batch is then freed in
the flatbuffer: every ``RESHAPE`` whose constant target starts with that batch (and whose input
does) gets ``-1`` there, and the input and output get the shape signature ``[-1, ...]`` (what the
TFLite converter writes for a dynamic batch), so ``Interpreter.resize_tensor_input`` takes any batch.
The result is verified before it is kept — a batch of several inputs must give, row for row, what
each gives alone. A model that fails the check (an op that bakes the batch into another constant)
is converted again at batch 1 and recorded as fixed at 1.

**INT8** is full-integer static PT2E: ``litert_torch``'s ``PT2EQuantizer`` (int8 weights
symmetric per output channel, int8 activations per tensor from a histogram observer) calibrated on
real training inputs, converted with ``QuantConfig``. The model's input and output are int8 with
their scale and zero point in the model; :class:`Session` quantizes and dequantizes, so it takes
and returns float32 like every session. Ops the quantizer leaves in float (an add whose ReLU
module is shared) run between DEQUANTIZE/QUANTIZE pairs; ``details`` counts them.

The input contract is written to the sidecar ``model.tflite.json`` and also embedded as the
flatbuffer metadata entry ``kdedge`` (a JSON object of the ``kdedge.*`` strings).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge._fs import atomic_write_bytes
from kdedge.data.pixels import PixelInput, artifact_input, example_input, inner_model
from kdedge.errors import ExportError
from kdedge.exporters._native import cause, last_native_line, quiet, version_of
from kdedge.exporters.edge import int8_scheme, read_sidecar, sidecar_batch, write_sidecar
from kdedge.models.qat import QATModel

__all__ = ["Session", "export", "read_metadata"]

# The static batch the converter sees before the batch is freed: not 1, which torch.export
# specializes and which a reshape could use for any other unit dimension.
_EXPORT_BATCH = 3
_METADATA_NAME = "kdedge"
_NOISY = ("torchao", "torch.utils._pytree", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "absl", "jax")


def export(*, out: Path, precision: str, model: nn.Module | None, onnx: Path | None, input_shape: tuple[int, ...],
           calibration: np.ndarray | None, metadata: dict[str, str], max_batch: int, keep_float: tuple[str, ...] = (),
           per_channel: bool = True) -> dict[str, Any]:
    """Convert ``model`` (eval, CPU) to a LiteRT model at ``out``; see :func:`kdedge.exporters.edge.export_edge`.

    Returns:
        ``details``: converter version, batch contract, quantization scheme, seconds.

    Raises:
        ExportError: The model cannot be converted (its arguments are checked by ``export_edge``).
    """
    del onnx  # made from the PyTorch module
    start = time.perf_counter()
    meta = metadata | {"kdedge.precision": precision}
    shape = tuple(input_shape)
    io = "uint8 pixels in, int8 out" if isinstance(model, PixelInput) else "int8"  # the flatbuffer's input and output tensors
    flat = _finished(_convert(model, shape, precision, calibration, batch=_EXPORT_BATCH if max_batch > 1 else 1, keep_float=keep_float,
                              per_channel=per_channel), meta,
                     export_batch=_EXPORT_BATCH if max_batch > 1 else None)
    batch: dict[str, int] = {"min": 1, "max": max_batch}
    if max_batch == 1:
        batch = {"fixed": 1}
    elif not _batch_free(flat, shape, calibration):
        flat = _finished(_convert(model, shape, precision, calibration, batch=1, keep_float=keep_float, per_channel=per_channel), meta, export_batch=None)
        batch = {"fixed": 1}
    details: dict[str, Any] = {
        "converter": f"litert-torch {version_of('litert-torch')}", "runtime": f"ai-edge-litert {version_of('ai-edge-litert')}",
        "batch": batch, "resize": "Interpreter.resize_tensor_input" if "max" in batch else None, "ops": _op_counts(flat),
        "quantization": (inner_model(model).quantization() | {"io": io} if hasattr(inner_model(model), "quantization") else
                         int8_scheme("litert_torch PT2EQuantizer (static)", per_channel) | {"calibration_samples": len(calibration), "io": io}  # type: ignore[arg-type]
                         | ({"float_layers": list(keep_float)} if keep_float else {}))
        if precision == "int8" and (calibration is not None or hasattr(inner_model(model), "quantization")) else None,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(out), flat)
    write_sidecar(Path(out), meta, format="litert", precision=precision, **details)
    details["seconds"] = round(time.perf_counter() - start, 3)  # in export.json only: the sidecar is reproducible bit for bit
    return details


def _convert(model: nn.Module, input_shape: tuple[int, ...], precision: str, calibration: np.ndarray | None, *, batch: int,
             keep_float: tuple[str, ...] = (), per_channel: bool = True) -> bytes:
    """The flatbuffer ``litert_torch`` makes of ``model`` at the static ``batch``."""
    native: list[str] = []
    try:
        with _quiet(native):
            import litert_torch

            example = (example_input(model, batch, input_shape),)  # uint8 for a model with its preprocessing in the graph
            if precision == "int8":
                from litert_torch.quantize.quant_config import QuantConfig

                inner = inner_model(model)
                if isinstance(inner, QATModel):  # quantization-aware: its own Q/DQ graph with the scales training used (the quantizer only says "static")
                    from kdedge.models.qat import pt2e_quantizer

                    graph = inner.converted(fold_quantize=False)
                    graph = model.around(graph) if isinstance(model, PixelInput) else graph  # its preprocessing in front
                    quantizer = pt2e_quantizer("litert", per_channel=inner.per_channel)
                else:
                    assert calibration is not None
                    graph, quantizer = _quantized(model, input_shape, calibration, keep_float, per_channel)
                converted = litert_torch.convert(graph, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
            else:
                converted = litert_torch.convert(model, example)
            return converted.model_content()
    except Exception as exc:  # torch.export, the quantizer, the lowerings and the MLIR converter raise many types; all mean "cannot convert"
        if native:
            exc.add_note("native log:\n" + "\n".join(native[-50:]))
        raise ExportError(f"cannot convert {type(model).__name__} to LiteRT ({cause(exc)}); the model must be traceable by "
                          "torch.export with ops litert_torch lowers (kdedge --debug shows where it failed)") from exc


def _quantized(model: nn.Module, input_shape: tuple[int, ...], calibration: np.ndarray, keep_float: tuple[str, ...] = (),
               per_channel: bool = True) -> tuple[torch.fx.GraphModule, Any]:
    """PT2E static INT8 of ``model``: observers from ``PT2EQuantizer``, fed ``calibration`` ``(N, C, H, W)``, converted to Q/DQ;
    ``keep_float`` layers stay float. Returns the graph and the quantizer (the converter is told its scheme)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from kdedge.models.float_layers import keep_float_quantizer
    from kdedge.models.qat import pt2e_quantizer

    quantizer = pt2e_quantizer("litert", per_channel=per_channel)
    inputs = torch.from_numpy(np.ascontiguousarray(calibration))  # float32, or uint8 pixels for a model that takes them
    # Calibrated at any batch: exported with a dynamic one (32 as the example; see pte._EXAMPLE_BATCH).
    dynamic = ({0: torch.export.Dim("batch", min=1, max=max(2, len(inputs)))},)
    with torch.no_grad():
        graph = torch.export.export(model, (example_input(model, min(32, max(2, len(inputs))), input_shape),), dynamic_shapes=dynamic).module()
        # behind a PixelInput, its preprocessing stays float: the model's first layer quantizes the result as it would a float input
        prepared = prepare_pt2e(graph, keep_float_quantizer(quantizer, keep_float, inside="model" if isinstance(model, PixelInput) else None))
        for chunk in inputs.split(64):
            prepared(chunk)
        return convert_pt2e(prepared, fold_quantize=False), quantizer


def _finished(flat: bytes, metadata: dict[str, str], *, export_batch: int | None) -> bytes:
    """``flat`` with the batch freed (when ``export_batch`` is given) and ``metadata`` embedded."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    if export_batch is not None:
        _free_batch(model, export_batch, flatbuffer_utils, schema)
    model.metadata = [m for m in (model.metadata or []) if m.name not in (_METADATA_NAME, _METADATA_NAME.encode())]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = _METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _free_batch(model: Any, batch: int, flatbuffer_utils: Any, schema: Any) -> None:
    """Let ``model`` (a ``schema.ModelT`` converted at ``batch``) take any batch.

    A RESHAPE whose input and constant target both lead with ``batch`` gets ``-1`` there; the
    graph's inputs and outputs get the shape signature ``[-1, ...]`` and the shape ``[1, ...]``, so
    an interpreter that is not resized runs batch 1 (the deployment case).
    """
    for graph in model.subgraphs:
        for op in graph.operators:
            code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
            if code != schema.BuiltinOperator.RESHAPE or len(op.inputs) < 1 or graph.tensors[op.inputs[0]].shape[0] != batch:
                continue
            if len(op.inputs) > 1 and op.inputs[1] >= 0:
                target = model.buffers[graph.tensors[op.inputs[1]].buffer]
                if target.data is not None and len(target.data) >= 4:
                    shape = np.frombuffer(bytes(bytearray(target.data)), np.int32).copy()
                    if shape[0] == batch:
                        shape[0] = -1
                        target.data = np.frombuffer(shape.tobytes(), np.uint8)
            options = op.builtinOptions
            if options is not None and getattr(options, "newShape", None) is not None and len(options.newShape) and options.newShape[0] == batch:
                options.newShape[0] = -1
        for index in [*graph.inputs, *graph.outputs]:
            tensor = graph.tensors[index]
            if len(tensor.shape) and tensor.shape[0] == batch:
                tensor.shapeSignature = np.array([-1, *tensor.shape[1:]], np.int32)
                tensor.shape = np.array([1, *tensor.shape[1:]], np.int32)


def _batch_free(flat: bytes, input_shape: tuple[int, ...], calibration: np.ndarray | None, *, rows: int = 5) -> bool:
    """Whether ``flat`` gives for a batch of ``rows`` inputs, row for row, what it gives for each alone."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "check.tflite"
        path.write_bytes(flat)
        try:
            session = Session(path)
            x = (np.asarray(calibration[:rows]) if calibration is not None and len(calibration) >= rows
                 else rng.integers(0, 256, (rows, *input_shape), dtype=np.uint8) if session._dtype == np.uint8  # pixels
                 else rng.standard_normal((rows, *input_shape)).astype(np.float32))
            together = session.run(x)
            alone = np.concatenate([session.run(x[i : i + 1]) for i in range(rows)])
        except (ExportError, RuntimeError, ValueError):  # the interpreter refuses the resize: a reshape kept the batch
            return False
    scale = max(1.0, float(np.abs(alone).max()))
    return together.shape == alone.shape and bool(np.abs(together - alone).max() <= 1e-4 * scale)


def _op_counts(flat: bytes) -> dict[str, int]:
    """How many of each builtin op the main graph has (QUANTIZE/DEQUANTIZE pairs show float islands in INT8)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(flat, 0)
    graph = model.Subgraphs(0)
    counts: dict[str, int] = {}
    for i in range(graph.OperatorsLength()):
        code = flatbuffer_utils.get_builtin_code_from_operator_code(model.OperatorCodes(graph.Operators(i).OpcodeIndex()))
        name = names.get(code, str(code))
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


class Session:
    """A ``.tflite`` model opened in LiteRT's interpreter (XNNPACK), as an :class:`~kdedge.exporters.edge.EdgeSession`.

    Args:
        path: The model.
        threads: The interpreter's thread count (None: LiteRT's Python default, which is one thread).

    Raises:
        ExportError: The file is missing, truncated, corrupt or not a LiteRT model.
    """

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such LiteRT model")
        if threads is not None and threads < 1:
            raise ExportError(f"threads must be at least 1, got {threads}")
        native: list[str] = []
        try:
            with _quiet(native):
                from ai_edge_litert.interpreter import Interpreter

                self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
                (inp,), (out,) = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"{self.path}: not a loadable LiteRT model ({last_native_line(native) or cause(exc)}); "
                              "re-export it with kdedge export") from None
        self._input, self._output = int(inp["index"]), int(out["index"])
        self._sample = tuple(int(d) for d in inp["shape"][1:])
        self._in_q = tuple(inp["quantization"]) if inp["dtype"] == np.int8 else None  # (scale, zero point) of an int8 input
        self._dtype = np.dtype(np.uint8 if inp["dtype"] == np.uint8 else np.float32)  # uint8: pixels, the preprocessing in the graph
        self._out_q = tuple(out["quantization"]) if out["dtype"] != np.float32 else None
        batch = sidecar_batch(self.path)
        if not batch:  # no sidecar: a batch the model declares free is free, else the one it has
            batch = {"min": 1} if int(inp["shape_signature"][0]) == -1 else {"fixed": int(inp["shape"][0])}
        self.fixed_batch: int | None = batch.get("fixed")
        self.max_batch: int | None = self.fixed_batch or batch.get("max")
        self.threads: int | None = threads or 1
        self.runtime = f"ai-edge-litert {version_of('ai-edge-litert')} XNNPACK"
        self._batch: int | None = None
        self._resize(self.fixed_batch or 1)  # allocating surfaces a model that parses but cannot run

    def _resize(self, batch: int) -> None:
        if batch == self._batch:
            return
        native: list[str] = []
        try:
            with _quiet(native):
                if self.fixed_batch is None:
                    self._interpreter.resize_tensor_input(self._input, [batch, *self._sample], strict=True)
                self._interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"{self.path}: LiteRT cannot run batch {batch} ({last_native_line(native) or cause(exc)})") from None
        self._batch = batch

    def _feed(self, x: np.ndarray) -> None:
        x = artifact_input(x, self._dtype, self.path.name)
        self._resize(len(x))
        if self._in_q is not None:
            scale, zero = self._in_q
            x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
        self._interpreter.set_tensor(self._input, x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(B, K)`` float32 for ``x`` ``(B, C, H, W)`` float32, ``B`` within the batch contract."""
        self._feed(x)
        self._interpreter.invoke()
        y = self._interpreter.get_tensor(self._output)
        if self._out_q is not None:
            scale, zero = self._out_q
            return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
        return np.array(y, dtype=np.float32)

    def prepare(self, x: np.ndarray) -> Callable[[], Any]:
        """``Interpreter.invoke`` with ``x`` already in the input tensor (resized, allocated, quantized once)."""
        self._feed(x)
        return self._interpreter.invoke


def read_metadata(path: Path) -> dict[str, str]:
    """The ``kdedge.*`` strings of a model: from its sidecar, else from its embedded ``kdedge`` metadata (``{}`` when neither).

    Raises:
        ExportError: The file is not a LiteRT flatbuffer.
    """
    path = Path(path)
    found = read_sidecar(path)
    if found:
        return found
    from ai_edge_litert import schema_py_generated as schema

    try:
        data = path.read_bytes()
        if data[4:8] != b"TFL3":
            raise ValueError("no TFL3 identifier")
        model = schema.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == _METADATA_NAME.encode():
                doc = json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
                return {k: str(v) for k, v in doc.items() if k.startswith("kdedge.")}
    except Exception as exc:  # noqa: BLE001 - any failure to parse foreign or damaged bytes means the same thing
        raise ExportError(f"{path}: not a readable LiteRT model ({cause(exc)})") from None
    return {}


@contextlib.contextmanager
def _quiet(native: list[str]) -> Iterator[None]:
    """:func:`~kdedge.exporters._native.quiet` for litert_torch, which also warns through the root logger.

    Its progress bars and TensorFlow's C++ logging are switched off by environment variables, read
    when they load or convert; the user's own values win, and the environment is restored after.
    """
    quiet_env = {"TF_CPP_MIN_LOG_LEVEL": "2", "LITERT_TORCH_SHOW_PROGRESS": "0"}
    added = [k for k in quiet_env if k not in os.environ]
    os.environ.update({k: quiet_env[k] for k in added})
    try:
        with quiet(native, _NOISY, root=True):
            yield
    finally:
        for k in added:
            os.environ.pop(k, None)
