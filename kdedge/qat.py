"""Quantization-aware distillation (QAD): a trained FP32 student fine-tuned with fake quantization and its teacher.

``kdedge distill --qat --student RUN`` and :func:`qat_distill`. The student is captured and
prepared for the runtime's own PT2E quantizer (:class:`~kdedge.models.qat.QATModel`), its observers
calibrated, then trained with the distillation loss by the same loop as ``kdedge distill`` (resume,
DDP, divergence check, progress, ``metrics.json``). The run directory's ``model.safetensors`` is
the prepared graph's tensors under a spec that names the base and the scheme. Its INT8 artifacts
are made from :meth:`QATModel.converted` — the scales it was trained with, not a fresh
calibration (the moving-average observer ranges, frozen for the last epochs): ExecuTorch and LiteRT lower that graph, the QDQ ONNX file is that graph exported, and
OpenVINO and the ORT format convert the ONNX file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import kdedge.distributed as dist_
from kdedge._fs import Claim
from kdedge.config import QATConfig
from kdedge.data.normalization import Normalization
from kdedge.errors import ConfigError, ModelError
from kdedge.models.zoo import ModelSpec, runs_outside_torch
from kdedge.models.qat import SCHEMES, QATModel, calibrate
from kdedge.runs import RunResult

__all__ = ["SCHEMES", "QATModel", "qat_distill", "run_qat"]


def qat_distill(
    student: nn.Module,
    teacher: nn.Module | None,
    train_data: Dataset | DataLoader,
    test_data: Dataset | DataLoader | None = None,
    *,
    val_data: Dataset | DataLoader | None = None,
    config: QATConfig | None = None,
    student_spec: ModelSpec | None = None,
    teacher_name: str | None = None,
    teacher_input: Normalization | None = None,
    out: str | Path | Claim | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Fine-tune the trained FP32 ``student`` with fake quantization for ``config.qat_scheme`` and the distillation loss.

    Args:
        student: The trained FP32 student (its weights are not modified; it is moved to the CPU; the result's ``model`` is a :class:`QATModel`).
        teacher: The teacher; None: the FP32 student itself (its logits are the soft targets).
        config: The QAT recipe (every ``kdedge distill`` field, with a fine-tune's defaults).
        student_spec: The student's spec: the run's checkpoint then reloads by name (scheme recorded).
        train_data: As in :func:`kdedge.distill`, as are ``test_data``, ``val_data``, ``teacher_name``,
            ``teacher_input``, ``out``, ``progress`` and ``on_epoch``.

    Returns:
        The run: test and validation accuracy of the fake-quantized model (what its INT8 artifacts
        compute), ``metrics["qat"]`` (scheme, schedule, calibration, the FP32 student's accuracy).

    Raises:
        ModelError: The student is an ONNX model, is already quantization-aware, or cannot be captured by ``torch.export``.
        BackendUnavailable: The scheme's quantizer (ExecuTorch or litert-torch) is not installed.
    """
    from kdedge.runs import _output

    config = config or QATConfig()
    if runs_outside_torch(student):
        raise ModelError("an ONNX model cannot be trained with fake quantization; give the PyTorch checkpoint it was exported from")
    if isinstance(student, QATModel):
        raise ModelError("the student is already quantization-aware (a --qat run); give the FP32 student it was trained from")
    with _output(out, resume=config.resume) as claim:  # claimed before calibration: a taken --out fails at once
        return _qat(student, teacher, train_data, test_data, val_data=val_data, config=config, student_spec=student_spec, teacher_name=teacher_name,
                    teacher_input=teacher_input, out=claim, progress=progress, on_epoch=on_epoch)


def _qat(student: nn.Module, teacher: nn.Module | None, train_data: Dataset | DataLoader, test_data: Dataset | DataLoader | None, *,
         val_data: Dataset | DataLoader | None, config: QATConfig, student_spec: ModelSpec | None, teacher_name: str | None,
         teacher_input: Normalization | None, out: Claim | Path | None, progress: bool, on_epoch: Callable[[dict], None] | None) -> RunResult:
    from kdedge.data.spec import ImageDataset
    from kdedge.distill.loop import resolve_device
    from kdedge.metrics import evaluate
    from kdedge.rundir import spec_of
    from kdedge.runs import distill

    data_spec = spec_of(train_data)
    shape = tuple(data_spec.input_shape) if data_spec is not None else tuple(student_spec.input_shape) if student_spec else None
    if shape is None:
        raise ConfigError("quantization-aware training needs the input shape: pass a kdedge dataset or the student's spec")
    device = resolve_device(config.device)
    watched = val_data if val_data is not None else test_data
    fp32 = evaluate(student, watched, device=device) if watched is not None else None
    student.cpu()
    model = QATModel(student, shape, scheme=config.qat_scheme, epochs=config.epochs, keep_float=config.keep_float)
    seen = min(config.qat_calibration, len(train_data))  # a resumed run loads what the first one calibrated (same config)
    if not config.resume:  # a resumed run loads its observers with the rest of the checkpoint
        if not isinstance(train_data, ImageDataset):
            raise ConfigError("quantization-aware training calibrates its observers on training images: pass a kdedge dataset (an ImageDataset)")
        sample = train_data.take(min(config.qat_calibration, len(train_data)), seed=config.seed)
        rows = torch.arange(len(sample))
        seen = calibrate(model, (sample.inputs(rows[i : i + 256]) for i in range(0, len(sample), 256)))
    if teacher is None:
        teacher = copy.deepcopy(student).eval()
        teacher_name = teacher_name or "the FP32 student"
    spec = student_spec.with_qat(config.qat_scheme, model.keep_float) if student_spec is not None else None
    record: dict[str, Any] = model.quantization() | {"schedule": model.schedule(), "calibration_images": seen,
                                                     "fp32": {("val" if val_data is not None else "test") + "_accuracy": fp32.accuracy if fp32 else None}}
    return distill(model, teacher, train_data, test_data, val_data=val_data, config=config, student_spec=spec, teacher_name=teacher_name,
                   teacher_input=teacher_input, out=out, progress=progress, on_epoch=on_epoch, extra_metrics={"qat": record})


def run_qat(config: QATConfig, *, progress: bool = True, on_epoch: Callable[[dict], None] | None = None, trust_code: bool = False) -> RunResult:
    """``kdedge distill --qat``: resolve the data, the trained student and the teacher (if any), then :func:`qat_distill` into ``config.out``."""
    from kdedge.data import load_data_for
    from kdedge.resolve import check_same_input, resolve_teacher
    from kdedge.runs import _check_resume, _output

    if not config.student:
        raise ConfigError("quantization-aware training fine-tunes a trained FP32 student: give its run directory or checkpoint (--student runs/student)")
    _check_resume(config)
    dist_.init_from_env(config.device)
    try:
        with _output(config.out, resume=config.resume, kind="qat") as out:  # claimed before any data is read
            data = load_data_for(config)
            student = resolve_teacher(config.student, data.spec, weights=config.student_weights, trust_code=trust_code)  # type: ignore[arg-type]
            if student.is_onnx:
                raise ConfigError(f"{config.student}: an ONNX model cannot be trained with fake quantization; give the checkpoint it was exported from")
            check_same_input(student, data.spec, "quantization-aware")
            teacher = resolve_teacher(config.teacher, data.spec, weights=config.teacher_weights, trust_code=trust_code) if config.teacher else None
            return qat_distill(student.model, teacher.model if teacher else None, data.train, data.test, val_data=data.val, config=config,
                               student_spec=student.spec, teacher_name=teacher.name if teacher else f"{student.name} (FP32)",
                               teacher_input=teacher.input if teacher else None, out=out, progress=progress, on_epoch=on_epoch)
    finally:
        dist_.shutdown()
