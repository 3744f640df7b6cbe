"""Training and distillation as library calls: data, teacher and student in, a trained model out.

:func:`train` and :func:`distill` take plain PyTorch objects; :func:`run_train` and
:func:`run_distill` are what ``kdedge train`` / ``kdedge distill`` call: they resolve the data and
models a config names, join a ``torchrun`` process group if there is one, and write the run
directory (see :mod:`kdedge.rundir`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import kdedge.distributed as dist_
from kdedge._fs import Claim, claim_out, default_out
from kdedge._version import __version__
from kdedge.config import DistillConfig, TrainConfig, _RunConfig
from kdedge.data import DatasetSpec, cache_dir, load_data_for
from kdedge.distill.factory import make_loss
from kdedge.distill.loop import fit, resolve_device
from kdedge.distill.losses import DistillLoss, HintonLoss
from kdedge.data.normalization import Normalization
from kdedge.distill.teacher import FrozenTeacher, teacher_input_map
from kdedge.distill.views import TeacherViews
from kdedge.errors import ConfigError, ResultKept, TrainingDiverged
from kdedge.metrics import ChanceCheck, Evaluation, evaluate
from kdedge.progress import Progress
from kdedge.models.zoo import ModelSpec
from kdedge.resolve import resolve_student, resolve_teacher
from kdedge.rundir import RESUME_NEEDS_OUT, checkpoint_path, model_summary, spec_of, write_run
from kdedge.tblog import RunLog

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
    val: Evaluation | None = None  # on the validation split, when there is one
    teacher_val: Evaluation | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _output(out: str | Path | Claim | None, *, resume: bool, kind: str | None = None,
            checkpoint: str | tuple[str, ...] = "checkpoint.pt") -> Iterator[Claim | Path | None]:
    """The run directory ``out``, claimed for the block (:func:`~kdedge._fs.claim_out`): two runs never write the same one.

    ``out`` None with a ``kind``: a fresh ``runs/<kind>-<time>[-N]``; without one, nothing is written.
    Only the main rank claims (the others never write; they get the path). When the block ends the
    claim is released, keeping ``OUT.partial`` when it holds a checkpoint (or a finished prune step) (a killed or diverged run
    continues from it with ``--resume``).
    """
    if isinstance(out, Claim) or (out is None and kind is None):
        yield out
        return
    ctx = dist_.context()
    claim: Claim | None = None
    error: ConfigError | None = None
    if ctx.is_main:
        try:
            claim = claim_out(out, kind or "run", resume=resume, checkpoint=checkpoint)
        except ConfigError as exc:  # caught before the collective below, which every rank must reach (claim_out turns OSError into it)
            error = exc
    if ctx.enabled and not dist_.all_true(error is None):  # every rank stops, not only the one that could not claim
        raise error or ConfigError(f"the main process could not claim {out or 'the run directory'} (its message says why)")
    if error is not None:
        raise error
    try:
        # The other ranks get an unheld claim of the same name: they never write, but name the same checkpoint to resume from.
        yield claim if claim is not None else Claim(Path(out or default_out(kind or "run")), None)
    finally:
        if claim is not None:
            claim.release(keep=claim.partial.is_dir() and any(claim.partial.iterdir()))  # a checkpoint (or a prune step) to resume from


def _diverged_note(exc: TrainingDiverged, out: Path, ckpt: Path, config: _RunConfig) -> TrainingDiverged:
    """The divergence message, plus where the last good epoch's checkpoint is and how to continue from it."""
    from kdedge.distill.checkpoint import load_state

    try:
        epoch = f" of epoch {len(load_state(ckpt).get('history', []))}"
    except ConfigError:  # a damaged checkpoint must not hide why the run stopped
        epoch = ""
    return TrainingDiverged(f"{exc}. The checkpoint{epoch} (the last good one) is kept in {ckpt.parent}: continue from it with "
                            f"--resume --out {out} --lr {config.lr / 10:g}")


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
    out: Claim | Path | None,
    progress: bool,
    extra_metrics: dict[str, Any],
    on_epoch: Callable[[dict], None] | None = None,
    val_data: Dataset | DataLoader | None = None,
) -> RunResult:
    """Fit, evaluate and write the run to ``out`` (claimed by the caller with :func:`_output`)."""
    resume = getattr(config, "resume", False)
    ctx = dist_.context()
    out_path = out.path if isinstance(out, Claim) else out
    # Every rank names the checkpoint (saving it is a collective, resuming reads it); it lives in the claim, OUT.partial.
    ckpt = checkpoint_path(out_path) if out_path is not None else None
    data_spec = spec_of(train_data)
    use_cache = getattr(config, "cache", "off") != "off"
    cache_path = cache_dir() / "logits" if getattr(config, "cache", "off") == "disk" else None
    start = time.perf_counter()
    with RunLog(getattr(config, "log_dir", None) if ctx.is_main else None, title=f"kdedge {kind}", on_epoch=on_epoch) as tb:
        try:
            history, cached = fit(model, train_data, config=config, loss=loss, teacher=teacher, test=test_data, val=val_data, cache_dir=cache_path,
                                  use_cache=use_cache, progress=progress, on_epoch=tb.epoch, checkpoint=ckpt, resume=resume)
        except TrainingDiverged as exc:
            if ckpt is not None and out_path is not None and ctx.is_main and ckpt.is_file():
                raise _diverged_note(exc, out_path, ckpt, config) from exc
            raise
        return _finish(kind, model, test_data, val_data, history, cached, config=config, spec=spec, data_spec=data_spec, out_path=out_path,
                       ckpt=ckpt, extra_metrics=extra_metrics, start=start, tb=tb)


def _finish(kind: str, model: nn.Module, test_data: Dataset | DataLoader | None, val_data: Dataset | DataLoader | None, history: list[dict],
            cached: Any, *, config: _RunConfig, spec: ModelSpec | None, data_spec: DatasetSpec | None, out_path: Path | None, ckpt: Path | None,
            extra_metrics: dict[str, Any], start: float, tb: RunLog) -> RunResult:
    """After training: the final evaluation, ``metrics.json`` and the run directory (main rank), the TensorBoard summary."""
    ctx = dist_.context()
    device = resolve_device(config.device)
    test_eval = evaluate(model, test_data, device=device) if test_data is not None else None  # the final report's one read of the test split
    val_eval = evaluate(model, val_data, device=device) if val_data is not None else None
    model.cpu()
    metrics: dict[str, Any] = {
        "kdedge_version": __version__,
        "kind": kind,
        "test": test_eval.to_dict() if test_eval else None,
        **({"val": val_eval.to_dict()} if val_eval else {}),
        "model": model_summary(model, spec, data_spec),
        "data": data_spec.to_dict() if data_spec else None,
        "seconds": time.perf_counter() - start,
        "history": history,
    } | extra_metrics
    if cached is not None:
        metrics["teacher_cache"] = {"key": cached.key, "hit": cached.hit, "seconds": cached.seconds, "path": str(cached.path) if cached.path else None,
                                    "runtime": cached.runtime or None, "bytes": cached.nbytes,
                                    **({"views": cached.recipe.views, "view_topk": cached.recipe.topk} if isinstance(cached, TeacherViews) else {})}
    if ctx.enabled:
        metrics["distributed"] = {"world_size": ctx.world_size, "backend": torch.distributed.get_backend()}
    if not ctx.is_main:
        return RunResult(model=model, test=test_eval, history=history, metrics=metrics, out=None, val=val_eval)  # only rank 0 writes
    tb.finish(metrics, epochs=config.epochs)
    if out_path is not None:
        try:
            write_run(out_path, model, spec, data_spec, metrics, config)
        except ResultKept:  # the result is complete, kept where the message says: the checkpoint is not needed
            if ckpt is not None:
                ckpt.unlink(missing_ok=True)
            raise
        if ckpt is not None:  # the run is complete: its checkpoint is no longer needed
            ckpt.unlink(missing_ok=True)
    return RunResult(model=model, test=test_eval, history=history, metrics=metrics, out=out_path, val=val_eval)


def train(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    test_data: Dataset | DataLoader | None = None,
    *,
    val_data: Dataset | DataLoader | None = None,
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
        test_data: Evaluated at the end (and after every epoch when there is no ``val_data``).
        val_data: A validation split, evaluated after every epoch and at the end.
        config: Optimizer, schedule, epochs, seed, ...; ``config.model``/``config.data`` are ignored here.
        spec: Recorded in the checkpoint so the model can be rebuilt by name.
        out: Run directory to write (must not exist); defaults to ``config.out``; None writes nothing.
        progress: Show a progress bar per epoch.
        on_epoch: Called with each epoch's history row when it completes.
    """
    config = config or TrainConfig()
    loss = HintonLoss(alpha=0.0, label_smoothing=config.label_smoothing)
    out = out if out is not None else config.out
    with _output(out, resume=config.resume) as claimed:
        return _run("train", model, train_data, test_data, config=config, loss=loss, teacher=None, spec=spec, out=claimed, progress=progress,
                    extra_metrics={}, on_epoch=on_epoch, val_data=val_data)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset | DataLoader,
    test_data: Dataset | DataLoader | None = None,
    *,
    val_data: Dataset | DataLoader | None = None,
    config: DistillConfig | None = None,
    student_spec: ModelSpec | None = None,
    teacher_name: str | None = None,
    teacher_input: Normalization | None = None,
    out: str | Path | Claim | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> RunResult:
    """Distill ``teacher`` into ``student`` with the loss ``config.loss`` names (Hinton's by default).

    The teacher is frozen (eval mode, no gradients) and sees its inputs normalized as it was
    trained (``teacher_input``, or ``config.teacher_mean``/``teacher_std``, which win). Its test
    accuracy is measured and reported *before* training: a teacher near chance stops the run with
    the likely cause (``config.sanity_checks``). Without augmentation its logits over
    ``train_data`` are computed once and cached (``config.cache``); with augmentation it runs on
    every batch.

    Args:
        student: The model to train, in place.
        teacher: A trained classifier with the same number of classes.
        train_data: An :class:`ArrayDataset` (cacheable), any ``Dataset`` of ``(x, y)`` or a ``DataLoader``.
        test_data: Evaluated at the end (and after every epoch when there is no ``val_data``); the teacher is scored on it once.
        val_data: A validation split: the teacher is checked on it before training and the student
            evaluated on it after every epoch, so choices made from those numbers never see the test split.
        config: α, T, optimizer, schedule, epochs, seed, cache mode.
        student_spec: Recorded in the checkpoint so the student can be rebuilt by name.
        teacher_name: Recorded in ``metrics.json``.
        teacher_input: The teacher's own input normalization when it differs from the data's
            (:func:`kdedge.resolve_teacher` reads it from a kdedge checkpoint or ONNX metadata).
        out: Run directory to write (must not exist); defaults to ``config.out``; None writes nothing.
        progress: Show a progress bar per epoch.
        on_epoch: Called with each epoch's history row when it completes.
        extra_metrics: Written into ``metrics.json`` beside the run's own keys (how :func:`kdedge.prune` records its pruning).
    """
    config = config or DistillConfig()
    out = out if out is not None else config.out
    with _output(out, resume=config.resume) as claimed:  # claimed before the teacher is scored: a taken --out fails at once
        return _distill(student, teacher, train_data, test_data, val_data=val_data, config=config, student_spec=student_spec,
                        teacher_name=teacher_name, teacher_input=teacher_input, out=claimed, progress=progress, on_epoch=on_epoch,
                        extra_metrics=extra_metrics or {})


def _distill(student: nn.Module, teacher: nn.Module, train_data: Dataset | DataLoader, test_data: Dataset | DataLoader | None, *,
             val_data: Dataset | DataLoader | None, config: DistillConfig, student_spec: ModelSpec | None, teacher_name: str | None,
             teacher_input: Normalization | None, out: Claim | Path | None, progress: bool, on_epoch: Callable[[dict], None] | None,
             extra_metrics: dict[str, Any]) -> RunResult:
    device = resolve_device(config.device)
    data_spec = spec_of(train_data)
    input_map = teacher_input_map(config, teacher_input, data_spec)
    with FrozenTeacher(teacher, device=device, channels_last=config.channels_last, input_map=input_map) as frozen:
        checked = _teacher_before_training(frozen, val_data if val_data is not None else test_data, device=device, config=config, progress=progress,
                                           data_spec=data_spec, split="validation" if val_data is not None else "test")
        teacher_val = checked if val_data is not None else None
        teacher_test = checked if val_data is None else (evaluate(frozen.module, test_data, device=device) if test_data is not None else None)
        teacher_info = {
            "name": teacher_name or type(teacher).__name__,
            "sha256": frozen.fingerprint(),
            "input_map": {"a": list(input_map.a), "b": list(input_map.b)} if input_map else None,
            "test": teacher_test.to_dict() if teacher_test else None,
            **({"val": teacher_val.to_dict()} if teacher_val else {}),
        } | {k: v for k, v in model_summary(frozen.model, None, data_spec).items() if k != "name"}
        loss = make_loss(config)
        result = _run("distill", student, train_data, test_data, config=config, loss=loss, teacher=frozen, spec=student_spec, out=out, progress=progress,
                      extra_metrics=extra_metrics | {"teacher": teacher_info}, on_epoch=on_epoch, val_data=val_data)
        result.teacher_test, result.teacher_val = teacher_test, teacher_val
        return result


def _teacher_before_training(frozen: FrozenTeacher, test: Dataset | DataLoader | None, *, device: torch.device, config: DistillConfig,
                             progress: bool, data_spec: DatasetSpec | None, split: str = "test") -> Evaluation | None:
    """The teacher's accuracy on ``test`` (the validation split when there is one), reported before any training is paid for; near chance is an error."""
    if test is None:
        return None
    start = time.perf_counter()
    ev = evaluate(frozen.module, test, device=device)
    check = ChanceCheck.of(ev)
    log = Progress(progress and dist_.context().is_main)
    log.line(f"teacher: {split} accuracy {ev.accuracy:.4f} on {ev.num_samples} images, balanced {check.balanced_accuracy:.4f} "
             f"(chance {check.chance:.4f}; {time.perf_counter() - start:.1f} s)")
    # Near chance: within 3 standard errors, or 10 % of the way from chance to a perfect score.
    if config.sanity_checks and ev.num_samples >= 100 and check.at_chance(slack=0.1):
        fed = f"(pixel·{data_spec.scale:.4g} − {_fmt(data_spec.mean)}) / {_fmt(data_spec.std)}" if data_spec is not None else "kdedge's normalized inputs"
        raise ConfigError(
            f"the teacher scores {check.balanced_accuracy:.4f} balanced accuracy on the {split} set, near chance ({check.chance:.4f} for "
            f"{check.classes} classes), before any training. Likely cause: it was trained on other inputs than {fed}"
            f"{' after its input map' if frozen.input_map else ''} — declare its normalization with --teacher-mean/--teacher-std "
            "(e.g. 0 and 1 for pixels/255) — or on another label order or data (--no-sanity-checks distills anyway)"
        )
    return ev


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _check_resume(config: _RunConfig) -> None:
    if config.resume and config.out is None:
        raise ConfigError(RESUME_NEEDS_OUT)


def run_train(config: TrainConfig, *, progress: bool = True, on_epoch: Callable[[dict], None] | None = None, trust_code: bool = False) -> RunResult:
    """``kdedge train``: resolve data and model from ``config``, train, write the run directory.

    Launched by ``torchrun`` with several processes, it joins their process group and trains
    with DistributedDataParallel; only rank 0 writes the run directory. ``trust_code`` lets a
    checkpoint passed as ``config.model`` run the factory code it names (see :func:`load_checkpoint`).
    """
    _check_resume(config)
    dist_.init_from_env(config.device)
    try:
        with _output(config.out, resume=config.resume, kind="train") as out:  # claimed before any data is read
            data = load_data_for(config)
            model, spec = resolve_student(config.model, data.spec, config.seed, trust_code=trust_code)
            return train(model, data.train, data.test, val_data=data.val, config=config, spec=spec, out=out, progress=progress, on_epoch=on_epoch)
    finally:
        dist_.shutdown()


def run_distill(config: DistillConfig, *, progress: bool = True, on_epoch: Callable[[dict], None] | None = None, trust_code: bool = False) -> RunResult:
    """``kdedge distill``: resolve data, teacher and student from ``config``, distill, write the run.

    Under ``torchrun`` it runs distributed, like :func:`run_train`. ``trust_code`` lets teacher and
    student checkpoints run the factory code they name (see :func:`load_checkpoint`).
    """
    _check_resume(config)
    dist_.init_from_env(config.device)
    try:
        with _output(config.out, resume=config.resume, kind="distill") as out:  # claimed before any data is read
            data = load_data_for(config)
            teacher = resolve_teacher(config.teacher, data.spec, weights=config.teacher_weights, trust_code=trust_code)
            student, spec = resolve_student(config.student, data.spec, config.seed, weights=config.student_weights, flops_budget=config.flops_budget,
                                            trust_code=trust_code)
            return distill(student, teacher.model, data.train, data.test, val_data=data.val, config=config, student_spec=spec, teacher_name=teacher.name,
                           teacher_input=teacher.input, out=out, progress=progress, on_epoch=on_epoch)
    finally:
        dist_.shutdown()
