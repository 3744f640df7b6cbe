"""ONNX exports of a module with a dynamic batch: torch.onnx's dynamo export (what ships), and TorchScript's (what is only run).

The artifact exporter, the teacher's cache pass and the search's latency meter all export through
here. A foundation (below ``exporters``, ``distill`` and ``search``, which must not import each
other's floors).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from kdedge._quiet import quiet_onnx_export
from kdedge.errors import ExportError, cause

__all__ = ["dynamo_export", "torchscript_export"]

_REGISTRIES: dict[tuple[int, ...], object] = {}


@contextlib.contextmanager
def _one_registry_per_process() -> Iterator[None]:
    """torch.onnx rebuilds its table of ONNX translations (every torchlib function's IR) on each export: 0.5 s per export,
    measured (tiny_cnn 1.0 -> 0.5 s once warm). Within this block each export gets a copy of one table per opset, rebuilt
    when a translation or a torch op has been registered since. If torch's private layout differs, nothing is patched."""
    try:
        from onnxscript.function_libs.torch_lib import registration as onnxscript_registration
        from torch.onnx._internal.exporter import _registration
        from torch.onnx._internal.exporter._torchlib import _torchlib_registry

        build = _registration.ONNXRegistry.__dict__["from_torchlib"].__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def key(cls: type, opset_version: int) -> tuple[int, ...] | None:
        """How many translations each library holds and how many ops torch has: a registration of either since a table was
        built means another table (a translation is only taken for an op torch has: torchao's quantized ops register on import)."""
        try:
            onnxscript_ops = sum(len(f.overloads) + len(f.complex) for f in onnxscript_registration.default_registry._registry.values())
            return (id(cls), opset_version, onnxscript_ops, len(_torchlib_registry._registry), len(torch._C._dispatch_get_all_op_names()))
        except (AttributeError, TypeError):
            return None

    def from_torchlib(cls: type, opset_version: int = _registration._constants.TORCHLIB_OPSET) -> object:
        shared = _REGISTRIES.get(key(cls, opset_version))  # type: ignore[arg-type]
        if shared is None:
            shared = build(cls, opset_version)
            after = key(cls, opset_version)  # the first build imports the translations (and torch registers ops): key it as it now is
            if after is not None:
                _REGISTRIES[after] = shared
        copy = cls.__new__(cls)
        copy.__dict__.update(shared.__dict__)
        copy.functions = {target: list(decomps) for target, decomps in shared.functions.items()}  # a custom op registered on one export stays there
        return copy

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = classmethod(build)


def dynamo_export(module: nn.Module, input_shape: tuple[int, ...], *, what: str, input_name: str = "input", output_name: str = "logits",
                  opset: int = 18, dtype: torch.dtype = torch.float32, external_data: bool = False, hint: str = "") -> torch.onnx.ONNXProgram:
    """``module`` exported to ONNX with dimension 0 (the batch) dynamic, quietly.

    Raises:
        ExportError: ``cannot export {what} to ONNX (cause)``, then ``hint``: torch.export and the
            ONNX translation raise many types, and all mean "cannot export"; the cause is chained.
    """
    example = torch.zeros(2, *input_shape, dtype=dtype)  # batch 2, not 1: torch.export specializes dimensions of size 1 to constants
    batch = torch.export.Dim("batch", min=1, max=2**20)
    try:
        with quiet_onnx_export(), torch.no_grad(), _one_registry_per_process():
            program = torch.onnx.export(module, (example,), dynamic_shapes=({0: batch},), input_names=[input_name], output_names=[output_name],
                                        opset_version=opset, dynamo=True, external_data=external_data, optimize=True, verbose=False)
    except Exception as exc:  # torch.export and the ONNX translation raise many types; all are "cannot export"
        raise ExportError(f"cannot export {what} to ONNX ({cause(exc)}){hint}") from exc  # the traceback points at the model line (kdedge --debug)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {what}")
    return program


def torchscript_export(module: nn.Module, path: Path, input_shape: tuple[int, ...], *, input_name: str = "input", output_name: str = "logits",
                       opset: int = 18) -> bool:
    """``module`` exported to ``path`` by TorchScript's ONNX exporter (batch dynamic); False, and no file, if it cannot be.

    For files kdedge only runs, never ships: the latency meter's trials and the teacher's cache pass
    (parity-checked against torch there). 0.04-0.5 s for the zoo's models against 1.4-10 s for the
    dynamo export, and the same convolutions and GEMMs once onnxruntime has optimized the graph
    (``benchmarks/timing_export.py``). A value baked into the trace (a batch size; ``TracerWarning``)
    counts as "cannot" (torch's own TracerWarnings included: the caller falls back, it only costs
    time); so does anything else the exporter raises. The trace runs the module's Python forward,
    like any export: attributes a forward changes are changed by it.
    """
    try:
        with quiet_onnx_export(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice: it is used knowingly, for files only run
            warnings.simplefilter("error", torch.jit.TracerWarning)
            torch.onnx.export(module, (torch.zeros(2, *input_shape),), str(path), dynamo=False, input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset)
    except Exception:  # noqa: BLE001 - any failure means "use the dynamo export instead"
        Path(path).unlink(missing_ok=True)
        return False
    return True
