"""onnxruntime sessions and batched inference — the reference runtime for every ONNX artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdedge.errors import BackendUnavailable, ConfigError, ExportError

__all__ = [
    "EXECUTION_MODES",
    "OPTIMIZATION_LEVELS",
    "SETTINGS_KEYS",
    "fixed_batch",
    "onnxruntime",
    "ort_predict",
    "ort_session",
    "ort_version",
    "session_kwargs",
]

#: Graph optimization level name -> the ``onnxruntime.GraphOptimizationLevel`` member.
OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
#: Execution mode name -> the ``onnxruntime.ExecutionMode`` member.
EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
#: The keys of a settings dict (what tuning records in a bundle's ``recommended`` entry) -> ``ort_session``'s keywords.
SETTINGS_KEYS = {"intra_op_threads": "threads", "graph_optimization_level": "optimization", "execution_mode": "execution_mode"}


def onnxruntime():
    """The onnxruntime module, or BackendUnavailable naming the package to install."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # chained: a broken install (a missing shared library) fails here too
        raise BackendUnavailable("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu for CUDA)") from exc
    return ort


def ort_version() -> str:
    return onnxruntime().__version__


def ort_session(
    path: str | Path,
    *,
    providers: list[str] | None = None,
    threads: int | None = None,
    optimization: str = "all",
    execution_mode: str = "sequential",
):
    """An ``InferenceSession`` on ``path`` (CPU by default) with a clear error for a bad file.

    Args:
        path: The ONNX model.
        providers: Execution providers in priority order; default ``["CPUExecutionProvider"]``.
        threads: Intra-op threads (default: onnxruntime's choice, one per physical core).
        optimization: Graph optimization level: ``disable``, ``basic``, ``extended`` or ``all``.
        execution_mode: ``sequential`` (one node at a time) or ``parallel`` (independent branches
            on onnxruntime's inter-op thread pool, left at its default size).
    """
    ort = onnxruntime()
    bad = [f"{name} {value!r} (expected one of {', '.join(allowed)})" for name, value, allowed in
           (("optimization", optimization, OPTIMIZATION_LEVELS), ("execution_mode", execution_mode, EXECUTION_MODES)) if value not in allowed]
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        bad.append(f"threads {threads!r} (expected an integer >= 1; 0 or None for onnxruntime's choice)")
    if bad:
        raise ConfigError(f"ort_session: unsupported {'; '.join(bad)}; pass a value as listed")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
    options.execution_mode = getattr(ort.ExecutionMode, EXECUTION_MODES[execution_mode])
    options.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
        if execution_mode == "sequential":  # sequential mode runs no inter-op pool; parallel mode keeps onnxruntime's default
            options.inter_op_num_threads = 1
    providers = providers or ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise BackendUnavailable(
            f"onnxruntime {ort.__version__} has no {', '.join(missing)} (available: {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu for CUDA/TensorRT execution providers"
        )
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"{path}: onnxruntime cannot load it ({first}); is the file truncated, corrupt or not ONNX?") from exc


def session_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """:func:`ort_session`'s keywords for a settings dict, e.g. a bundle's ``recommended[target]["settings"]``.

    ``{"intra_op_threads": 1, "graph_optimization_level": "all", "execution_mode": "sequential"}``
    gives ``{"threads": 1, "optimization": "all", "execution_mode": "sequential"}``; a key left out
    keeps :func:`ort_session`'s default.

    Raises:
        ConfigError: A key that is not a setting (values are checked by :func:`ort_session`).
    """
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise ConfigError(f"unknown onnxruntime setting(s) {', '.join(map(repr, unknown))}; expected keys among {', '.join(SETTINGS_KEYS)}")
    return {SETTINGS_KEYS[k]: v for k, v in settings.items()}


def fixed_batch(session) -> int | None:
    """The batch size a graph's first input is fixed to, or None when its batch dimension is symbolic."""
    shape = session.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def input_dtype(session) -> type:
    """The numpy dtype of the graph's first input (float32 unless it declares float16, uint8 or int8)."""
    return _ORT_DTYPES.get(session.get_inputs()[0].type, np.float32)


def ort_predict(session, inputs: np.ndarray, *, batch_size: int = 256, dtype: type | None = None) -> np.ndarray:
    """The first output of ``session`` over ``inputs`` ``(N, ...)``, run in batches, concatenated.

    Inputs are cast to ``dtype`` (None: the graph input's own, :func:`input_dtype`). A graph with
    a fixed batch size gets batches of exactly that size, the last one zero-padded (and its
    padding rows dropped from the output), whatever ``batch_size`` asks for.
    """
    from kdedge.data.pixels import artifact_input

    dtype = dtype or input_dtype(session)
    name = session.get_inputs()[0].name
    fixed = fixed_batch(session)
    step = fixed or batch_size
    outputs = []
    for i in range(0, len(inputs), step):
        chunk = artifact_input(inputs[i : i + step], dtype, "the ONNX model")
        n = len(chunk)
        if n < step and fixed is not None:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(session.run(None, {name: chunk})[0][:n])
    return np.concatenate(outputs, axis=0) if outputs else np.zeros((0, 0), np.float32)
