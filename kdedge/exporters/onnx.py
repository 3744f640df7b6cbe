"""PyTorch -> ONNX with the dynamo exporter: a dynamic batch dimension, one self-contained file.

``torch.onnx.export`` writes weights to a separate ``.onnx.data`` file by default; a bundle that
copies only the ``.onnx`` would lose them. Below the 2 GB protobuf limit kdedge therefore embeds
the weights (``external_data=False``). The file is written under a temporary name, checked with
``onnx.checker`` (full check, with shape inference) and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdedge._dynamo import dynamo_export
from kdedge._modes import evaluating
from kdedge._quiet import quiet_onnx_export
from kdedge.errors import ExportError
from kdedge.exporters._native import first_line

__all__ = ["OnnxExport", "export_onnx", "set_metadata", "read_metadata", "check_onnx", "HalfPrecision", "PROTOBUF_LIMIT"]

#: Protobuf messages (and so single-file ONNX models) cannot exceed 2 GiB.
PROTOBUF_LIMIT = 2**31 - 1
# Headroom for the graph itself next to the weights.
_EMBED_LIMIT = PROTOBUF_LIMIT - 64 * 2**20


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    files: list[Path]  # path, plus its .data file when the weights had to stay external
    opset: int
    precision: str
    nodes: int
    nodes_before_slim: int | None = None


class HalfPrecision(nn.Module):
    """Runs ``model`` in FP16 behind FP32 inputs and outputs (the FP16 variant's default I/O).

    Exporting this wrapper gives an ONNX graph whose weights and activations are FP16, with one
    ``Cast`` at the input and one at the output, so callers keep feeding ``float32``.
    """

    def __init__(self, model: nn.Module, *, fp16_io: bool = False) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half().eval()
        self.fp16_io = fp16_io

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp16_io:
            return self.model(x)
        return self.model(x.to(torch.float16)).to(torch.float32)


def plain_strides(t: torch.Tensor) -> bool:
    """Whether ``t`` has exactly the default (row-major) strides.

    Not ``is_contiguous()``: that ignores size-1 dimensions, so a channels-last ``(C, 1, k, k)`` depthwise or
    ``(O, I, 1, 1)`` pointwise weight passes it. A ``dw_cnn`` trained channels-last then traced channels-last: its flatten
    became a runtime-computed ``Gather`` that OpenVINO's INT8 compilation gets wrong (19.7 % argmax agreement, measured).
    """
    return t.stride() == torch.empty(t.shape, device="meta").stride()


@contextlib.contextmanager
def cpu_eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode on the CPU, leaving the caller's model as it was.

    A model with any tensor off the CPU is copied there (the caller's stays on its device); each
    submodule's train/eval flag is restored afterwards, so a user's deliberately frozen BatchNorm
    inside a training model stays frozen.
    """
    tensors = (*model.parameters(), *model.buffers())
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    # A channels-last model (as kdedge trains on the CPU) traces to another graph (a clone before each flatten) than the same
    # weights loaded from their checkpoint: exported from a contiguous copy, a bundle and `kdedge export` write the same file.
    contiguous = all(plain_strides(t) for t in tensors)
    if on_cpu and contiguous:
        target = model
    else:
        target = copy.deepcopy(model).cpu()
        target.to(memory_format=torch.contiguous_format)
    with evaluating(target) as target:
        yield target


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: tuple[int, ...],
    input_name: str = "input",
    output_name: str = "logits",
    opset: int = 18,
    precision: str = "fp32",
    fp16_io: bool = False,
    metadata: dict[str, str] | None = None,
    slim: bool = False,
) -> OnnxExport:
    """Export ``model`` (in eval mode, on the CPU) to ONNX with a dynamic batch dimension.

    Args:
        model: A classifier ``(B, *input_shape) -> (B, K)`` on any device; it is not modified (not even moved).
        path: The ``.onnx`` file to write.
        input_shape: One sample's shape, e.g. ``(1, 28, 28)``.
        input_name: Graph input name (the batch dimension is named ``batch``).
        output_name: Graph output name.
        opset: ONNX opset of the default domain (the dynamo exporter supports 18 and up).
        precision: ``fp32``, or ``fp16`` (weights and activations in half precision).
        fp16_io: With ``precision="fp16"``, take and return ``float16`` instead of ``float32``.
        metadata: Written to the model's ``metadata_props``.
        slim: Run onnxslim and keep its graph when it has fewer nodes.

    Raises:
        ExportError: The model cannot be traced or converted, or the result fails the checker.
    """
    path = Path(path)
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision must be fp32 or fp16 for an ONNX export, got {precision!r} (INT8 comes from kdedge.exporters.quantize_int8)")
    with cpu_eval(model) as cpu_model:
        return _export(cpu_model, path, input_shape=input_shape, input_name=input_name, output_name=output_name, opset=opset,
                       precision=precision, fp16_io=fp16_io, metadata=metadata, slim=slim)


def _export(model: nn.Module, path: Path, *, input_shape: tuple[int, ...], input_name: str, output_name: str, opset: int, precision: str,
            fp16_io: bool, metadata: dict[str, str] | None, slim: bool) -> OnnxExport:
    module: nn.Module = HalfPrecision(model, fp16_io=fp16_io) if precision == "fp16" else model
    # uint8 for a model with its preprocessing in the graph (kdedge.data.pixels), else the float the I/O precision says
    dtype = getattr(model, "input_dtype", None) or (torch.float16 if precision == "fp16" and fp16_io else torch.float32)
    external = _param_bytes(module) > _EMBED_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        program = dynamo_export(module, input_shape, what=type(model).__name__, input_name=input_name, output_name=output_name, opset=opset,
                                dtype=dtype, external_data=external,
                                hint="; the model must be traceable by torch.export (no data-dependent Python control flow, only ops with ONNX translations)")
        import onnx

        proto = program.model_proto
        _strip_node_metadata(proto)
        nodes_before = len(proto.graph.node)
        if slim:
            proto = _slim(proto)
        if metadata:
            set_metadata(proto, metadata)
        data_name = f"{path.name}.data"
        if external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        else:
            onnx.save_model(proto, str(tmp))
        check_onnx(tmp)
        files = [path]
        if external:
            os.replace(tmp.parent / data_name, path.parent / data_name)
            files.append(path.parent / data_name)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return OnnxExport(path=path, files=files, opset=opset, precision=precision, nodes=len(proto.graph.node), nodes_before_slim=nodes_before if slim else None)


def _strip_node_metadata(proto) -> None:
    """Drop what the exporter records on each node: the Python stack trace (with the exporting machine's file paths) and FX node text.

    Debugging aids of the export, not of the model: they made the artifact's bytes depend on where kdedge
    and torch were installed, and would ship those paths to every device.
    """
    def clear(graph) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    clear(attr.g)
                for g in attr.graphs:
                    clear(g)

    clear(proto.graph)
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]


def _slim(proto):
    """onnxslim's graph when it is smaller; the exporter's own optimizer already folds BatchNorm."""
    try:
        import onnxslim
    except ImportError as exc:  # chained: an installed but broken onnxslim fails here too
        raise ExportError("--slim needs onnxslim: pip install onnxslim") from exc
    with quiet_onnx_export():
        slimmed = onnxslim.slim(copy.deepcopy(proto))
    return slimmed if slimmed is not None and len(slimmed.graph.node) < len(proto.graph.node) else proto


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Set (replace) ``metadata_props`` entries of an ``onnx.ModelProto``."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        value = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = value
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value


def read_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` as a dict (weights are not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def check_onnx(path: str | Path) -> None:
    """``onnx.checker`` with ``full_check`` (shape inference included); ExportError on failure."""
    import onnx

    try:
        # The path form also validates models with external data and those near 2 GB.
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, OSError) as exc:
        raise ExportError(f"{path}: not a valid ONNX model ({first_line(exc)}); is it truncated or corrupt?") from exc
    except Exception as exc:  # protobuf DecodeError and friends for files that are not ONNX at all
        raise ExportError(f"{path}: cannot be parsed as ONNX ({type(exc).__name__}: {first_line(exc)}); is it truncated or corrupt?") from exc
