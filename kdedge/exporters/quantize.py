"""INT8 with onnxruntime's quantizer: static QDQ from real calibration data, or dynamic.

Static quantization inserts QuantizeLinear/DequantizeLinear pairs whose scales come from
running the FP32 model over calibration samples (``minmax``, ``entropy`` or ``percentile``);
weights are quantized per output channel. Two activation encodings are offered:

* ``cpu`` (default): uint8 asymmetric activations, int8 symmetric weights (U8S8) — the fast
  path of onnxruntime's x86 kernels (VNNI).
  With ``reduce_range`` (the default in :class:`~kdedge.config.ExportConfig`) weights use 7 bits:
  onnxruntime's fused x86 U8S8 kernels can saturate 16-bit intermediate sums, and on the shipped
  teacher that cost 0.5 pt of accuracy (93.56 % vs 94.07 % for the same QDQ graph run unfused);
  with 7-bit weights the fused kernels gave 94.17 %.
* ``tensorrt``: int8 *symmetric* activations and weights (zero point 0), the only Q/DQ form
  TensorRT's explicit quantization accepts.

Whether INT8 is faster is a measurement, not a given: on a ~100 k-parameter CNN at batch 1 the
quantize/dequantize overhead can exceed the saved arithmetic.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdedge.errors import ConfigError, DataError, ExportError
from kdedge.exporters.onnx import check_onnx, read_metadata, set_metadata
from kdedge.models.float_layers import onnx_float_nodes

__all__ = ["QuantizationInfo", "quantize_int8"]


@dataclass
class QuantizationInfo:
    """How an INT8 artifact was made (recorded in ``export.json``)."""

    mode: str
    method: str | None
    calibration_samples: int
    per_channel: bool
    encoding: str  # "U8S8" or "S8S8-symmetric"
    reduce_range: bool = False
    float_layers: list[str] | None = None  # kept in float (kdedge.sensitivity), with the ONNX nodes that compute them
    float_nodes: list[str] | None = None
    pixel_input: str | None = None  # a uint8-input graph: how its pixels reach the first quantized layer (fold_pixel_quantization)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The calibrators print progress to stdout; the quantizer logs advice through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _input_info(path: Path) -> tuple[str, tuple, bool]:
    """The graph input's name, dims, and whether it takes uint8 pixels (its preprocessing in the graph)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    graph_input = _graph_input(proto.graph)
    dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in graph_input.type.tensor_type.shape.dim)
    return graph_input.name, dims, graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8


def _check_calibration(calibration: np.ndarray, dims: tuple, name: str, *, pixels: bool = False) -> np.ndarray:
    calibration = np.asarray(calibration)
    expected = tuple(d if isinstance(d, int) and d > 0 else "N" for d in dims)
    fits = calibration.ndim == len(dims) and all(not isinstance(d, int) or d <= 0 or d == s for d, s in zip(dims[1:], calibration.shape[1:]))
    if not fits or len(calibration) == 0:
        raise DataError(
            f"calibration data has shape {tuple(calibration.shape)}, but input {name!r} expects {expected}; "
            "pass preprocessed samples of the model's input shape (N, C, H, W)"
        )
    if pixels:  # a graph that takes uint8 pixels is calibrated on pixels
        if calibration.dtype != np.uint8:
            raise DataError(f"calibration data has dtype {calibration.dtype}; input {name!r} takes uint8 pixels, so pass uint8 images "
                            "(kdedge.data.pixels.InputFormat.feed turns normalized inputs back into them)")
        return np.ascontiguousarray(calibration)
    if not np.issubdtype(calibration.dtype, np.floating):
        raise DataError(f"calibration data has dtype {calibration.dtype}; expected float32 inputs, normalized as for the model")
    if not np.isfinite(calibration).all():
        raise DataError("calibration data contains NaN or infinity; expected finite, normalized inputs")
    return np.ascontiguousarray(calibration, dtype=np.float32)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    calibration: np.ndarray | None,
    mode: str = "static",
    method: str = "minmax",
    per_channel: bool = True,
    target: str = "cpu",
    reduce_range: bool = False,
    calibration_batch: int = 64,
    keep_float: tuple[str, ...] = (),
) -> QuantizationInfo:
    """Quantize an FP32 ONNX model to INT8 (QDQ), keeping its metadata.

    Args:
        fp32_path: The FP32 model (from :func:`export_onnx`).
        out_path: Where to write the INT8 model.
        calibration: Preprocessed real inputs ``(N, C, H, W)`` for static quantization.
        mode: ``static`` (QDQ, calibrated) or ``dynamic`` (weights only; activations per batch).
        method: Calibration method for static mode: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: Per-output-channel weight scales.
        target: ``cpu`` (U8S8) or ``tensorrt`` (symmetric S8S8, zero points 0).
        reduce_range: 7-bit weights (``cpu`` target only), avoiding the saturation of onnxruntime's
            fused x86 U8S8 kernels.
        calibration_batch: Samples per calibration batch.
        keep_float: Layers (module names of the exported model) left in float: their Conv/Gemm/MatMul nodes are
            excluded from quantization (:func:`kdedge.sensitivity.onnx_float_nodes`).

    Raises:
        DataError: The calibration data does not fit the model's input.
        ExportError: onnxruntime cannot quantize the model.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if mode not in ("static", "dynamic"):
        raise ExportError(f"INT8 mode must be static or dynamic, got {mode!r}")
    if target not in ("cpu", "tensorrt"):
        raise ExportError(f"INT8 target must be cpu or tensorrt, got {target!r}")
    if mode == "static" and method not in _METHODS:
        raise ExportError(f"calibration method must be one of {', '.join(_METHODS)}, got {method!r}")
    name, dims, pixels = _input_info(fp32_path)
    reduce_range = reduce_range and target == "cpu"
    if mode == "static":
        if calibration is None:
            raise DataError("static INT8 quantization needs calibration data: real, preprocessed training inputs (N, C, H, W)")
        calibration = _check_calibration(calibration, dims, name, pixels=pixels)
    info = QuantizationInfo(mode=mode, method=method if mode == "static" else None, calibration_samples=len(calibration) if mode == "static" else 0,  # type: ignore[arg-type]
                            per_channel=per_channel, reduce_range=reduce_range,
                            encoding="S8S8-symmetric" if target == "tensorrt" else ("U8S8" if mode == "static" else "dynamic-U8S8"),
                            float_layers=list(keep_float) or None)
    metadata = read_metadata(fp32_path)
    with tempfile.TemporaryDirectory(prefix="kdedge-int8-") as work:
        tmp_out = Path(work) / "int8.onnx"
        _run_quantizer(fp32_path, Path(work) / "pre.onnx", tmp_out, info, calibration={name: calibration} if mode == "static" else None,
                       symmetric=target == "tensorrt", calibration_batch=calibration_batch)
        _write_checked(tmp_out, out_path, metadata | {"kdedge.precision": "int8", "kdedge.quantization": f"{info.mode}/{info.method or '-'}/{info.encoding}"})
    return info


_PREPROCESSING_OPS = frozenset({"Transpose", "Cast", "Mul", "Add", "Sub", "Div"})


def _graph_input(graph: Any) -> Any:
    """The graph's first real input (not an initializer listed among the inputs, as older exporters did), or None."""
    initializers = {t.name for t in graph.initializer}
    return next((i for i in graph.input if i.name not in initializers), None)


def pixel_preprocessing_nodes(proto: Any) -> list[str]:
    """The names of the nodes that preprocess a uint8 graph input (cast, layout, per-channel scale and shift) before the first layer.

    Walked forward from the input: a node belongs while it is one of Transpose, Cast, Mul, Add, Sub,
    Div and its other inputs are per-channel constants (no more elements than the input's largest
    candidate channel axis, its second or last: the :class:`~kdedge.data.pixels.PixelInput` gain and
    bias). ``[]`` for a graph with a float input.
    """
    import onnx

    graph_input = _graph_input(proto.graph)
    if graph_input is None or graph_input.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        return []
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    channels = max([d for d in (dims[1:2] + dims[-1:]) if d > 0] or [4])  # NCHW or NHWC: the larger bound is safe for the walk
    small = {t.name for t in proto.graph.initializer if int(np.prod(t.dims)) <= channels}
    small |= {n.output[0] for n in proto.graph.node if n.op_type == "Constant"}
    reached, names = {graph_input.name}, []
    for node in proto.graph.node:  # topologically sorted, as ONNX requires
        if node.op_type == "DequantizeLinear" and all(i in small for i in node.input):  # a constant quantized by an earlier pass
            small.add(node.output[0])
            continue
        if node.op_type in _PREPROCESSING_OPS and any(i in reached for i in node.input) and all(i in reached or i in small for i in node.input if i):
            reached.update(node.output)
            names.append(node.name)
    return names


def fold_pixel_quantization(proto: Any) -> str:
    """Let a uint8-input QDQ graph take its pixels as the first layer's quantized input; returns what was done, for ``export.json``.

    The graph computes ``x = pixel * gain + bias`` in float (cast, layout, scale, mean/std), then
    quantizes ``x`` with a calibrated ``QuantizeLinear``. When one gain and one bias serve every
    channel (grayscale, or equal mean and std), ``DequantizeLinear(pixel, gain, round(-bias / gain))``
    is that same ``x`` up to the rounding of the zero point (at most half a pixel level, against half
    a calibrated step for the ``QuantizeLinear`` it replaces), and every pixel value is represented
    exactly: the cast, the arithmetic and the quantization leave the graph, and onnxruntime runs the
    first convolution on the pixels themselves. Per-channel gains or biases would need a per-channel
    input scale, which onnxruntime's quantized convolution does not take: such graphs keep their float
    preprocessing, as do graphs whose first layer is kept float.
    """
    from onnx import numpy_helper

    names = pixel_preprocessing_nodes(proto)
    graph = proto.graph
    if not names:
        return "float input"
    keep_float = "float preprocessing, then the first layer's QuantizeLinear"
    by_name = {n.name: n for n in graph.node}
    chain = [by_name[n] for n in names]
    produced = {o for n in chain for o in n.output}
    consumers = lambda name: [n for n in graph.node if name in n.input]  # noqa: E731
    ends = [o for o in produced if any(c.name not in names for c in consumers(o)) or o in {x.name for x in graph.output}]
    if len(ends) != 1 or [c.op_type for c in consumers(ends[0])] != ["QuantizeLinear"]:
        return keep_float + " (the preprocessed image feeds a float layer)"
    quant = consumers(ends[0])[0]
    dequants = consumers(quant.output[0])
    transposes = [n for n in chain if n.op_type == "Transpose"]
    if not dequants or any(d.op_type != "DequantizeLinear" for d in dequants):
        return keep_float + " (its QuantizeLinear feeds more than the first layer's DequantizeLinear)"
    if len(transposes) > 1:
        return keep_float + " (more than the one layout change kdedge's pixel input writes)"
    affine = _pixel_affine(proto, chain, ends[0])
    if affine is None:
        return keep_float + " (the preprocessing is not one affine map of the pixels, or could not be evaluated alone)"
    gain, bias = affine
    if not (np.ptp(gain) <= 1e-6 * abs(gain.flat[0]) and np.ptp(bias) <= 1e-6 * max(abs(bias.flat[0]), 1e-12)):
        return keep_float + " (per-channel normalization: one input scale cannot hold it)"
    g, b = float(gain.flat[0]), float(bias.flat[0])
    if g <= 0 or not 0 <= round(-b / g) <= 255:
        return keep_float + " (the normalization maps no pixel value to zero)"
    zero = round(-b / g)
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    scale, point = (consts.get(n) for n in (quant.input[1], quant.input[2] if len(quant.input) > 2 else ""))
    # The first layers' int32 biases were quantized at the calibrated input scale: fold only where it is the pixels' own (minmax
    # calibration over images that span 0..255), and only into uint8 activations.
    if scale is None or point is None or point.dtype != np.uint8 or abs(float(scale) / g - 1) > 1e-3:
        return keep_float + " (the calibrated input scale is not the pixels' own, or activations are not uint8)"
    perm = list(next(a.ints for a in transposes[0].attribute if a.name == "perm")) if transposes else None
    _read_pixels_quantized(graph, chain, quant, dequants, g, zero, perm)
    return (f"folded: the uint8 pixels are the first layer's quantized input (scale {g:.6g}, zero point {zero}; "
            f"the float preprocessing's zero point {-b / g:.3f} rounded)")


def _pixel_affine(proto: Any, chain: list[Any], end: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(gain, bias)`` with ``chain(pixels) == pixels * gain + bias`` (per element of one image, in the chain's output layout),
    read off by running the chain alone on all-0 and all-255 images and confirmed on all-1; None when it is not affine or
    onnx's reference evaluator cannot run it. (The gain from 0 and 255 is 255 times more precise than from 0 and 1, which the
    chain's float32 rounding would put outside any tight check.)"""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    graph_input = _graph_input(graph)
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in graph_input.type.tensor_type.shape.dim]
    used = {i for n in chain for i in n.input}
    sub = helper.make_model(helper.make_graph(chain, "pre", [graph_input], [helper.make_tensor_value_info(end, onnx.TensorProto.FLOAT, None)],
                                              [t for t in graph.initializer if t.name in used]), opset_imports=proto.opset_import)
    try:
        run = ReferenceEvaluator(sub)
        at = {v: run.run(None, {graph_input.name: np.full(dims, v, np.uint8)})[0].astype(np.float64) for v in (0, 1, 255)}
    except Exception:  # noqa: BLE001  # an operator the reference evaluator lacks, a constant made outside the chain: keep the float
        return None  # preprocessing, which is always right
    bias, gain = at[0], (at[255] - at[0]) / 255
    if not np.allclose(at[1], gain + bias, rtol=1e-5, atol=1e-5 * float(np.abs(at[255]).max(initial=1.0))):
        return None
    return gain, bias


def _read_pixels_quantized(graph: Any, chain: list[Any], quant: Any, dequants: list[Any], gain: float, zero: int, perm: list[int] | None) -> None:
    """Rewire ``graph`` in place: each of ``dequants`` reads the uint8 pixels with ``(gain, zero)``, followed by the chain's layout
    change (``perm``) on floats; the chain and ``quant`` leave, with the initializers nothing reads any more. OpenVINO ran the
    layout change before the dequantization 15 % slower (66 vs 57 µs), onnxruntime the same either way."""
    from onnx import helper, numpy_helper

    graph_input = _graph_input(graph)
    scale_name, zero_name = f"{graph_input.name}_pixel_scale", f"{graph_input.name}_pixel_zero_point"
    graph.initializer.extend([numpy_helper.from_array(np.array(gain, np.float32), scale_name),
                              numpy_helper.from_array(np.array(zero, np.uint8), zero_name)])
    layouts = {}
    for d in dequants:
        d.input[:] = [graph_input.name, scale_name, zero_name]
        if perm is not None:
            out = d.output[0]
            d.output[0] = f"{out}_{graph_input.name}_layout"
            layouts[id(d)] = helper.make_node("Transpose", [d.output[0]], [out], name=f"{d.name}_layout", perm=perm)
    drop = {id(n) for n in chain} | {id(quant)}
    kept = [m for n in graph.node if id(n) not in drop for m in ([n, layouts[id(n)]] if id(n) in layouts else [n])]
    del graph.node[:]
    graph.node.extend(kept)
    needed = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(live)


#: kdedge's calibration method names -> onnxruntime.quantization.CalibrationMethod member names.
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _run_quantizer(fp32_path: Path, pre: Path, out: Path, info: QuantizationInfo, *, calibration: dict[str, np.ndarray] | None, symmetric: bool,
                   calibration_batch: int) -> None:
    """onnxruntime's pre-processing, then static (calibrated QDQ) or dynamic quantization into ``out``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        """The calibration inputs in batches of ``calibration_batch``."""

        def __init__(self) -> None:
            (self._name, self._data), = calibration.items()  # type: ignore[union-attr]
            self._starts = iter(range(0, len(self._data), calibration_batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._starts, None)
            return None if start is None else {self._name: self._data[start : start + calibration_batch]}

    try:
        with _quiet():
            # Shape inference and graph cleanup first, as onnxruntime's quantization guide advises.
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            proto = onnx.load(str(pre), load_external_data=False)
            excluded = onnx_float_nodes(proto, info.float_layers) if info.float_layers else []
            info.float_nodes = excluded or None
            # A graph that takes uint8 pixels keeps its preprocessing float: its first layer quantizes the result, as a float-input
            # graph quantizes its input (quantizing the cast, the per-channel gain and bias and the sums would only add rounding).
            excluded = excluded + [n for n in pixel_preprocessing_nodes(proto) if n not in excluded]
            if info.mode == "static":
                quantize_static(
                    str(pre), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=info.per_channel,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, _METHODS[info.method]), reduce_range=info.reduce_range,  # type: ignore[index]
                    nodes_to_exclude=excluded,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "CalibTensorRangeSymmetric": symmetric},
                )
                quantized = onnx.load(str(out))
                info.pixel_input = fold_pixel_quantization(quantized) if _input_info(pre)[2] else None
                if info.pixel_input and info.pixel_input.startswith("folded"):
                    onnx.save_model(quantized, str(out))
            else:
                quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=info.per_channel, reduce_range=info.reduce_range,
                                 nodes_to_exclude=excluded)
    except (ConfigError, DataError, ExportError):
        raise
    except Exception as exc:  # the quantizer raises bare Exceptions and onnxruntime errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"onnxruntime cannot quantize {fp32_path.name} to INT8 ({info.mode}): {first}") from exc


def _write_checked(quantized: Path, out_path: Path, metadata: dict[str, str]) -> None:
    """``quantized`` with ``metadata`` to ``out_path``: written aside, checked by onnx.checker, renamed into place."""
    import onnx

    proto = onnx.load(str(quantized))
    set_metadata(proto, metadata)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        onnx.save_model(proto, str(tmp))
        check_onnx(tmp)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
