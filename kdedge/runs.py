"""Training and distillation as library calls, and the run directory they write.

A run directory holds ``model.safetensors`` (weights plus model and dataset specs),
``metrics.json`` and the fully resolved ``config.yaml``. It is written under a temporary name
and renamed into place, so an interrupted run leaves no half-written directory.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdedge import __version__
from kdedge._fs import atomic_dir
from kdedge.config import DistillConfig, TrainConfig, _RunConfig, config_to_yaml
from kdedge.data import DataSplits, DatasetSpec, cache_dir, load_dataset
from kdedge.data.spec import ArrayDataset
from kdedge.distill import distributed as dist_
from kdedge.distill.loop import fit, resolve_device
from kdedge.distill.losses import DistillLoss, DKDLoss, HintonLoss
from kdedge.distill.metrics import Evaluation, evaluate
from kdedge.distill.teacher import FrozenTeacher
from kdedge.errors import ConfigError, DataError, ModelError
from kdedge.models.byo import is_factory_ref
from kdedge.models.zoo import (
    MODELS,
    ModelSpec,
    count_flops,
    count_parameters,
    create_model,
    load_checkpoint,
    load_weights,
    parse_model_name,
    pretrained_path,
    save_checkpoint,
)

__all__ = ["checkpoint_path", "auto_student", "make_loss", "RunResult", "train", "distill", "run_train", "run_distill", "resolve_teacher", "resolve_student", "default_out"]


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


def default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_out(out: str | Path | None) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if out.exists():
        raise ConfigError(f"output directory {out} already exists; pass another --out or remove it")
    return out


_RESUME_NEEDS_OUT = "--resume needs --out: the run directory the killed run was writing (its checkpoint is OUT.partial/checkpoint.pt)"


def checkpoint_path(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its per-epoch checkpoint until it finishes: ``OUT.partial/checkpoint.pt``."""
    out = Path(out)
    return out.with_name(out.name + ".partial") / "checkpoint.pt"


def _spec_of(data: Dataset | DataLoader) -> DatasetSpec | None:
    ds = data.dataset if isinstance(data, DataLoader) else data
    return ds.spec if isinstance(ds, ArrayDataset) else None


def _model_summary(model: nn.Module, spec: ModelSpec | None, data: DatasetSpec | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"name": spec.name if spec else type(model).__name__, "params": count_parameters(model)}
    shape = spec.input_shape if spec else (data.input_shape if data else None)
    if shape is not None:
        summary["flops"] = count_flops(model, tuple(shape))
    return summary


def _write_run(out: Path, model: nn.Module, spec: ModelSpec | None, data: DatasetSpec | None, metrics: dict, config: _RunConfig) -> None:
    """Write the run directory atomically: build it under a temporary name, then rename."""
    with atomic_dir(out) as tmp:
        cfg = config.to_dict() | {"out": str(out)}
        save_checkpoint(tmp / "model.safetensors", model, spec, data, extra={"kdedge_version": __version__, "test_accuracy": metrics.get("test", {}).get("accuracy")})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "config.yaml").write_text(config_to_yaml(type(config)(**cfg)))


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
    ckpt = checkpoint_path(out_path) if out_path is not None else None
    if resume and ckpt is None:
        raise ConfigError(_RESUME_NEEDS_OUT)
    if not resume and ckpt is not None and ckpt.exists():
        raise ConfigError(f"{ckpt.parent} holds the checkpoint of an unfinished run; continue it with --resume, or remove {ckpt.parent} to start over")
    ctx = dist_.context()
    data_spec = _spec_of(train_data)
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
        "model": _model_summary(model, spec, data_spec),
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
        _write_run(out_path, model, spec, data_spec, metrics, config)
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
    data_spec = _spec_of(train_data)
    teacher_info = {
        "name": teacher_name or type(teacher).__name__,
        "sha256": frozen.fingerprint(),
        "test": teacher_test.to_dict() if teacher_test else None,
    } | {k: v for k, v in _model_summary(frozen.model, None, data_spec).items() if k != "name"}
    loss = make_loss(config)
    result = _run("distill", student, train_data, test_data, config=config, loss=loss, teacher=frozen, spec=student_spec, out=out, progress=progress, extra_metrics={"teacher": teacher_info}, on_epoch=on_epoch)
    result.teacher_test = teacher_test
    frozen.model.cpu()
    return result


def make_loss(config: DistillConfig) -> DistillLoss:
    """The distillation loss a config names: ``hinton`` (α, T), ``dkd`` (dkd_alpha, dkd_beta, T), or
    ``fitnets`` / ``at``: Hinton's loss plus a feature term between ``student_layer`` and ``teacher_layer``
    weighted by ``feature_weight`` (default 1 for FitNets, 1000 for AT, as in the papers)."""
    if config.loss in ("fitnets", "at"):
        from kdedge.distill.features import AttentionTransfer, FeatureDistillLoss, FitNetsHint

        term = FitNetsHint() if config.loss == "fitnets" else AttentionTransfer()
        weight = config.feature_weight if config.feature_weight is not None else (1.0 if config.loss == "fitnets" else 1000.0)
        logits = HintonLoss(alpha=config.alpha, temperature=config.temperature, label_smoothing=config.label_smoothing)
        return FeatureDistillLoss(logits, term, student_layer=config.student_layer, teacher_layer=config.teacher_layer, weight=weight)  # type: ignore[arg-type]
    if config.loss == "dkd":
        return DKDLoss(alpha=config.dkd_alpha, beta=config.dkd_beta, temperature=config.temperature, label_smoothing=config.label_smoothing,
                       warmup_epochs=config.dkd_warmup)
    return HintonLoss(alpha=config.alpha, temperature=config.temperature, label_smoothing=config.label_smoothing)


def _check_fits(what: str, spec: ModelSpec, data: DatasetSpec) -> None:
    if spec.num_classes != data.num_classes or tuple(spec.input_shape) != tuple(data.input_shape):
        raise DataError(
            f"{what} expects {spec.num_classes} classes and inputs {tuple(spec.input_shape)}, but data {data.name!r} has "
            f"{data.num_classes} classes and inputs {tuple(data.input_shape)}; use a {what} trained on this data"
        )


def resolve_teacher(ref: str, data: DatasetSpec, *, weights: str | None = None) -> tuple[nn.Module, ModelSpec, str]:
    """A teacher from a run directory, a ``.safetensors`` checkpoint, an ``.onnx`` file, a shipped zoo
    name, or a factory (``package.module:factory``, ``file.py:factory``) with ``weights``."""
    path = Path(ref).expanduser()
    if not path.exists() and is_factory_ref(ref):
        spec = ModelSpec(ref, 1.0, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
        model = create_model(spec)
        if weights:
            load_weights(model, weights)
        return model, spec, ref + (f" ({weights})" if weights else "")
    if weights:
        raise ConfigError(f"--teacher-weights applies to a factory teacher (module:factory); {ref} already carries its weights")
    if path.is_file() and path.suffix == ".onnx":
        from kdedge.distill.onnx_teacher import OnnxTeacherModule

        module = OnnxTeacherModule(path, input_shape=tuple(data.input_shape), num_classes=data.num_classes)
        return module, ModelSpec("onnx", 1.0, data.num_classes, tuple(data.input_shape)), str(path)  # type: ignore[arg-type]
    if path.exists():
        ckpt = load_checkpoint(path)
        _check_fits(f"teacher {ref}", ckpt.spec, data)
        return ckpt.model, ckpt.spec, str(ckpt.path)
    arch, width = parse_model_name(ref)
    weights = pretrained_path(arch, width, data.name)
    if weights is None:
        raise ModelError(
            f"kdedge ships no {ref} weights for {data.name!r}; pass a run directory or checkpoint as --teacher "
            f"(train one with: kdedge train --model {ref} --data {data.name} --out DIR)"
        )
    ckpt = load_checkpoint(weights)
    _check_fits(f"teacher {ref}", ckpt.spec, data)
    return ckpt.model, ckpt.spec, f"{ref} (shipped, {data.name})"


def auto_student(data: DatasetSpec, flops_budget: float) -> tuple[ModelSpec, int]:
    """The zoo model with the most FLOPs per sample within ``flops_budget`` (widths 0.25..2)."""
    best: tuple[int, int, ModelSpec] | None = None
    for arch in sorted(MODELS):
        for width in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
            spec = ModelSpec(arch, width, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
            model = create_model(spec)
            flops, params = count_flops(model, spec.input_shape), count_parameters(model)
            if flops <= flops_budget and (best is None or (flops, params) > best[:2]):
                best = (flops, params, spec)
    if best is None:
        raise ConfigError(f"no zoo student fits {flops_budget:,.0f} FLOPs per sample on {tuple(data.input_shape)} inputs; raise --flops-budget")
    return best[2], best[0]


def resolve_student(ref: str, data: DatasetSpec, seed: int, *, weights: str | None = None, flops_budget: float | None = None) -> tuple[nn.Module, ModelSpec]:
    """A fresh zoo model (seeded) by name, ``auto`` under a FLOPs budget, a factory, or a checkpoint to fine-tune."""
    path = Path(ref).expanduser()
    if path.exists():
        if weights:
            raise ConfigError(f"--student-weights applies to a zoo name or factory; {ref} already carries its weights")
        ckpt = load_checkpoint(path)
        _check_fits(f"model {ref}", ckpt.spec, data)
        return ckpt.model, ckpt.spec
    if ref == "auto":
        if flops_budget is None:
            raise ConfigError("--student auto needs --flops-budget (FLOPs per sample)")
        spec, _ = auto_student(data, flops_budget)
    elif is_factory_ref(ref):
        spec = ModelSpec(ref, 1.0, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
    else:
        arch, width = parse_model_name(ref)
        spec = ModelSpec(arch, width, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
    torch.manual_seed(seed)  # initialization is part of the seeded run
    model = create_model(spec)
    if weights:
        load_weights(model, weights)
    return model, spec


def _load_data(config: _RunConfig) -> DataSplits:
    return load_dataset(config.data, train_limit=config.train_limit, test_limit=config.test_limit)


def _out_for(config: _RunConfig, kind: str) -> Path:
    if config.resume and config.out is None:
        raise ConfigError(_RESUME_NEEDS_OUT)
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
