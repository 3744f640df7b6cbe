"""torch.onnx's dynamo export with a dynamic batch: the one call both the artifact exporter and the teacher's cache pass make.

A foundation (below ``exporters`` and ``distill``, which must not import each other's floors).
"""

from __future__ import annotations

import torch
from torch import nn

from kdedge._quiet import quiet_onnx_export
from kdedge.errors import ExportError, cause

__all__ = ["dynamo_export"]


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
        with quiet_onnx_export(), torch.no_grad():
            program = torch.onnx.export(module, (example,), dynamic_shapes=({0: batch},), input_names=[input_name], output_names=[output_name],
                                        opset_version=opset, dynamo=True, external_data=external_data, optimize=True, verbose=False)
    except Exception as exc:  # torch.export and the ONNX translation raise many types; all are "cannot export"
        raise ExportError(f"cannot export {what} to ONNX ({cause(exc)}){hint}") from exc  # the traceback points at the model line (kdedge --debug)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {what}")
    return program
