"""The machine a benchmark ran on: CPU model and ISA flags, cores, library versions, GPU; and memory probes."""

from __future__ import annotations

import os
import platform
import resource
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["capture_environment", "peak_rss_bytes", "reset_peak_rss", "current_rss_bytes"]

# ISA extensions that decide which kernels the runtimes pick (e.g. VNNI for INT8, AMX for bf16/int8 tiles).
_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def _cpu() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "logical_cores": os.cpu_count()}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        info["model"] = platform.processor() or "unknown"
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    info["model"] = fields.get("model name") or fields.get("Hardware") or "unknown"
    info["flags"] = [f for f in _FLAGS if f in flags]
    return info


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy", "kdedge-distill"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return {k: v for k, v in out.items() if v is not None or k in ("torch", "onnxruntime")}


def capture_environment(threads: int | None = None) -> dict[str, Any]:
    """Everything a reader needs to judge whether two benchmark numbers are comparable."""
    import torch

    env: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu(),
        "threads": {"requested": threads, "torch": torch.get_num_threads()},
        "versions": _versions(),
        "gpu": None,
    }
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_bytes": int(p.total_memory), "cuda": torch.version.cuda}
    return env


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak_rss` (else since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
