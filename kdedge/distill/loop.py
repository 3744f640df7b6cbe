"""The training loop: one plain function for supervised training and distillation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdedge.config import _RunConfig
from kdedge.data.spec import ArrayDataset
from kdedge.distill.augment import augment_batch
from kdedge.distill.features import FeatureHooks
from kdedge.distill.losses import DistillLoss
from kdedge.distill.metrics import evaluate
from kdedge.distill.teacher import FrozenTeacher, TeacherLogits, teacher_logits

__all__ = ["fit", "resolve_device", "make_optimizer"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from kdedge.errors import BackendUnavailable

        raise BackendUnavailable("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto")
    return torch.device(name)


def make_optimizer(model: nn.Module, config: _RunConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and normalization parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def _lr_lambda(config: _RunConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _batches(data: Dataset | DataLoader, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled ``(index, x, y)``; ``index`` is None when samples are not addressable."""
    if isinstance(data, ArrayDataset):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            dev_idx = idx.to(data.images.device)
            yield idx, data.inputs(dev_idx, device=device), data.labels[dev_idx].to(device)
        return
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    for x, y in loader:
        yield None, x.to(device), torch.as_tensor(y).to(device)


def _num_batches(data: Dataset | DataLoader, batch_size: int) -> int:
    if isinstance(data, DataLoader):
        return len(data)
    return math.ceil(len(data) / batch_size)  # type: ignore[arg-type]


class _Progress:
    """A rich progress bar per epoch, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def add(self, description: str, total: int) -> int | None:
        return self._bar.add_task(description, total=total, stats="") if self._bar else None

    def update(self, task: int | None, advance: int = 0, stats: str | None = None) -> None:
        if self._bar is not None and task is not None:
            self._bar.update(task, advance=advance, **({"stats": stats} if stats is not None else {}))


def fit(
    model: nn.Module,
    train: Dataset | DataLoader,
    *,
    config: _RunConfig,
    loss: DistillLoss,
    teacher: FrozenTeacher | None = None,
    test: Dataset | DataLoader | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[list[dict], TeacherLogits | None]:
    """Train ``model`` in place for ``config.epochs`` epochs.

    With ``loss.alpha > 0`` the teacher supplies soft targets: from the logit cache when the
    inputs are not augmented and samples are addressable (an :class:`ArrayDataset`), else by
    running the teacher on each batch.

    ``on_epoch`` is called with each epoch's history row as soon as it is complete (for logs).

    Returns:
        The per-epoch history and the teacher-logit cache used (None when none was).
    """
    if loss.needs_teacher and teacher is None:
        raise ValueError("a loss with alpha > 0 needs a teacher")
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if isinstance(train, ArrayDataset) and device.type != "cpu":
        train = train.to(device)  # a 60k-image set is 47 MB: keep it on the GPU

    needs_features = getattr(loss, "needs_features", False)
    cached: TeacherLogits | None = None
    cache_seconds = 0.0
    if loss.needs_teacher and use_cache and not needs_features and not config.augment and isinstance(train, ArrayDataset):
        # Never for augmented inputs: the cache holds logits of the un-augmented images.
        cached = teacher_logits(teacher, train, cache_dir=cache_dir)  # type: ignore[arg-type]
        cache_seconds = cached.seconds

    model.to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    hooks: list[FeatureHooks] = []
    if needs_features:
        # Features come from forward hooks; the teacher runs on every batch (no logit cache).
        hooks = [FeatureHooks(model, [loss.student_layer]), FeatureHooks(teacher.model, [loss.teacher_layer])]  # type: ignore[attr-defined,union-attr]
        probe = next(_batches(train, 2, torch.Generator().manual_seed(0), device))[1]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(probe)
            teacher(probe)  # type: ignore[misc]
        model.train(was_training)
        loss.term.build(hooks[0].outputs[loss.student_layer].shape, hooks[1].outputs[loss.teacher_layer].shape)  # type: ignore[attr-defined]
        loss.to(device)  # type: ignore[attr-defined]
    optimizer = make_optimizer(model, config)
    extra = [p for p in getattr(loss, "parameters", lambda: [])() if p.requires_grad]  # e.g. the FitNets regressor
    if extra:
        optimizer.add_param_group({"params": extra, "weight_decay": config.weight_decay})
    steps = _num_batches(train, config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps))
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext()
    )
    history: list[dict] = []
    try:
        with _Progress(progress) as bar:
            for epoch in range(1, config.epochs + 1):
                model.train()
                task_id = bar.add(f"epoch {epoch}/{config.epochs}", steps)
                start = time.perf_counter()
                teacher_time = 0.0
                sums = torch.zeros(5, dtype=torch.float64, device=device)  # total, task, kd, correct, feature
                seen = 0
                for i, (idx, x, y) in enumerate(_batches(train, config.batch_size, generator, device)):
                    if config.augment:
                        x = augment_batch(x, generator, erasing=config.random_erasing)
                    x = x.contiguous(memory_format=memory_format)
                    t_logits = None
                    if loss.needs_teacher:
                        if cached is not None and idx is not None:
                            t_logits = cached[idx].to(device, non_blocking=True)
                        else:
                            t0 = time.perf_counter()
                            t_logits = teacher(x)  # type: ignore[misc]
                            teacher_time += time.perf_counter() - t0
                    if hasattr(loss, "set_progress"):
                        loss.set_progress(epoch - 1 + i / steps)  # e.g. DKD's warm-up
                    with autocast:
                        logits = model(x)
                    if needs_features:
                        # clone(): the teacher ran under inference_mode; its feature must be a normal tensor for autograd.
                        t_feat = hooks[1].outputs[loss.teacher_layer].clone()  # type: ignore[attr-defined]
                        parts = loss(logits, y, t_logits, student_feature=hooks[0].outputs[loss.student_layer], teacher_feature=t_feat)  # type: ignore[call-arg,attr-defined]
                    else:
                        parts = loss(logits, y, t_logits)
                    optimizer.zero_grad(set_to_none=True)
                    parts.total.backward()
                    optimizer.step()
                    scheduler.step()
                    n = y.shape[0]
                    seen += n
                    with torch.no_grad():
                        feature = parts.feature if parts.feature is not None else torch.zeros((), device=device)
                        sums += torch.stack([parts.total.detach() * n, parts.task * n, parts.kd * n, (logits.argmax(1) == y).sum(), feature * n]).double()
                    if progress and (i % 20 == 0 or i == steps - 1):
                        s = (sums / seen).tolist()
                        bar.update(task_id, advance=0, stats=f"loss {s[0]:.4f} acc {s[3]:.3f}")
                    bar.update(task_id, advance=1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start + (cache_seconds if epoch == 1 else 0.0)
                total, task, kd, correct, feature_loss = (sums / max(seen, 1)).tolist()
                row = {
                    "epoch": epoch,
                    "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": total,
                    "train_task_loss": task,
                    "train_kd_loss": kd,
                    **({"train_feature_loss": feature_loss} if needs_features else {}),
                    "train_accuracy": correct,
                    "seconds": seconds,
                    "teacher_seconds": teacher_time + (cache_seconds if epoch == 1 else 0.0),
                }
                if test is not None:
                    ev = evaluate(model, test, device=device)
                    row.update(test_accuracy=ev.accuracy, test_macro_f1=ev.macro_f1)
                history.append(row)
                if on_epoch is not None:
                    on_epoch(row)
                if progress:
                    extra = f" test acc {row['test_accuracy']:.4f}" if test is not None else ""
                    bar.update(task_id, stats=f"loss {total:.4f} acc {correct:.3f}{extra}")
    finally:
        for h in hooks:
            h.remove()
    return history, cached
