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
import kdedge.distributed as dist_
from kdedge.distill.augment import augment_batch
from kdedge.distill.checkpoint import config_differences, load_state, save_state
from kdedge.distill.features import FeatureHooks
from kdedge.distill.losses import DistillLoss
from kdedge.metrics import evaluate
from kdedge.distill.teacher import FrozenTeacher, TeacherLogits, teacher_logits
from kdedge.errors import ConfigError

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


def _batches(
    data: Dataset | DataLoader, batch_size: int, generator: torch.Generator, device: torch.device, ctx: dist_.DistContext, epoch: int
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled ``(index, x, y)``; ``index`` is None when samples are not addressable.

    Distributed, every rank draws the same order and takes its slice of each global batch.
    """
    if isinstance(data, ArrayDataset):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            idx = dist_.shard(order[start : start + batch_size], ctx, pad_from=order)
            dev_idx = idx.to(data.images.device)
            yield idx, data.inputs(dev_idx, device=device), data.labels[dev_idx].to(device)
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
    if ctx.enabled and not isinstance(data, ArrayDataset):
        per_rank = math.ceil(len(data) / ctx.world_size)  # type: ignore[arg-type]
        return math.ceil(per_rank / max(1, batch_size // ctx.world_size))
    return math.ceil(len(data) / batch_size)  # type: ignore[arg-type]


def _rank_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + 7919 * (rank + 1)) % (2**63 - 1)


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
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> tuple[list[dict], TeacherLogits | None]:
    """Train ``model`` in place for ``config.epochs`` epochs.

    With ``loss.alpha > 0`` the teacher supplies soft targets: from the logit cache when the
    inputs are not augmented and samples are addressable (an :class:`ArrayDataset`), else by
    running the teacher on each batch.

    Under ``torchrun`` (a default process group initialized, see
    :func:`kdedge.distributed.init_from_env`) the student is wrapped in
    DistributedDataParallel, each rank trains on its slice of every global batch, the logit cache
    is computed in shards and gathered, and metrics are summed over ranks. The frozen teacher is
    never wrapped.

    Args:
        checkpoint: File to write the training state to after every epoch (main rank only).
        resume: Continue from ``checkpoint`` (which must exist and match ``config``).
        on_epoch: Called with each epoch's history row as soon as it is complete (for logs).

    Returns:
        The per-epoch history and the teacher-logit cache used (None when none was).
    """
    if loss.needs_teacher and teacher is None:
        raise ValueError("a loss with alpha > 0 needs a teacher")
    if resume and checkpoint is None:
        raise ConfigError("--resume needs the checkpoint of the run to continue; pass the same --out as the killed run")
    ctx = dist_.context()
    device = resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (it trains with a gradient scaler); this run is on {device.type} — use bf16 or fp32")
    if config.threads:
        torch.set_num_threads(config.threads)
    state = load_state(checkpoint) if resume else None  # type: ignore[arg-type]
    if state is not None:
        changed = config_differences(state["config"], config.to_dict())
        if changed:
            raise ConfigError(f"--resume: the config differs from the checkpoint's ({'; '.join(changed)}); resume with the original settings")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # shuffling: identical on every rank
    # One process augments from the shuffling generator (as the shipped teacher was trained);
    # under DDP sub-batch sizes can differ, so each rank augments from its own stream.
    aug_generator = torch.Generator().manual_seed(_rank_seed(config.seed, ctx.rank)) if ctx.enabled else generator
    if ctx.enabled:
        torch.manual_seed(_rank_seed(config.seed, ctx.rank))  # e.g. dropout masks differ per rank
    if isinstance(train, ArrayDataset) and device.type != "cpu":
        train = train.to(device)  # a 60k-image set is 47 MB: keep it on the GPU

    needs_features = getattr(loss, "needs_features", False)
    cached: TeacherLogits | None = None
    cache_seconds = 0.0
    if loss.needs_teacher and use_cache and not needs_features and not config.augment and isinstance(train, ArrayDataset):
        # Never for augmented inputs: the cache holds logits of the un-augmented images.
        cached = teacher_logits(teacher, train, cache_dir=cache_dir)  # type: ignore[arg-type]
        cache_seconds = cached.seconds
    if state is not None and state.get("cache_key") != (cached.key if cached is not None else None):
        raise ConfigError(
            "--resume: the teacher logits differ from the checkpoint's (another teacher or other training data); "
            "resume with the original teacher and data"
        )

    model.to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    hooks: list[FeatureHooks] = []
    if needs_features:
        # Features come from forward hooks; the teacher runs on every batch (no logit cache).
        hooks = [FeatureHooks(model, [loss.student_layer]), FeatureHooks(teacher.model, [loss.teacher_layer])]  # type: ignore[attr-defined,union-attr]
        probe = next(_batches(train, 2, torch.Generator().manual_seed(0), device, dist_.DistContext(), 0))[1]
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
    steps = _num_batches(train, config.batch_size, ctx)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    autocast = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()

    history: list[dict] = []
    first_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if isinstance(loss, nn.Module):
            loss.load_state_dict(state["loss"])
        _set_rng(state["rng"], generator, aug_generator, ctx, device)
        history = list(state["history"])
        first_epoch = int(state["epoch"]) + 1

    train_model: nn.Module = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Only the student is wrapped; DDP broadcasts rank 0's weights here.
        train_model = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
        for p in extra:
            torch.distributed.broadcast(p.data, 0)
    show = progress and ctx.is_main
    try:
        with _Progress(show) as bar:
            for epoch in range(first_epoch, config.epochs + 1):
                model.train()
                task_id = bar.add(f"epoch {epoch}/{config.epochs}", steps)
                start = time.perf_counter()
                teacher_time = 0.0
                sums = torch.zeros(6, dtype=torch.float64, device=device)  # total, task, kd, correct, feature, samples
                for i, (idx, x, y) in enumerate(_batches(train, config.batch_size, generator, device, ctx, epoch)):
                    if config.augment:
                        x = augment_batch(x, aug_generator, erasing=config.random_erasing)
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
                        logits = train_model(x)
                    logits = logits.float()
                    if needs_features:
                        # clone(): the teacher ran under inference_mode; its feature must be a normal tensor for autograd.
                        t_feat = hooks[1].outputs[loss.teacher_layer].clone()  # type: ignore[attr-defined]
                        s_feat = hooks[0].outputs[loss.student_layer].float()  # type: ignore[attr-defined]
                        parts = loss(logits, y, t_logits, student_feature=s_feat, teacher_feature=t_feat)  # type: ignore[call-arg,attr-defined]
                    else:
                        parts = loss(logits, y, t_logits)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(parts.total).backward()
                    if ctx.enabled:
                        for p in extra:  # parameters outside the DDP module: average their gradients by hand
                            if p.grad is not None:
                                dist_.all_reduce_sum(p.grad).div_(ctx.world_size)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    n = y.shape[0]
                    with torch.no_grad():
                        feature = parts.feature if parts.feature is not None else torch.zeros((), device=device)
                        sums += torch.stack([
                            parts.total.detach() * n, parts.task * n, parts.kd * n, (logits.argmax(1) == y).sum(), feature * n,
                            torch.tensor(float(n), device=device),
                        ]).double()
                    if show and (i % 20 == 0 or i == steps - 1):
                        s = (sums / sums[5].clamp_min(1)).tolist()
                        bar.update(task_id, advance=0, stats=f"loss {s[0]:.4f} acc {s[3]:.3f}")
                    bar.update(task_id, advance=1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start + (cache_seconds if epoch == 1 else 0.0)
                dist_.all_reduce_sum(sums)
                total, task, kd, correct, feature_loss, _samples = (sums / sums[5].clamp_min(1)).tolist()
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
                if checkpoint is not None:
                    rng = _get_rng(generator, aug_generator, device)  # a collective: every rank takes part
                    if ctx.is_main:
                        save_state(checkpoint, {
                            "epoch": epoch, "config": config.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "loss": loss.state_dict() if isinstance(loss, nn.Module) else {}, "rng": rng, "history": history,
                            "cache_key": cached.key if cached is not None else None,
                        })
                if on_epoch is not None:
                    on_epoch(row)
                if show:
                    extra_text = f" test acc {row['test_accuracy']:.4f}" if test is not None else ""
                    bar.update(task_id, stats=f"loss {total:.4f} acc {correct:.3f}{extra_text}")
    finally:
        for h in hooks:
            h.remove()
    return history, cached


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
