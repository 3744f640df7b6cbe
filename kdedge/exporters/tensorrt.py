"""TensorRT engines from kdedge's ONNX artifacts (TensorRT 10 and 11, Python API).

Precision lives in the ONNX graph, never in builder flags: TensorRT 11 removed ``BuilderFlag.FP16``
and ``BuilderFlag.INT8`` (and implicit INT8 calibration, deprecated in 10), and builds every network
strongly typed. kdedge therefore builds strongly typed on both versions — the creation flag is
required on 10.x and accepted (ignored) on 11.x — from the ONNX of the wanted precision:

==========  ====================================================================
precision   source ONNX
==========  ====================================================================
fp32        ``model.onnx``
fp16        ``model.fp16.onnx`` (FP16 weights and activations, FP32 I/O)
int8        ``model.int8-trt.onnx`` (symmetric Q/DQ: explicit quantization)
==========  ====================================================================

An engine is specific to the GPU model and TensorRT version that built it, so both are recorded
next to it (``<engine>.json``) and :func:`engine_compatibility` checks them before loading.
Everything except :func:`build_engine` and :class:`TensorRTEngine` is pure Python and is tested
without TensorRT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdedge._fs import atomic_write_bytes, file_sha256
from kdedge.errors import BackendUnavailable, ExportError

__all__ = [
    "EngineProfile",
    "EnginePlan",
    "plan_engine",
    "engine_metadata",
    "engine_compatibility",
    "build_engine",
    "tensorrt_module",
    "gpu_info",
    "TensorRTEngine",
    "ONNX_FOR_PRECISION",
]

#: Which ONNX artifact an engine of each precision is built from (file names in an export dir).
ONNX_FOR_PRECISION = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8-trt.onnx"}


@dataclass(frozen=True)
class EngineProfile:
    """The optimization profile of the batch dimension: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ExportError(f"TensorRT batch profile must satisfy 1 <= min <= opt <= max, got {self.min},{self.opt},{self.max}")

    def shapes(self, sample_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes for ``IOptimizationProfile.set_shape``."""
        return tuple((b, *sample_shape) for b in (self.min, self.opt, self.max))  # type: ignore[return-value]

    def allows(self, batch: int) -> bool:
        return self.min <= batch <= self.max


@dataclass(frozen=True)
class EnginePlan:
    """Everything a build needs, decided without TensorRT (so it is testable on any machine)."""

    onnx: str
    precision: str
    input_name: str
    sample_shape: tuple[int, ...]
    profile: EngineProfile
    workspace_bytes: int
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...] = field(default=())


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def plan_engine(
    trt_version: str,
    precision: str,
    *,
    onnx_dir: str | Path,
    input_name: str,
    sample_shape: tuple[int, ...],
    profile: EngineProfile,
    workspace_mib: int = 1024,
) -> EnginePlan:
    """Decide the source ONNX, network flags and profile for a build on TensorRT ``trt_version``.

    Raises:
        ExportError: The version is older than 10, or the precision's ONNX artifact is missing.
    """
    major = _version_tuple(trt_version)[0]
    if major < 10:
        raise BackendUnavailable(f"TensorRT {trt_version} is too old; kdedge builds with TensorRT 10 or 11 (pip install 'kdedge-distill[tensorrt]')")
    if precision not in ONNX_FOR_PRECISION:
        raise ExportError(f"TensorRT precision must be one of {', '.join(ONNX_FOR_PRECISION)}, got {precision!r}")
    onnx_path = Path(onnx_dir) / ONNX_FOR_PRECISION[precision]
    if not onnx_path.is_file():
        raise ExportError(f"a {precision} engine is built from {onnx_path.name}, which is missing in {onnx_dir}")
    return EnginePlan(
        onnx=str(onnx_path),
        precision=precision,
        input_name=input_name,
        sample_shape=tuple(sample_shape),
        profile=profile,
        workspace_bytes=int(workspace_mib) * 2**20,
        # Required for strong typing on 10.x; accepted and ignored on 11.x, where it is always on.
        network_flags=("STRONGLY_TYPED",),
        builder_flags=(),  # no FP16/INT8 flags: removed in 11, and precision comes from the graph
    )


def gpu_info() -> dict[str, Any]:
    """Name, compute capability and driver-visible memory of CUDA device 0 (through torch)."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines need an NVIDIA GPU")
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}", "memory_bytes": int(props.total_memory), "cuda": torch.version.cuda}


def engine_metadata(plan: EnginePlan, *, trt_version: str, gpu: dict[str, Any], engine_bytes: bytes, onnx_sha256: str, build_seconds: float) -> dict[str, Any]:
    """What travels next to an engine: it only runs on this GPU model with this TensorRT."""
    return {
        "format": "tensorrt",
        "tensorrt_version": trt_version,
        "gpu": gpu,
        "precision": plan.precision,
        "source_onnx": Path(plan.onnx).name,
        "source_onnx_sha256": onnx_sha256,
        "input_name": plan.input_name,
        "profile": {"min": plan.profile.min, "opt": plan.profile.opt, "max": plan.profile.max, "shapes": [list(s) for s in plan.profile.shapes(plan.sample_shape)]},
        "network_flags": list(plan.network_flags),
        "builder_flags": list(plan.builder_flags),
        "workspace_bytes": plan.workspace_bytes,
        "sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "bytes": len(engine_bytes),
        "build_seconds": build_seconds,
    }


def engine_compatibility(metadata: dict[str, Any], *, trt_version: str, gpu: dict[str, Any]) -> list[str]:
    """Reasons an engine built as ``metadata`` describes cannot run here (empty when it can)."""
    problems = []
    if metadata.get("tensorrt_version") != trt_version:
        problems.append(f"built with TensorRT {metadata.get('tensorrt_version')}, this machine has {trt_version}")
    built = metadata.get("gpu", {})
    if built.get("compute_capability") != gpu.get("compute_capability") or built.get("name") != gpu.get("name"):
        problems.append(f"built for {built.get('name')} (sm {built.get('compute_capability')}), this GPU is {gpu.get('name')} (sm {gpu.get('compute_capability')})")
    return problems


def tensorrt_module():
    """The tensorrt module, or BackendUnavailable saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable("TensorRT is not installed; pip install 'kdedge-distill[tensorrt]' on a machine with an NVIDIA GPU") from exc
    return trt


def _network_flags(trt, names: tuple[str, ...]) -> int:
    flags = 0
    for name in names:
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:  # absent in a future release that drops the (ignored) flag
            flags |= 1 << int(flag)
    return flags


def build_engine(plan: EnginePlan, out_path: str | Path) -> dict[str, Any]:
    """Build and serialize a TensorRT engine per ``plan``; writes ``out_path`` and ``out_path.json``.

    Returns:
        The engine metadata (also written next to the engine).

    Raises:
        BackendUnavailable: TensorRT or a CUDA GPU is missing.
        ExportError: The ONNX parser or the builder fails (their messages are included).
    """
    import time

    trt = tensorrt_module()
    gpu = gpu_info()
    out_path = Path(out_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan.network_flags))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(plan.onnx):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors)) or "unknown parser error"
        raise ExportError(f"TensorRT cannot parse {Path(plan.onnx).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.input_name, *plan.profile.shapes(plan.sample_shape))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a {plan.precision} engine from {Path(plan.onnx).name}; see the TensorRT log above")
    engine_bytes = bytes(serialized)
    onnx_sha = file_sha256(Path(plan.onnx))
    meta = engine_metadata(plan, trt_version=trt.__version__, gpu=gpu, engine_bytes=engine_bytes, onnx_sha256=onnx_sha, build_seconds=seconds)
    atomic_write_bytes(out_path, engine_bytes)
    atomic_write_bytes(out_path.with_name(out_path.name + ".json"), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


class TensorRTEngine:
    """A deserialized engine that runs float32 torch CUDA tensors through its one input.

    Buffers are torch CUDA tensors, so no pycuda/cuda-python is needed; execution uses the
    name-based tensor API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``)
    shared by TensorRT 10 and 11.
    """

    def __init__(self, path: str | Path) -> None:
        import torch

        trt = tensorrt_module()
        path = Path(path)
        meta_path = path.with_name(path.name + ".json")
        self.metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if self.metadata:
            problems = engine_compatibility(self.metadata, trt_version=trt.__version__, gpu=gpu_info())
            if problems:
                raise BackendUnavailable(f"{path.name} cannot run here: {'; '.join(problems)}; rebuild it on this machine with kdedge export --format tensorrt")
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportError(f"{path}: TensorRT cannot deserialize this engine; is it truncated or from another TensorRT version?")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def __call__(self, x):
        import torch

        trt = self._trt
        name = self.inputs[0]
        x = x.to("cuda", torch.float32).contiguous()
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, x.data_ptr())
        outputs = []
        for out_name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out_name))
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[self.engine.get_tensor_dtype(out_name)]
            buf = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(out_name, buf.data_ptr())
            outputs.append(buf)
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs[0] if len(outputs) == 1 else outputs

