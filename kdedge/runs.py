"""Training and distillation as library calls: data, teacher and student in, a trained model out.

:func:`train` and :func:`distill` take plain PyTorch objects; :func:`run_train` and
:func:`run_distill` are what ``kdedge train`` / ``kdedge distill`` call: they resolve the data and
models a config names, join a ``torchrun`` process group if there is one, and write the run
directory (see :mod:`kdedge.rundir`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import kdedge.distributed as dist_
from kdedge._fs import default_out, new_dir
from kdedge._version import __version__
from kdedge.config import DistillConfig, TrainConfig, _RunConfig
from kdedge.data import DataSplits, cache_dir, load_dataset
from kdedge.distill.factory import make_loss
from kdedge.distill.loop import fit, resolve_device
from kdedge.distill.losses import DistillLoss, HintonLoss
from kdedge.distill.teacher import FrozenTeacher
from kdedge.errors import ConfigError
from kdedge.metrics import Evaluation, evaluate
from kdedge.models.zoo import ModelSpec
from kdedge.resolve import resolve_student, resolve_teacher
from kdedge.rundir import RESUME_NEEDS_OUT, check_resumable, model_summary, spec_of, write_run

__all__ = ["RunResult", "train", "distill", "run_train", "run_distill"]


@dataclass
class RunResult:
    """What a training or distillation run produced."""

    model: nn.Module
    test: Evaluation | None
    history: list[dict]
    metrics: dict[str, Any]
    teacher_test: Evaluation | None = None
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _check_out(out: str | Path | None) -> Path | None:
    return None if out is None else new_dir(out, "run")


def _run(
    kind: str,
    model: nn.Module,
    train_data: Dataset | DataLoader,
    test_data: Dataset | DataLoader | None,
    *,
    config: _RunConfig,
    loss: DistillLoss,
    teacher: FrozenTeacher | None,
    spec: ModelSpec | None,
    out: str | Path | None,
    progress: bool,
    extra_metrics: dict[str, Any],
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    out_path = _check_out(out)
    resume = getattr(config, "resume", False)
    ckpt = check_resumable(out_path, resume=resume)
    ctx = dist_.context()
    data_spec = spec_of(train_data)
    use_cache = getattr(config, "cache", "off") != "off"
    cache_path = cache_dir() / "logits" if getattr(config, "cache", "off") == "disk" else None
    start = time.perf_counter()
    history, cached = fit(model, train_data, config=config, loss=loss, teacher=teacher, test=test_data, cache_dir=cache_path, use_cache=use_cache, progress=progress, on_epoch=on_epoch,
                          checkpoint=ckpt, resume=resume)
    device = resolve_device(config.device)
    test_eval = evaluate(model, test_data, device=device) if test_data is not None else None
    model.cpu()
    metrics: dict[str, Any] = {
        "kdedge_version": __version__,
        "kind": kind,
        "test": test_eval.to_dict() if test_eval else None,
        "model": model_summary(model, spec, data_spec),
        "data": data_spec.to_dict() if data_spec else None,
        "seconds": time.perf_counter() - start,
        "history": history,
    } | extra_metrics
    if cached is not None:
        metrics["teacher_cache"] = {"key": cached.key, "hit": cached.hit, "seconds": cached.seconds, "path": str(cached.path) if cached.path else None}
    if ctx.enabled:
        metrics["distributed"] = {"world_size": ctx.world_size, "backend": torch.distributed.get_backend()}
    if not ctx.is_main:
        return RunResult(model=model, test=test_eval, history=history, metrics=metrics, out=None)  # only rank 0 writes
    if out_path is not None:
        write_run(out_path, model, spec, data_spec, metrics, config)
        if ckpt is not None:
            shutil.rmtree(ckpt.parent, ignore_errors=True)  # the run is complete: its checkpoint is no longer needed
    return RunResult(model=model, test=test_eval, history=history, metrics=metrics, out=out_path)


def train(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    test_data: Dataset | DataLoader | None = None,
    *,
    config: TrainConfig | None = None,
    spec: ModelSpec | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Supervised training (Hinton's loss with α = 0) — how teachers are trained.

    Args:
        model: Any classifier ``(B, C, H, W) -> (B, K)``; trained in place.
        train_data: An :class:`ArrayDataset`, any ``Dataset`` of ``(x, y)`` or a ``DataLoader``.
        test_data: Evaluated after every epoch and at the end.
        config: Optimizer, schedule, epochs, seed, ...; ``config.model``/``config.data`` are ignored here.
        spec: Recorded in the checkpoint so the model can be rebuilt by name.
        out: Run directory to write (must not exist); defaults to ``config.out``; None writes nothing.
        progress: Show a progress bar per epoch.
        on_epoch: Called with each epoch's history row when it completes.
    """
    config = config or TrainConfig()
    loss = HintonLoss(alpha=0.0, label_smoothing=config.label_smoothing)
    out = out if out is not None else config.out
    return _run("train", model, train_data, test_data, config=config, loss=loss, teacher=None, spec=spec, out=out, progress=progress, extra_metrics={}, on_epoch=on_epoch)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset | DataLoader,
    test_data: Dataset | DataLoader | None = None,
    *,
    config: DistillConfig | None = None,
    student_spec: ModelSpec | None = None,
    teacher_name: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Distill ``teacher`` into ``student`` with Hinton's loss.

    The teacher is frozen (eval mode, no gradients). Without augmentation its logits over
    ``train_data`` are computed once and cached (``config.cache``); with augmentation it runs on
    every batch.

    Args:
        student: The model to train, in place.
        teacher: A trained classifier with the same number of classes.
        train_data: An :class:`ArrayDataset` (cacheable), any ``Dataset`` of ``(x, y)`` or a ``DataLoader``.
        test_data: Evaluated after every epoch; the teacher is evaluated on it once.
        config: α, T, optimizer, schedule, epochs, seed, cache mode.
        student_spec: Recorded in the checkpoint so the student can be rebuilt by name.
        teacher_name: Recorded in ``metrics.json``.
        out: Run directory to write (must not exist); defaults to ``config.out``; None writes nothing.
        progress: Show a progress bar per epoch.
        on_epoch: Called with each epoch's history row when it completes.
    """
    config = config or DistillConfig()
    out = out if out is not None else config.out
    _check_out(out)
    device = resolve_device(config.device)
    frozen = FrozenTeacher(teacher, device=device, channels_last=config.channels_last)
    teacher_test = evaluate(frozen.model, test_data, device=device) if test_data is not None else None
    data_spec = spec_of(train_data)
    teacher_info = {
        "name": teacher_name or type(teacher).__name__,
        "sha256": frozen.fingerprint(),
        "test": teacher_test.to_dict() if teacher_test else None,
    } | {k: v for k, v in model_summary(frozen.model, None, data_spec).items() if k != "name"}
    loss = make_loss(config)
    result = _run("distill", student, train_data, test_data, config=config, loss=loss, teacher=frozen, spec=student_spec, out=out, progress=progress, extra_metrics={"teacher": teacher_info}, on_epoch=on_epoch)
    result.teacher_test = teacher_test
    frozen.model.cpu()
    return result


def _load_data(config: _RunConfig) -> DataSplits:
    return load_dataset(config.data, train_limit=config.train_limit, test_limit=config.test_limit)


def _out_for(config: _RunConfig, kind: str) -> Path:
    if config.resume and config.out is None:
        raise ConfigError(RESUME_NEEDS_OUT)
    return _check_out(config.out) or default_out(kind)


def run_train(config: TrainConfig, *, progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """``kdedge train``: resolve data and model from ``config``, train, write the run directory.

    Launched by ``torchrun`` with several processes, it joins their process group and trains
    with DistributedDataParallel; only rank 0 writes the run directory.
    """
    out = _out_for(config, "train")
    dist_.init_from_env(config.device)
    try:
        data = _load_data(config)
        model, spec = resolve_student(config.model, data.spec, config.seed)
        return train(model, data.train, data.test, config=config, spec=spec, out=out, progress=progress, on_epoch=on_epoch)
    finally:
        dist_.shutdown()


def run_distill(config: DistillConfig, *, progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """``kdedge distill``: resolve data, teacher and student from ``config``, distill, write the run.

    Under ``torchrun`` it runs distributed, like :func:`run_train`.
    """
    out = _out_for(config, "distill")
    dist_.init_from_env(config.device)
    try:
        data = _load_data(config)
        teacher, _, teacher_name = resolve_teacher(config.teacher, data.spec, weights=config.teacher_weights)
        student, spec = resolve_student(config.student, data.spec, config.seed, weights=config.student_weights, flops_budget=config.flops_budget)
        return distill(student, teacher, data.train, data.test, config=config, student_spec=spec, teacher_name=teacher_name, out=out, progress=progress, on_epoch=on_epoch)
    finally:
        dist_.shutdown()
