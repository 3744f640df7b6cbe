"""The teacher's pass over the training data, in the fastest runtime that computes what it computes.

A cache (the logit cache, or K augmented views per image) costs one inference pass of the teacher
over the data — K passes for K views. On a CPU onnxruntime runs a CNN's inference faster than
torch eager (``benchmarks/teacher_pass.py`` measures both), so :func:`teacher_pass` exports the
teacher (its input map included) to ONNX, checks onnxruntime's logits against torch's on a probe
batch of real inputs (max |Δ| ≤ ``atol``), times both runtimes interleaved on that batch, and
scores with onnxruntime unless torch is clearly faster. When the export or the parity check fails,
or the teacher is not on the CPU, the pass runs in torch and the reason is kept in
:attr:`TeacherPass.rates`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from kdedge._dynamo import dynamo_export, torchscript_export
from kdedge.config import TEACHER_RUNTIMES
from kdedge.errors import ConfigError, first_line


class _Teacher(Protocol):
    """What the pass needs of a :class:`~kdedge.distill.teacher.FrozenTeacher` (this module sits below it)."""

    device: torch.device
    model: nn.Module
    module: nn.Module

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

__all__ = ["RuntimeRate", "TeacherPass", "teacher_pass"]


@dataclass(frozen=True)
class RuntimeRate:
    """One runtime's throughput on the probe batch, or why it was not used."""

    runtime: str
    images_per_s: float | None  # None: not timed (it failed, or there was nothing to choose)
    max_abs_diff: float | None = None  # against torch on the probe batch
    note: str = ""

    def describe(self) -> str:
        if self.images_per_s is None:
            return f"{self.runtime}: {self.note or 'not timed'}"
        diff = f", max |Δ| {self.max_abs_diff:.1e}" if self.max_abs_diff is not None else ""
        return f"{self.runtime} {self.images_per_s:,.0f} images/s{diff}"


@dataclass
class TeacherPass:
    """Scores batches of the data's inputs: ``(B, C, H, W) -> (B, K)`` float32 logits on the CPU."""

    runtime: str
    rates: list[RuntimeRate]
    _score: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._score(x)

    def describe(self) -> str:
        """One line: the runtime chosen and every runtime's rate."""
        return f"{self.runtime} ({'; '.join(r.describe() for r in self.rates)})"


def _torch_scorer(teacher: _Teacher) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: teacher(x).cpu()


def _ort_scorer(teacher: _Teacher, input_shape: tuple[int, ...], *, exporter: str = "torchscript") -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """Export ``teacher.module`` (input map included) with a dynamic batch and load it in onnxruntime with torch's thread count.

    The file is only run, never shipped, and :func:`teacher_pass` checks its logits against torch's:
    ``exporter="torchscript"`` takes TorchScript's exporter (0.1 s for the shipped teacher against
    2.6 s) where it can trace the teacher, else the plain dynamo export (kdedge's artifact exporter
    adds metadata, slimming and external data on top; a cache pass needs none of them). Returns the
    scorer and the exporter that made its file.
    """
    from kdedge.ort import ort_session

    with tempfile.TemporaryDirectory(prefix="kdedge-teacher-") as tmp:
        path = Path(tmp) / "teacher.onnx"
        used = "torchscript" if exporter == "torchscript" and torchscript_export(teacher.module, path, input_shape) else "dynamo"
        if used == "dynamo":
            dynamo_export(teacher.module, input_shape, what="the teacher").save(str(path))
        session = ort_session(path, threads=torch.get_num_threads())  # the session holds the graph: the file can go
    name = session.get_inputs()[0].name

    def score(x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {name: feed})[0])

    return score, used


def _rate(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    score(x)
    return len(x) / max(time.perf_counter() - start, 1e-9)


def _is_onnx(teacher: _Teacher) -> bool:
    from kdedge.models.onnx_teacher import OnnxTeacherModule

    return any(isinstance(m, OnnxTeacherModule) for m in teacher.model.modules())


def teacher_pass(teacher: _Teacher, probe: torch.Tensor, *, runtime: str = "auto", atol: float = 1e-4, rounds: int = 3,
                 torch_margin: float = 1.25) -> TeacherPass:
    """The teacher in the runtime its caches are scored with.

    ``auto`` prefers onnxruntime once it has passed the parity check, unless torch is measured at
    least ``torch_margin`` times faster: a runtime choice that flipped with this machine's timing
    noise would score the same cache with other rounding from run to run (both within ``atol``,
    but a rebuild should train on the same numbers). Under DDP every rank takes onnxruntime only
    if every rank would.

    Args:
        teacher: The frozen teacher.
        probe: Real inputs ``(B, C, H, W)`` as the data loader gives them (a few hundred: the
            parity check and the timing both run on them).
        runtime: ``auto``, or ``torch``/``onnxruntime`` to force one (a forced onnxruntime that
            cannot export, fails parity or has a teacher off the CPU raises).
        atol: Max |Δ| allowed between onnxruntime's and torch's logits on ``probe``.
        rounds: Interleaved timing rounds per runtime (the median is reported).
        torch_margin: How much faster torch must be measured for ``auto`` to keep it.

    Raises:
        ConfigError: ``runtime`` is not one of :data:`~kdedge.config.TEACHER_RUNTIMES`, or a forced onnxruntime cannot be used.
    """
    import kdedge.distributed as dist_

    if runtime not in TEACHER_RUNTIMES:
        raise ConfigError(f"teacher_runtime must be one of {', '.join(TEACHER_RUNTIMES)}, got {runtime!r}")
    torch_score = _torch_scorer(teacher)
    off_cpu = teacher.device.type != "cpu"
    if runtime == "onnxruntime" and off_cpu:
        raise ConfigError(f"teacher_runtime onnxruntime: the teacher runs on {teacher.device.type}, and kdedge's onnxruntime pass is CPU-only; "
                          "use --teacher-runtime torch (or auto)")
    if runtime == "torch" or off_cpu or _is_onnx(teacher):  # the same on every rank: no collective needed
        note = "forced" if runtime == "torch" else f"runs on {teacher.device.type}" if off_cpu else "already onnxruntime"
        return TeacherPass("torch", [RuntimeRate("torch", None, note=note)], torch_score)
    probe = probe.detach().cpu().float().contiguous()
    try:
        reference = torch_score(probe)
        ort_score, used = _ort_scorer(teacher, tuple(probe.shape[1:]))
        diff = float((ort_score(probe) - reference).abs().max())
        if diff > atol and used == "torchscript":  # a trace can differ where torch.export's graph does not: that one decides
            ort_score, used = _ort_scorer(teacher, tuple(probe.shape[1:]), exporter="dynamo")
            diff = float((ort_score(probe) - reference).abs().max())
        failed = None if diff <= atol else f"max |Δ| {diff:.2e} against torch on {len(probe)} probe inputs exceeds {atol:g}"
    except Exception as exc:  # noqa: BLE001 — export, session or run: any failure means "not this runtime", and torch still scores
        failed, diff = first_line(exc), None
    rates = [RuntimeRate("torch", None), RuntimeRate("onnxruntime", None, diff, note=failed or "")]
    if failed is None:
        rates = _timed(torch_score, ort_score, probe, rounds, diff)
    prefer_ort = failed is None and (runtime == "onnxruntime" or rates[0].images_per_s < torch_margin * rates[1].images_per_s)  # type: ignore[operator]
    if not dist_.all_true(prefer_ort) and prefer_ort:
        prefer_ort, rates[1] = False, RuntimeRate("onnxruntime", rates[1].images_per_s, diff, note="not chosen by every rank")
    if failed is not None and runtime == "onnxruntime":
        raise ConfigError(f"teacher_runtime onnxruntime: {failed}; use --teacher-runtime torch (or auto)")
    return TeacherPass("onnxruntime", rates, ort_score) if prefer_ort else TeacherPass("torch", rates, torch_score)


def _timed(torch_score: Callable, ort_score: Callable, probe: torch.Tensor, rounds: int, diff: float | None) -> list[RuntimeRate]:
    """Both runtimes' images/s on ``probe``: the median of ``rounds`` interleaved calls (this machine drifts over seconds), after a warm-up."""
    samples: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    _rate(ort_score, probe)
    _rate(torch_score, probe)  # first calls allocate
    for _ in range(rounds):
        samples["torch"].append(_rate(torch_score, probe))
        samples["onnxruntime"].append(_rate(ort_score, probe))
    return [RuntimeRate("torch", statistics.median(samples["torch"])), RuntimeRate("onnxruntime", statistics.median(samples["onnxruntime"]), diff)]
