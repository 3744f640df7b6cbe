"""Exporters: PyTorch -> ONNX (FP32, INT8, FP16) -> TensorRT, each checked for parity.

Importing this package loads onnx lazily (inside the functions); onnxruntime and tensorrt are
only imported when an artifact is checked, quantized or built.
"""

from kdedge.exporters.export import Artifact, ExportResult, export_checkpoint, export_model, onnx_metadata, tolerances
from kdedge.exporters.onnx import HalfPrecision, OnnxExport, check_onnx, export_onnx, read_metadata, set_metadata
from kdedge.exporters.parity import OutputParity, ParityReport, Tolerance, check_parity, compare_outputs
from kdedge.exporters.quantize import QuantizationInfo, quantize_int8
from kdedge.exporters.tensorrt import EnginePlan, EngineProfile, engine_compatibility, engine_metadata, plan_engine

__all__ = [
    "Artifact",
    "EnginePlan",
    "EngineProfile",
    "ExportResult",
    "HalfPrecision",
    "OnnxExport",
    "OutputParity",
    "ParityReport",
    "QuantizationInfo",
    "Tolerance",
    "check_onnx",
    "check_parity",
    "compare_outputs",
    "engine_compatibility",
    "engine_metadata",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "onnx_metadata",
    "plan_engine",
    "quantize_int8",
    "read_metadata",
    "set_metadata",
    "tolerances",
]
