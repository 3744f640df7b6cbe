"""Runners: one interface over PyTorch eager, onnxruntime, TensorRT engines and the edge runtimes.

A runner turns a prepared batch into a zero-argument callable that performs exactly one inference
(input already in place, on the runner's device), so the timer measures the model and not the
input pipeline. ``predict`` runs whole arrays for accuracy through the same runtime.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from kdedge.errors import BackendUnavailable, ConfigError
from kdedge.data.pixels import artifact_input

__all__ = ["EdgeRunner", "Runner", "TorchRunner", "OrtRunner", "TensorRTRunner", "TARGETS", "make_runner", "format_prefix", "target_available", "variant_prefix"]

#: target name -> (runtime, device). A target's runners are built from the model's variants.
TARGETS: dict[str, tuple[str, str]] = {
    "torch-cpu": ("torch", "cpu"),
    "torch-cuda": ("torch", "cuda"),
    "ort-cpu": ("onnxruntime", "cpu"),
    "ort-cuda": ("onnxruntime", "cuda"),
    "ort-trt": ("onnxruntime", "tensorrt"),
    "trt": ("tensorrt", "cuda"),
    # Edge runtimes: the runtime is the artifact format of kdedge.exporters.edge that the target runs.
    "executorch-cpu": ("executorch", "cpu"),
    "litert-cpu": ("litert", "cpu"),
    "openvino-cpu": ("openvino", "cpu"),
    "ort-mobile-cpu": ("ort", "cpu"),
}
#: Runtimes whose targets run edge artifacts (their variants are ``<runtime>-<precision>``).
EDGE_RUNTIMES = ("executorch", "litert", "openvino", "ort")


#: Artifact format (``export.json``'s ``format``) -> the prefix of its variants; an edge format is its own prefix.
_FORMAT_PREFIX = {"onnx": "onnx-", "tensorrt": "trt-"}


def format_prefix(fmt: str) -> str:
    """The prefix of an artifact format's variants: ``onnx-``, ``trt-``, or an edge format's (``executorch-``)."""
    return _FORMAT_PREFIX.get(fmt, f"{fmt}-")


def variant_prefix(target: str) -> str:
    """The prefix of the variants ``target`` runs: ``torch-``, or the prefix of the artifact format its runtime runs."""
    runtime = TARGETS[target][0]
    return "torch-" if runtime == "torch" else format_prefix({"onnxruntime": "onnx"}.get(runtime, runtime))

_ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                  "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


class Runner(Protocol):
    """What the harness needs from a runtime."""

    runtime: str  # torch | onnxruntime | tensorrt
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | int8
    threads: int | None
    on_device_timing: bool  # time with CUDA events rather than the host clock

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        """A callable that runs one inference on ``batch`` (already placed where the runtime needs it)."""
        ...

    def predict(self, x: np.ndarray, *, batch_size: int) -> np.ndarray:
        """First-output logits for ``x`` ``(N, ...)`` as float32 on the host."""
        ...

    def check_batch(self, batch: int) -> None:
        """Raise ConfigError when the runtime cannot take this batch size."""
        ...


def target_available(target: str) -> str | None:
    """None when ``target`` can run here, else why not (naming the package that provides it)."""
    if target not in TARGETS:
        return f"unknown target {target!r}; expected one of {', '.join(TARGETS)}"
    runtime, device = TARGETS[target]
    if device in ("cuda", "tensorrt") and not torch.cuda.is_available():
        return f"{target} needs a CUDA GPU and torch built with CUDA; none is visible here"
    if runtime == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            return f"{target} needs onnxruntime: pip install onnxruntime (onnxruntime-gpu for CUDA/TensorRT)"
        provider = _ORT_PROVIDERS[device][0]
        if provider not in ort.get_available_providers():
            return f"{target} needs onnxruntime's {provider}, which this onnxruntime {ort.__version__} build lacks; pip install onnxruntime-gpu"
    if runtime == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return f"{target} needs TensorRT: pip install 'kdedge-distill[tensorrt]'"
    if runtime in EDGE_RUNTIMES:
        from kdedge.exporters.edge import edge_unavailable

        why = edge_unavailable(runtime, purpose="run")
        return f"{target}: {why}" if why else None
    return None


@dataclass
class TorchRunner:
    """PyTorch eager, in eval mode under ``inference_mode``; FP16 by casting a copy of the model."""

    model: nn.Module
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    channels_last: bool = False
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.threads is not None and self.device == "cpu":
            torch.set_num_threads(self.threads)
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._dtype = dtype
        model = copy.deepcopy(self.model).eval().to(self.device, dtype)  # never round the caller's weights
        self._model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.on_device_timing = self.device == "cuda"

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self._dtype)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.ndim == 4 else t

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        x, model = self._tensor(batch), self._model

        def run() -> Any:
            with torch.inference_mode():
                return model(x)

        return run

    def predict(self, x: np.ndarray, *, batch_size: int) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([self._model(self._tensor(x[i : i + batch_size])).float().cpu().numpy() for i in range(0, len(x), batch_size)])

    def check_batch(self, batch: int) -> None:
        return None


class OrtRunner:
    """An onnxruntime session (CPU, CUDA or TensorRT execution provider) on an ONNX file."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "cpu", precision: str = "fp32", threads: int | None = None, session: Any = None) -> None:
        from kdedge.ort import fixed_batch, input_dtype, ort_session

        self.path, self.device, self.precision, self.threads = Path(path), device, precision, threads
        self.session = session if session is not None else ort_session(self.path, providers=_ORT_PROVIDERS[device], threads=threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = input_dtype(self.session)  # float32, float16 (FP16 I/O), or uint8 pixels (preprocessing in the graph)
        self._batch_dim = fixed_batch(self.session)
        self.on_device_timing = False  # session.run copies in and out: host time is the user's latency

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        feed = {self.input_name: artifact_input(batch, self.input_dtype, self.path.name)}
        run, names = self.session.run, None
        return lambda: run(names, feed)

    def predict(self, x: np.ndarray, *, batch_size: int) -> np.ndarray:
        from kdedge.ort import ort_predict

        return ort_predict(self.session, x, batch_size=batch_size, dtype=self.input_dtype).astype(np.float32)  # a fixed-batch graph gets its own size

    def check_batch(self, batch: int) -> None:
        if self._batch_dim is not None and batch != self._batch_dim:
            raise ConfigError(f"{self.path.name} has a fixed batch size of {self._batch_dim}; batch {batch} is not allowed (export with a dynamic batch)")


class TensorRTRunner:
    """A serialized TensorRT engine; inputs live on the GPU, timing uses CUDA events."""

    runtime, device = "tensorrt", "cuda"

    def __init__(self, path: str | Path, *, precision: str = "fp16", threads: int | None = None) -> None:
        from kdedge.exporters.tensorrt import TensorRTEngine

        self.path, self.precision, self.threads = Path(path), precision, threads
        self.engine = TensorRTEngine(self.path)
        profile = self.engine.metadata.get("profile", {})
        self.min_batch, self.max_batch = int(profile.get("min", 1)), int(profile.get("max", 2**31))
        self.on_device_timing = True

    def check_batch(self, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:
            raise ConfigError(f"{self.path.name}'s optimization profile allows batch {self.min_batch}..{self.max_batch}, not {batch}; rebuild with --trt-batch")

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        return lambda: self.engine(x)

    def predict(self, x: np.ndarray, *, batch_size: int) -> np.ndarray:
        step = min(batch_size, self.max_batch)
        return np.concatenate([self.engine(torch.from_numpy(x[i : i + step])).float().cpu().numpy() for i in range(0, len(x), step)])


class EdgeRunner:
    """An edge artifact in its own runtime (:func:`kdedge.exporters.edge.load_edge`)."""

    device = "cpu"

    def __init__(self, runtime: str, path: str | Path, *, precision: str = "fp32", threads: int | None = None) -> None:
        from kdedge.exporters.edge import load_edge

        self.runtime, self.path, self.precision, self.threads = runtime, Path(path), precision, threads
        self.session = load_edge(runtime, self.path, threads=threads)
        self.runtime_version = self.session.runtime
        self.threads_used = self.session.threads  # what the runtime runs with: threads=None means its own default, which differs
        self.on_device_timing = False
        self.max_batch = self.session.max_batch or 2**31

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        return self.session.prepare(np.ascontiguousarray(batch))  # the session casts to what its artifact takes

    def predict(self, x: np.ndarray, *, batch_size: int) -> np.ndarray:
        from kdedge.exporters.edge import edge_predict

        return edge_predict(self.session, x, batch_size=batch_size)

    def check_batch(self, batch: int) -> None:
        s = self.session
        if s.fixed_batch is not None and batch != s.fixed_batch:
            raise ConfigError(f"{self.path.name} ({s.runtime}) takes a fixed batch of {s.fixed_batch}; batch {batch} is not allowed "
                              f"(pass --batch-sizes {s.fixed_batch} for {self.runtime} targets)")
        if s.max_batch is not None and batch > s.max_batch:
            raise ConfigError(f"{self.path.name} ({s.runtime}) takes batches up to {s.max_batch}; batch {batch} is not allowed "
                              "(export with a larger edge_max_batch)")


def make_runner(target: str, *, module: nn.Module | None = None, path: str | Path | None = None, precision: str = "fp32",
                threads: int | None = None, channels_last: bool = False) -> Runner:
    """The runner for ``target`` over a torch ``module`` or an artifact ``path``."""
    why = target_available(target)
    if why:
        raise BackendUnavailable(why)
    runtime, device = TARGETS[target]
    if runtime == "torch":
        if module is None:
            raise ConfigError(f"{target} runs PyTorch modules; pass a checkpoint or run directory, not {path}")
        return TorchRunner(module, device=device, precision=precision, threads=threads, channels_last=channels_last)
    if runtime == "onnxruntime":
        if path is None:
            raise ConfigError(f"{target} runs ONNX files; export the model first")
        return OrtRunner(path, device=device, precision=precision, threads=threads)
    if runtime in EDGE_RUNTIMES:
        if path is None:
            raise ConfigError(f"{target} runs {runtime} artifacts; export the model first (kdedge export --format {runtime})")
        return EdgeRunner(runtime, path, precision=precision, threads=threads)
    if path is None:
        raise ConfigError(f"{target} runs TensorRT engines (.plan); build one with kdedge export --format tensorrt")
    return TensorRTRunner(path, precision=precision, threads=threads)
