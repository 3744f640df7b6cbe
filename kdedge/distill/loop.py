"""The training loop: one plain function for supervised training and distillation.

:func:`fit` reads top to bottom: set up (device, seeds, teacher logits, hooks, optimizer), restore a
checkpoint, wrap the student for DDP, then per epoch train, evaluate, check for divergence,
checkpoint and report. Each of those is a small function below.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import kdedge.distributed as dist_
from kdedge._modes import evaluating
from kdedge.config import _RunConfig
from kdedge.data.spec import ArrayDataset, ImageDataset
from kdedge.distill.augment import apply_views, augment_batch
from kdedge.distill.checkpoint import RESUMABLE_KEYS, RETUNABLE_KEYS, config_differences, load_state, save_state
from kdedge.distill.features import FeatureHooks
from kdedge.distill.losses import DistillLoss
from kdedge.distill.teacher import FrozenTeacher, TeacherLogits, teacher_logits
from kdedge.distill.views import TeacherViews, ViewRecipe, teacher_views
from kdedge.errors import BackendUnavailable, ConfigError, TrainingDiverged
from kdedge.metrics import ChanceCheck, Evaluation, agreement, evaluate
from kdedge.models.qat import QATModel
from kdedge.progress import Progress

__all__ = ["STALL_EPOCHS", "STALL_MIN_STEPS", "chance_check", "divergence", "fit", "make_optimizer", "resolve_device"]


def resolve_device(name: str, ctx: dist_.DistContext | None = None) -> torch.device:
    """The run's device for ``--device`` ``auto``, ``cpu`` or ``cuda``.

    A CUDA device is always indexed: under DDP each process owns ``cuda:LOCAL_RANK`` (what
    :func:`kdedge.distributed.init_from_env` made current), otherwise the current GPU. A bare
    ``cuda`` would make every rank name GPU 0 in ``device_ids`` while its weights live elsewhere.
    """
    ctx = ctx if ctx is not None else dist_.context()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto")
    if name == "cuda":
        return torch.device("cuda", ctx.local_rank if ctx.enabled else torch.cuda.current_device())
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


def _batches(
    data: Dataset | DataLoader, batch_size: int, generator: torch.Generator, device: torch.device, ctx: dist_.DistContext, epoch: int
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled ``(index, x, y)``; ``index`` is None when samples are not addressable.

    Distributed, every rank draws the same order and takes its slice of each global batch.
    """
    if isinstance(data, ImageDataset):
        order = torch.randperm(len(data), generator=generator)
        index_batches = (dist_.shard(order[start : start + batch_size], ctx, pad_from=order) for start in range(0, len(data), batch_size))
        yield from data.batches(index_batches, device=device)  # an image folder decodes in worker processes
        return
    yield from ((None, x.to(device), torch.as_tensor(y).to(device)) for x, y in _loader(data, batch_size, generator, ctx, epoch))


def _loader(data: Dataset | DataLoader, batch_size: int, generator: torch.Generator, ctx: dist_.DistContext, epoch: int) -> DataLoader:
    if isinstance(data, DataLoader):
        sampler = getattr(data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a user's DistributedSampler
        return data
    if ctx.enabled:
        from torch.utils.data.distributed import DistributedSampler

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))  # same on every rank
        sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        return DataLoader(data, batch_size=max(1, batch_size // ctx.world_size), sampler=sampler)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)


def _num_batches(data: Dataset | DataLoader, batch_size: int, ctx: dist_.DistContext) -> int:
    if isinstance(data, DataLoader):
        return len(data)
    if ctx.enabled and not isinstance(data, ImageDataset):
        per_rank = math.ceil(len(data) / ctx.world_size)  # type: ignore[arg-type]
        return math.ceil(per_rank / max(1, batch_size // ctx.world_size))
    return math.ceil(len(data) / batch_size)  # type: ignore[arg-type]


def _rank_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + 7919 * (rank + 1)) % (2**63 - 1)


@dataclass
class _Run:
    """What one call of :func:`fit` trains with; built by :func:`_setup`."""

    config: _RunConfig
    model: nn.Module
    train: Dataset | DataLoader
    loss: DistillLoss
    teacher: FrozenTeacher | None
    device: torch.device
    ctx: dist_.DistContext
    generator: torch.Generator  # shuffling: identical on every rank
    aug_generator: torch.Generator
    steps: int
    cached: TeacherLogits | None  # the teacher's logits over `train`, when they can be cached
    views: TeacherViews | None  # the teacher's outputs on K stored augmented views per image (--views)
    hooks: list[FeatureHooks]  # student and teacher feature hooks (feature losses)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    extra: list[nn.Parameter]  # trainable loss parameters (the FitNets regressor)
    train_model: nn.Module = field(init=False)  # the student, DDP-wrapped when distributed (see _wrap_ddp)
    num_classes: int = 0  # seen in the logits

    def __post_init__(self) -> None:
        self.train_model = self.model

    @property
    def needs_features(self) -> bool:
        return _needs_features(self.loss)

    @property
    def cache_seconds(self) -> float:
        return sum(c.seconds for c in (self.cached, self.views) if c is not None)

    @property
    def cache_runtime(self) -> str:
        """The runtime that scored the cache ("" for a disk hit or no cache): a resume re-scores a memory cache in the same one."""
        return next((c.runtime for c in (self.cached, self.views) if c is not None), "")

    @property
    def cache_key(self) -> str | None:
        """What the soft targets were read from (a checkpoint must resume with the same)."""
        return next((c.key for c in (self.cached, self.views) if c is not None), None)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.contiguous_format

    def autocast(self) -> AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        return torch.autocast(device_type=self.device.type, dtype=dtype) if dtype is not None else nullcontext()


def fit(
    model: nn.Module,
    train: Dataset | DataLoader,
    *,
    config: _RunConfig,
    loss: DistillLoss,
    teacher: FrozenTeacher | None = None,
    test: Dataset | DataLoader | None = None,
    val: Dataset | DataLoader | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> tuple[list[dict], TeacherLogits | TeacherViews | None]:
    """Train ``model`` in place for ``config.epochs`` epochs.

    With ``loss.alpha > 0`` the teacher supplies soft targets. When samples are addressable (an
    :class:`~kdedge.data.ImageDataset`) they come from a cache: with ``config.views`` = K from K stored
    augmented views per image (the student trains on one of them each epoch, see
    :mod:`kdedge.distill.views`), else, for un-augmented inputs, from the logit cache. Otherwise
    the teacher runs on each batch.

    Under ``torchrun`` (a default process group initialized, see
    :func:`kdedge.distributed.init_from_env`) the student is wrapped in
    DistributedDataParallel, each rank trains on its slice of every global batch, the logit cache
    is computed in shards and gathered, and metrics are summed over ranks. The frozen teacher is
    never wrapped.

    Args:
        test: Evaluated after every epoch when there is no ``val``.
        val: A validation split: evaluated after every epoch instead of ``test`` (rows get
            ``val_accuracy``), so the test split is left for the final report.
        checkpoint: File to write the training state to after every epoch (main rank only).
        resume: Continue from ``checkpoint`` (which must exist and match ``config``).
        progress: Report each epoch: a bar on a terminal, one plain line per epoch elsewhere.
        on_epoch: Called with each epoch's history row as soon as it is complete (for logs).

    Returns:
        The per-epoch history and the teacher cache used: logits, stored views, or None.

    Raises:
        TrainingDiverged: The loss became non-finite or accuracy fell to chance after an epoch
            (unless ``config.sanity_checks`` is off).
    """
    if loss.needs_teacher and teacher is None:
        raise ValueError("a loss with alpha > 0 needs a teacher")
    if resume and checkpoint is None:
        raise ConfigError("--resume needs the checkpoint of the run to continue; pass the same --out as the killed run")
    ctx = dist_.context()
    device = resolve_device(config.device, ctx)
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (it trains with a gradient scaler); this run is on {device.type} — use bf16 or fp32")
    if config.threads:
        torch.set_num_threads(config.threads)
    state = _resume_state(checkpoint, config) if resume else None  # type: ignore[arg-type]
    watched, split = (val, "val") if val is not None else (test, "test")  # what every epoch is scored on
    with Progress(progress and ctx.is_main) as bar:
        run = _setup(model, train, config=config, loss=loss, teacher=teacher, device=device, ctx=ctx, cache_dir=cache_dir, use_cache=use_cache, bar=bar,
                     extra_splits=(watched,) if watched is not None else (), runtime=(state or {}).get("cache_runtime") or None)
        try:
            history = _restore(run, state) if state is not None else []
            _wrap_ddp(run)
            checks: list[ChanceCheck | None] = []  # one per epoch trained in this process: the evidence of a stall (a resume starts afresh)
            taught = _logged_teacher_classes(config, ctx, teacher, watched, device)
            for epoch in range(len(history) + 1, config.epochs + 1):  # the history holds one row per finished epoch
                task = bar.add(f"epoch {epoch}/{config.epochs}", run.steps)
                if isinstance(model, QATModel):  # its own schedule: BatchNorm and observer freezes
                    model.start_epoch(epoch, config.epochs)
                row = _train_epoch(run, epoch, bar, task)
                ev = evaluate(model, watched, device=device) if watched is not None else None
                if ev is not None:
                    row.update({f"{split}_accuracy": ev.accuracy, f"{split}_macro_f1": ev.macro_f1})
                if taught is not None:
                    row[f"{split}_teacher_agreement"] = agreement(model, taught, watched, device=device)
                bar.finish(task, _epoch_line(row, config.epochs))
                history.append(row)
                checks.append(chance_check(row, ev, num_classes=_num_classes(run, watched)))
                _stop_if_diverged(run, row, checks, split={"val": "validation"}.get(split, split) if ev is not None else "train")
                if checkpoint is not None:
                    _save_checkpoint(run, checkpoint, epoch, history)
                if on_epoch is not None:
                    on_epoch(row)
        finally:
            for h in run.hooks:
                h.remove()
            if config.channels_last:  # the caller gets its model back in the usual layout: safetensors' save_file refuses
                model.to(memory_format=torch.contiguous_format)  # channels-last weights (non-contiguous), and exporters expect NCHW
    return history, run.cached if run.cached is not None else run.views


def _logged_teacher_classes(config: _RunConfig, ctx: dist_.DistContext, teacher: FrozenTeacher | None, data: Dataset | DataLoader | None,
                            device: torch.device) -> torch.Tensor | None:
    """The teacher's predicted class for every sample of the scored split ``(N,)``, in order (its own input normalization applied),
    computed once per run for the TensorBoard log's teacher agreement: only on the main rank of a run with ``log_dir``, and a
    teacher and an addressable split to score; None otherwise."""
    if not (getattr(config, "log_dir", None) and ctx.is_main and teacher is not None and isinstance(data, ImageDataset)):
        return None
    with torch.inference_mode():
        return torch.cat([teacher(x).argmax(1).cpu() for x, _y in data.chunks(1000, device=device)])


def _stop_if_diverged(run: _Run, row: dict[str, Any], checks: list[ChanceCheck | None], *, split: str) -> None:
    """Raise :class:`TrainingDiverged` with the fix when this epoch's numbers say the run diverged (unless ``sanity_checks`` is off)."""
    problem = divergence(row, checks, steps=run.steps * len(checks), split=split) if run.config.sanity_checks else None
    if problem:
        raise TrainingDiverged(f"{problem}; {_divergence_fix(run.config)}")


def _resume_state(checkpoint: str | Path, config: _RunConfig) -> dict[str, Any]:
    state = load_state(checkpoint)
    changed = config_differences(state["config"], config.to_dict(), defaults=type(config)().to_dict(), resumable=RESUMABLE_KEYS | RETUNABLE_KEYS)
    if changed:
        raise ConfigError(f"--resume: the config differs from the checkpoint's ({'; '.join(changed)}); resume with the original settings")
    return state


def _needs_features(loss: DistillLoss) -> bool:
    return bool(getattr(loss, "needs_features", False))


def _setup(model: nn.Module, train: Dataset | DataLoader, *, config: _RunConfig, loss: DistillLoss, teacher: FrozenTeacher | None, device: torch.device,
           ctx: dist_.DistContext, cache_dir: str | Path | None, use_cache: bool, bar: Progress, extra_splits: tuple = (),
           runtime: str | None = None) -> _Run:
    """Seeds, data placement, teacher logits, feature hooks, optimizer and schedule — in the order the RNG streams expect.

    ``runtime`` forces the runtime of the teacher's cache pass (a resumed run's checkpoint names the one that scored it).
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    # One process augments from the shuffling generator (as the shipped teacher was trained);
    # under DDP sub-batch sizes can differ, so each rank augments from its own stream.
    aug_generator = torch.Generator().manual_seed(_rank_seed(config.seed, ctx.rank)) if ctx.enabled else generator
    if ctx.enabled:
        torch.manual_seed(_rank_seed(config.seed, ctx.rank))  # e.g. dropout masks differ per rank
    _prepare([s for s in (train, *extra_splits) if isinstance(s, ImageDataset)], ctx, bar)
    if isinstance(train, ArrayDataset) and device.type == "cuda" and _fits_on(train, device):
        train = train.to(device)  # a 60k-image set is 47 MB: keep it on the GPU
    cached, views = _teacher_cache(train, config=config, loss=loss, teacher=teacher, cache_dir=cache_dir, use_cache=use_cache, bar=bar,
                                   runtime=runtime or getattr(config, "teacher_runtime", "auto"))
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    hooks = _feature_hooks(model, teacher, loss, train, device) if _needs_features(loss) else []
    optimizer = make_optimizer(model, config)
    extra = [p for p in getattr(loss, "parameters", lambda: [])() if p.requires_grad]
    if extra:
        optimizer.add_param_group({"params": extra, "weight_decay": config.weight_decay})
    steps = _num_batches(train, config.batch_size, ctx)
    return _Run(config=config, model=model, train=train, loss=loss, teacher=teacher, device=device, ctx=ctx, generator=generator,
                aug_generator=aug_generator, steps=steps, cached=cached, views=views, hooks=hooks, optimizer=optimizer,
                scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps)),
                scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"), extra=extra)


def _teacher_cache(train: Dataset | DataLoader, *, config: _RunConfig, loss: DistillLoss, teacher: FrozenTeacher | None, cache_dir: str | Path | None,
                   use_cache: bool, bar: Progress, runtime: str) -> tuple[TeacherLogits | None, TeacherViews | None]:
    """The cached soft targets: K stored augmented views (``--views``), the logits of the un-augmented images, or neither.

    Neither when the loss needs the teacher's features (they are not cached), caching is off, the
    samples are not addressable (a plain Dataset), or the inputs are augmented without stored views.
    """
    views = int(getattr(config, "views", 0))
    if not (loss.needs_teacher and use_cache and not _needs_features(loss)):
        return None, None
    if not isinstance(train, ImageDataset):
        if views:
            raise ConfigError("--views needs a kdedge dataset (an ImageDataset: arrays or an image folder) so each image's stored views "
                              "can be found by index; load the data with kdedge.load_dataset, or drop --views")
        return None, None
    if views:
        recipe = ViewRecipe(views=views, erasing=config.random_erasing, topk=int(getattr(config, "view_topk", 0)))
        directory = Path(cache_dir) / "views" if cache_dir is not None else None
        return None, teacher_views(teacher, train, recipe, cache_dir=directory, runtime=runtime, progress=bar)  # type: ignore[arg-type]
    if config.augment:  # the logit cache holds the un-augmented images' logits: the teacher runs per batch
        return None, None
    return teacher_logits(teacher, train, cache_dir=cache_dir, runtime=runtime, progress=bar), None  # type: ignore[arg-type]


def _prepare(splits: list[ImageDataset], ctx: dist_.DistContext, bar: Progress) -> None:
    """Let each split get ready for many passes (an image folder decodes its images once into the cache).

    Under DDP the main rank prepares first and the others then find its files, rather than every
    rank decoding the whole set into a file of its own at once.
    """
    if ctx.enabled and not ctx.is_main:
        dist_.all_true(True)  # wait for the main rank
    for split in splits:
        split.prepare(bar)
    if ctx.enabled and ctx.is_main:
        dist_.all_true(True)


def _fits_on(data: ArrayDataset, device: torch.device, share: float = 0.25) -> bool:
    """Whether the stored pixels take at most ``share`` of the GPU's free memory (the rest is the model's)."""
    free, _total = torch.cuda.mem_get_info(device)
    return data.nbytes <= share * free


def _feature_hooks(model: nn.Module, teacher: FrozenTeacher | None, loss: DistillLoss, train: Dataset | DataLoader, device: torch.device) -> list[FeatureHooks]:
    """Hook the two named layers and size the feature term from one probe batch (no RNG drawn).

    Features come from forward hooks; the teacher runs on every batch (no logit cache).
    """
    hooks = [FeatureHooks(model, [loss.student_layer]), FeatureHooks(teacher.model, [loss.teacher_layer])]  # type: ignore[attr-defined,union-attr]
    probe = next(_batches(train, 2, torch.Generator().manual_seed(0), device, dist_.DistContext(), 0))[1]
    with evaluating(model), torch.no_grad():
        model(probe)
        teacher(probe)  # type: ignore[misc]
    loss.term.build(hooks[0].outputs[loss.student_layer].shape, hooks[1].outputs[loss.teacher_layer].shape)  # type: ignore[attr-defined]
    loss.to(device)  # type: ignore[attr-defined]
    return hooks


def _restore(run: _Run, state: dict[str, Any]) -> list[dict]:
    """Load a checkpoint's training state into ``run``; returns the history so far."""
    if state.get("cache_key") != run.cache_key:
        raise ConfigError(
            "--resume: the teacher's cached outputs differ from the checkpoint's (another teacher, other training data, or other "
            "--views/--view-topk); resume with the original teacher, data and settings"
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    saved_lr = float(state["config"].get("lr", run.config.lr))
    if saved_lr != run.config.lr:  # --lr changed on resume (the way on after a divergence): the schedule goes on at the new peak
        factor = run.config.lr / saved_lr
        run.scheduler.base_lrs = [lr * factor for lr in run.scheduler.base_lrs]
        for group in run.optimizer.param_groups:
            group["lr"] *= factor
            group["initial_lr"] = group.get("initial_lr", saved_lr) * factor
    run.scaler.load_state_dict(state["scaler"])
    if isinstance(run.loss, nn.Module):
        run.loss.load_state_dict(state["loss"])
    _set_rng(state["rng"], run.generator, run.aug_generator, run.ctx, run.device)
    return list(state["history"])


def _wrap_ddp(run: _Run) -> None:
    if not run.ctx.enabled:
        return
    from torch.nn.parallel import DistributedDataParallel

    # Only the student is wrapped; DDP broadcasts rank 0's weights here.
    run.train_model = DistributedDataParallel(run.model, device_ids=ddp_device_ids(run.device))
    for p in run.extra:
        torch.distributed.broadcast(p.data, 0)


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """``device_ids`` for DistributedDataParallel: this process's one GPU, or None on the CPU."""
    return [device.index] if device.type == "cuda" else None


def _train_epoch(run: _Run, epoch: int, bar: Progress, task_id: int) -> dict[str, Any]:
    """One pass over the training data; returns the epoch's history row (without test metrics)."""
    config = run.config
    run.model.train()
    start = time.perf_counter()
    teacher_time = 0.0
    sums = torch.zeros(6, dtype=torch.float64, device=run.device)  # total, task, kd, correct, feature, samples
    for i, (idx, x, y) in enumerate(_batches(run.train, config.batch_size, run.generator, run.device, run.ctx, epoch)):
        teacher_time += _train_step(run, epoch - 1 + i / run.steps, idx, x, y, sums)
        if bar.live and (i % 20 == 0 or i == run.steps - 1):  # .tolist() syncs the device: only for a bar someone sees
            s = (sums / sums[5].clamp_min(1)).tolist()
            bar.update(task_id, stats=f"loss {s[0]:.4f} acc {s[3]:.3f}")
        bar.update(task_id, advance=1)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    first = run.cache_seconds if epoch == 1 else 0.0
    dist_.all_reduce_sum(sums)
    total, task, kd, correct, feature_loss, _samples = (sums / sums[5].clamp_min(1)).tolist()
    row = {
        "epoch": epoch,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": total,
        "train_task_loss": task,
        "train_kd_loss": kd,
        **({"train_feature_loss": feature_loss} if run.needs_features else {}),
        "train_accuracy": correct,
        "train_samples": int(sums[5].item()),
        "seconds": time.perf_counter() - start + first,
        "teacher_seconds": teacher_time + first,
    }
    return row


def _train_step(run: _Run, progress: float, idx: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> float:
    """One optimizer step on a batch; adds its losses and hits to ``sums``. Returns seconds spent in the teacher."""
    loss, config = run.loss, run.config
    t_logits, teacher_time = None, 0.0
    if run.views is not None and idx is not None:  # one stored view per image, rendered as the teacher saw it
        rows, t_logits = run.views.draw(idx, run.aug_generator)
        x, t_logits = apply_views(x, rows, pad=run.views.recipe.pad), t_logits.to(run.device, non_blocking=True)
    elif config.augment or getattr(config, "views", 0):  # --views implies augmentation, also for a loss that reads no teacher
        x = augment_batch(x, run.aug_generator, erasing=config.random_erasing)
    x = x.contiguous(memory_format=run.memory_format)
    if loss.needs_teacher and t_logits is None:
        if run.cached is not None and idx is not None:
            t_logits = run.cached[idx].to(run.device, non_blocking=True)
        else:
            t0 = time.perf_counter()
            t_logits = run.teacher(x)  # type: ignore[misc]
            teacher_time = time.perf_counter() - t0
    if hasattr(loss, "set_progress"):
        loss.set_progress(progress)  # e.g. DKD's warm-up, in epochs
    with run.autocast():
        logits = run.train_model(x)
    logits = logits.float()
    if run.needs_features:
        # clone(): the teacher ran under inference_mode; its feature must be a normal tensor for autograd.
        t_feat = run.hooks[1].outputs[loss.teacher_layer].clone()  # type: ignore[attr-defined]
        s_feat = run.hooks[0].outputs[loss.student_layer].float()  # type: ignore[attr-defined]
        parts = loss(logits, y, t_logits, student_feature=s_feat, teacher_feature=t_feat)  # type: ignore[call-arg]
    else:
        parts = loss(logits, y, t_logits)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(parts.total).backward()
    if run.ctx.enabled:
        for p in run.extra:  # parameters outside the DDP module: average their gradients by hand
            if p.grad is not None:
                dist_.all_reduce_sum(p.grad).div_(run.ctx.world_size)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    n = y.shape[0]
    with torch.no_grad():
        feature = parts.feature if parts.feature is not None else torch.zeros((), device=run.device)
        sums += torch.stack([
            parts.total.detach() * n, parts.task * n, parts.kd * n, (logits.argmax(1) == y).sum(), feature * n,
            torch.tensor(float(n), device=run.device),
        ]).double()
    run.num_classes = int(logits.shape[1])
    return teacher_time


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    test = "".join(f"  {split} acc {row[f'{split}_accuracy']:.4f}" for split in ("val", "test") if f"{split}_accuracy" in row)
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}{test}  "
            f"lr {row['lr']:.3g}  {row['seconds']:.1f} s")


def _save_checkpoint(run: _Run, checkpoint: str | Path, epoch: int, history: list[dict]) -> None:
    rng = _get_rng(run.generator, run.aug_generator, run.device)  # a collective: every rank takes part
    if run.ctx.is_main:
        save_state(checkpoint, {
            "epoch": epoch, "config": run.config.to_dict(), "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "loss": run.loss.state_dict() if isinstance(run.loss, nn.Module) else {}, "rng": rng, "history": history,
            "cache_key": run.cache_key, "cache_runtime": run.cache_runtime,
        })


def _num_classes(run: _Run, test: Dataset | DataLoader | None) -> int:
    spec = getattr(test if not isinstance(test, DataLoader) else test.dataset, "spec", None) or getattr(run.train, "spec", None)
    return int(spec.num_classes) if spec is not None else run.num_classes


#: A run is called stalled at chance only on evidence: at least this many optimizer steps in all ...
STALL_MIN_STEPS = 200
#: ... and this many epochs in a row scored at chance, the last no better than the first of them by a
#: standard error (a run that is still climbing out of chance is left to climb).
STALL_EPOCHS = 3


def chance_check(row: dict[str, Any], test: Evaluation | None, *, num_classes: int, min_samples: int = 100) -> ChanceCheck | None:
    """How an epoch compares with guessing: the test (or validation) *balanced* accuracy, else the training accuracy against ``1/K``.

    None when fewer than ``min_samples`` samples were scored: they cannot tell chance from a slow start.
    """
    if test is not None:
        return ChanceCheck.of(test) if test.num_samples >= min_samples else None
    n, chance = row.get("train_samples", 0), 1.0 / max(num_classes, 1)
    if num_classes < 2 or n < min_samples:
        return None
    return ChanceCheck(row["train_accuracy"], chance, math.sqrt(chance * (1 - chance) / n), num_classes)


def divergence(row: dict[str, Any], checks: list[ChanceCheck | None], *, steps: int, min_steps: int = STALL_MIN_STEPS,
               epochs: int = STALL_EPOCHS, split: str = "test") -> str | None:
    """Why the numbers after an epoch say the run diverged, or None.

    Diverged: a non-finite training loss (at once: nothing recovers from it), or stalled at chance,
    which needs evidence — at least ``min_steps`` optimizer steps so far, and the last ``epochs``
    epochs all within three standard errors of chance (:meth:`ChanceCheck.at_chance`) with the
    last no better than the first of them by one standard error. A run still improving is never
    stopped, however close to chance it is.

    Args:
        row: This epoch's history row.
        checks: :func:`chance_check` of every epoch so far, this one last (None where too few samples were scored).
        steps: Optimizer steps taken so far.
        split: The split the checks were scored on, for the message.
    """
    if not math.isfinite(row["train_loss"]):
        return f"training diverged at epoch {row['epoch']}: the training loss is {row['train_loss']}"
    recent = checks[-epochs:]
    if steps < min_steps or len(recent) < epochs or any(c is None or not c.at_chance() for c in recent):
        return None
    first, last = recent[0], recent[-1]
    assert first is not None and last is not None
    if last.balanced_accuracy > first.balanced_accuracy + first.standard_error:
        return None  # still climbing
    what = f"balanced {split} accuracy" if split != "train" else "training accuracy"
    return (f"training stalled at chance: {what} {last.balanced_accuracy:.4f} over {last.classes} classes (chance {last.chance:.4f}) "
            f"for {epochs} epochs in a row, {steps:,} steps in all (epoch {row['epoch']}), training loss {row['train_loss']:.4g}")


def _divergence_fix(config: _RunConfig) -> str:
    return (f"the step size is the likely cause (optimizer {config.optimizer}, lr {config.lr:g}): lower --lr (e.g. {config.lr / 10:g}), "
            "try --optimizer adamw --lr 1e-3, or add --warmup-epochs 1 (--no-sanity-checks trains on regardless)")


def _get_rng(generator: torch.Generator, aug_generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """RNG states: the shared shuffling generator, and per rank (gathered) the global and augmentation streams."""
    def gathered(t: torch.Tensor) -> torch.Tensor:
        return dist_.all_gather_rows(t[None])  # (world, state bytes); one row without DDP

    rng = {"shuffle": generator.get_state(), "torch": gathered(torch.get_rng_state()), "augment": gathered(aug_generator.get_state())}
    if device.type == "cuda":
        rng["cuda"] = gathered(torch.cuda.get_rng_state(device))
    return rng


def _set_rng(rng: dict[str, torch.Tensor], generator: torch.Generator, aug_generator: torch.Generator, ctx: dist_.DistContext, device: torch.device) -> None:
    if rng["torch"].shape[0] != ctx.world_size:
        raise ConfigError(
            f"--resume: the checkpoint was written by {rng['torch'].shape[0]} process(es), this run has {ctx.world_size}; "
            "resume with the same --nproc_per_node"
        )
    generator.set_state(rng["shuffle"])
    torch.set_rng_state(rng["torch"][ctx.rank])
    if aug_generator is not generator:
        aug_generator.set_state(rng["augment"][ctx.rank])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"][ctx.rank], device)
