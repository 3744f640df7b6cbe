"""The frozen teacher, the inputs it expects, and its logit cache.

A teacher may have been trained with another input normalization than the data kdedge feeds
the student (``pixels / 255`` against standardized inputs, say). A
:class:`~kdedge.data.normalization.Normalization` declares the teacher's contract and
:class:`FrozenTeacher` maps every batch into it, as timm's distillation task re-normalizes for
its teacher.

Without augmentation every epoch shows the teacher the same inputs, so its logits are computed
once and looked up by sample index afterwards: later epochs cost only the student. The cache key
covers what the teacher *computes* — its class, module structure, the code of its ``forward``
methods, its weights and input map — and the exact input tensors (pixels, labels and
normalization). A hit is verified against the teacher's own outputs on a few samples before it is
used. The pass runs in the fastest runtime that matches the teacher (:mod:`kdedge.distill.teacher_pass`).
Augmented inputs are not served from this cache: either the training loop runs the teacher per batch,
or the teacher's outputs on stored augmented views are cached (:mod:`kdedge.distill.views`).
"""

from __future__ import annotations

import hashlib
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge._fs import atomic_file
from kdedge.data.normalization import InputMap, Normalization
from kdedge.data.spec import DatasetSpec, ImageDataset
from kdedge.distill.teacher_pass import teacher_pass
from kdedge.errors import ConfigError
from kdedge.models.zoo import state_dict_sha256
from kdedge.progress import Progress

__all__ = ["CachedPass", "FrozenTeacher", "TeacherLogits", "logit_cache_key", "teacher_identity", "teacher_input_map", "teacher_logits"]


def teacher_input_map(config: Any, declared: Normalization | None, data: DatasetSpec | None) -> InputMap | None:
    """How the data's inputs become the teacher's: ``config.teacher_mean``/``teacher_std`` when set, else what
    the teacher ``declared`` (a checkpoint's or ONNX file's own normalization), else unchanged (None)."""
    if getattr(config, "teacher_mean", None) is not None:
        declared = Normalization(tuple(config.teacher_mean), tuple(config.teacher_std or ()))
    if declared is None:
        return None
    if data is None:
        raise ConfigError("teacher_mean/teacher_std need a kdedge dataset (an ImageDataset) to know the data's own normalization; "
                          "normalize the data for the teacher yourself, or load it with kdedge.load_dataset")
    return declared.map_from(data)


class _Mapped(nn.Module):
    """A teacher behind its input map, as one module (for evaluation and benchmarks)."""

    def __init__(self, input_map: InputMap, model: nn.Module) -> None:
        super().__init__()
        self.input_map = input_map
        self.model = model
        self.train(model.training)  # a new module starts in train mode; this one is as its (frozen) teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.input_map(x))


class FrozenTeacher:
    """A teacher model in eval mode with gradients off; calling it returns logits.

    Deliberately not an ``nn.Module``: it can't be registered inside the student, wrapped by
    DDP or switched back to train mode by ``student.train()``. As a context manager it gives the
    caller's module back on the CPU in the memory format it came in (channels-last weights would
    make ``safetensors.torch.save_file`` refuse its ``state_dict``).

    Args:
        model: The teacher; ``model`` stays the unwrapped module (feature hooks find its layers by name).
        device: Where it runs.
        channels_last: Feed it channels-last batches.
        input_map: Maps the data's inputs to the teacher's normalization (see :meth:`Normalization.map_from`).
    """

    def __init__(self, model: nn.Module, *, device: torch.device | str = "cpu", channels_last: bool = False, input_map: InputMap | None = None) -> None:
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._was_channels_last = _is_channels_last(model)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.input_map = input_map
        #: The teacher as one module taking the *data's* inputs (its input map included), for evaluation and benchmarks.
        self.module: nn.Module = self.model if input_map is None else _Mapped(input_map, self.model)
        self._sha: str | None = None

    def __enter__(self) -> FrozenTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Move the teacher to the CPU and, if it was converted to channels-last here, back to the contiguous format."""
        self.model.cpu()
        if self.channels_last and not self._was_channels_last:
            self.model.to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training:  # switched back by someone (a train() on a module holding it): a teacher is always in eval mode
            self.model.eval()
        x = x.to(self.device)
        if self.input_map is not None:
            x = self.input_map(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()

    def fingerprint(self) -> str:
        """sha256 of the teacher's weights and buffers (BN statistics included)."""
        if self._sha is None:
            self._sha = state_dict_sha256(self.model)
        return self._sha


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the 4-D weights are channels-last, judged on those whose two layouts differ (a 1x1 or single-input-channel kernel is both)."""
    telling = [p for p in model.parameters() if p.dim() == 4 and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last)]
    return bool(telling) and all(p.is_contiguous(memory_format=torch.channels_last) for p in telling)


def _code_digest(fn: object, h: hashlib._Hash) -> None:  # type: ignore[name-defined]
    """Feed the bytecode, names and constants of ``fn`` (and nested functions) into ``h``."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is None:
        h.update(repr(type(fn)).encode())
        return
    stack = [code]
    while stack:
        c = stack.pop()
        h.update(c.co_code)
        h.update(repr((c.co_names, c.co_varnames)).encode())
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                stack.append(const)
            else:
                h.update(repr(const).encode())


def teacher_identity(teacher: FrozenTeacher) -> str:
    """sha256 of the teacher's class, module structure, ``forward`` bytecode, weights and input map.

    Two teachers with the same weights but another ``forward`` (a subclass, a wrapper, a
    patched instance method) get different identities. What this cannot see — values captured in
    closures, plain attributes, helper methods ``forward`` calls — is caught when the cache is
    read: the cached rows must equal the teacher's own outputs on a probe batch.
    """
    h = hashlib.sha256()
    model = teacher.model
    h.update(f"{type(model).__module__}.{type(model).__qualname__}|{model!r}|{teacher.input_map!r}|{teacher.fingerprint()}".encode())
    seen: set[type] = set()
    for m in model.modules():
        if type(m) not in seen:
            seen.add(type(m))
            h.update(f"{type(m).__module__}.{type(m).__qualname__}".encode())
            _code_digest(type(m).forward, h)
        if "forward" in vars(m):  # an instance whose forward was replaced
            h.update(b"instance-forward")
            _code_digest(vars(m)["forward"], h)
    return h.hexdigest()


class CachedPass:
    """Where a cache of the teacher's outputs came from: its key, its directory or file, and the pass that filled it."""

    def __init__(self, *, key: str, path: Path | None = None, seconds: float = 0.0, hit: bool = False, runtime: str = "") -> None:
        self.key = key
        self.path = path
        self.seconds = seconds  # time spent scoring (0 on a disk hit)
        self.hit = hit
        self.runtime = runtime  # what scored them ("" on a disk hit)


class TeacherLogits(CachedPass):
    """Teacher logits for every training sample, indexed by sample index.

    Backed by a tensor in memory or by a read-only memory-mapped ``.npy`` file.
    """

    def __init__(self, array: np.ndarray | torch.Tensor, *, key: str, path: Path | None = None, seconds: float = 0.0, hit: bool = False,
                 runtime: str = "") -> None:
        super().__init__(key=key, path=path, seconds=seconds, hit=hit, runtime=runtime)
        self._array = array

    @property
    def nbytes(self) -> int:
        return int(self._array.nbytes)

    def __len__(self) -> int:
        return self._array.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        if isinstance(self._array, torch.Tensor):
            return self._array[index]
        return torch.from_numpy(np.asarray(self._array[index.cpu().numpy()]))  # fancy index copies: writable

    def tensor(self) -> torch.Tensor:
        return self._array if isinstance(self._array, torch.Tensor) else torch.from_numpy(np.array(self._array))


def logit_cache_key(teacher: FrozenTeacher, data: ImageDataset) -> str:
    """The cache file's name: the teacher's identity and the exact training inputs."""
    return hashlib.sha256(f"kdedge-logits-v2|{teacher_identity(teacher)}|{data.fingerprint()}".encode()).hexdigest()


def index_batches(lo: int, hi: int, batch_size: int) -> list[torch.Tensor]:
    """Sample indices ``lo:hi`` in consecutive batches of ``batch_size`` (the last one shorter): the order a cache pass scores in."""
    return [torch.arange(i, min(i + batch_size, hi)) for i in range(lo, hi, batch_size)]


#: Scores a batch of the data's inputs: ``(B, C, H, W) -> (B, K)`` logits (a FrozenTeacher, or its faster :class:`TeacherPass`).
Scorer = Callable[[torch.Tensor], torch.Tensor]


def _scored(score: Scorer, data: ImageDataset, batch_size: int, lo: int, hi: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(index, logits)`` of samples ``lo:hi`` in batches, in order, on the CPU."""
    for idx, x, _y in data.batches(index_batches(lo, hi, batch_size), device=device):
        yield idx, score(x).cpu()


def _compute(score: Scorer, data: ImageDataset, batch_size: int, device: torch.device, lo: int = 0, hi: int | None = None,
             on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits of samples ``lo:hi`` (all by default); ``on_batch`` gets each batch's size."""
    chunks = []
    for _idx, logits in _scored(score, data, batch_size, lo, len(data) if hi is None else hi, device):
        chunks.append(logits)
        if on_batch is not None:
            on_batch(logits.shape[0])
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def _matches(teacher: FrozenTeacher, data: ImageDataset, array: np.ndarray, probe: int = 8) -> bool:
    """Whether cached rows equal what ``teacher`` computes now on the first ``probe`` samples."""
    n = min(probe, len(data))
    fresh = _compute(teacher, data, n, teacher.device, 0, n).numpy()
    cached = np.asarray(array[:n], dtype=np.float32)
    return bool(np.abs(fresh - cached).max(initial=0.0) <= 1e-3 * (1.0 + np.abs(cached).max(initial=0.0)))


def teacher_logits(teacher: FrozenTeacher, data: ImageDataset, *, cache_dir: str | Path | None = None, batch_size: int = 500,
                   runtime: str = "auto", progress: Progress | None = None) -> TeacherLogits:
    """The teacher's logits ``(N, K)`` over ``data``, from the disk cache when present and verified.

    Without DDP and with a ``cache_dir`` the logits are written batch by batch into a
    memory-mapped ``.npy`` (an ImageNet-sized cache never sits in memory); under DDP each rank
    scores a contiguous shard and the shards are gathered.

    Args:
        teacher: The frozen teacher.
        data: Un-augmented training inputs (arrays or an image folder, decoded by its workers).
        cache_dir: Where ``<key>.npy`` files live; None keeps the logits in memory only.
        batch_size: Inference batch size.
        runtime: The pass's runtime: ``auto`` (onnxruntime when it matches torch and is faster), ``torch`` or
            ``onnxruntime`` (see :func:`~kdedge.distill.teacher_pass.teacher_pass`).
        progress: Reports the pass over the data (a bar, or a line when it starts and ends).
    """
    import kdedge.distributed as dist_

    progress = progress or Progress(False)
    ctx = dist_.context()
    key = logit_cache_key(teacher, data)
    path = Path(cache_dir) / f"{key}.npy" if cache_dir is not None else None
    array = _read_cache(path, len(data)) if path is not None else None
    if array is not None and not _matches(teacher, data, array):
        progress.line(f"teacher: the cached logits {path} do not match this teacher's outputs; recomputing them")
        array = None
    # Under DDP every rank must take the same branch: use the file only if every rank could read it.
    if ctx.enabled and not dist_.all_true(array is not None):
        array = None
    if array is not None:
        progress.line(f"teacher: logits of {len(data)} training images from the cache ({key[:12]}…)")
        return TeacherLogits(array, key=key, path=path, hit=True)
    start = time.perf_counter()
    score = teacher_pass(teacher, torch.from_numpy(data.batch_of(min(256, len(data)))), runtime=runtime)
    progress.line(f"teacher: scoring {len(data)} training images once for the logit cache, in {score.describe()}")
    task = progress.add("teacher logits", len(data))
    if path is not None and not ctx.enabled:
        mapped = _score_to_file(score, teacher.device, data, path, batch_size, progress, task)
        seconds = time.perf_counter() - start
        progress.finish(task, f"teacher: {len(data)} logits in {seconds:.1f} s ({len(data) / max(seconds, 1e-9):,.0f} images/s)")
        return TeacherLogits(mapped, key=key, path=path, seconds=seconds, runtime=score.runtime)
    # Each rank computes a contiguous shard; the shards are gathered so every rank holds all logits.
    lo, hi = dist_.shard_range(len(data), ctx)
    part = _compute(score, data, batch_size, teacher.device, lo, hi, on_batch=lambda n: progress.update(task, advance=n * ctx.world_size))
    logits = dist_.all_gather_rows(part) if ctx.enabled else part
    seconds = time.perf_counter() - start
    progress.finish(task, f"teacher: {len(data)} logits in {seconds:.1f} s ({len(data) / max(seconds, 1e-9):,.0f} images/s)")
    if path is not None and ctx.is_main:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, logits.numpy().astype(np.float32), allow_pickle=False)
    return TeacherLogits(logits, key=key, path=path if path is not None and ctx.is_main else None, seconds=seconds, runtime=score.runtime)


def _score_to_file(score: Scorer, device: torch.device, data: ImageDataset, path: Path, batch_size: int, progress: Progress, task: int) -> np.ndarray:
    """Score ``data`` into a memory-mapped ``.npy`` written under a temporary name, then renamed; returns it mapped read-only."""
    with atomic_file(path) as tmp:
        out = None
        for idx, logits in _scored(score, data, batch_size, 0, len(data), device):
            if out is None:  # the class count is known from the first batch
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(data), logits.shape[1]))
            out[int(idx[0]) : int(idx[-1]) + 1] = logits.numpy()
            progress.update(task, advance=logits.shape[0])
        if out is None:
            raise ValueError("cannot cache the logits of an empty dataset")
        out.flush()
        del out  # unmapped before the rename
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_cache(path: Path, rows: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None  # unreadable or torn file: recompute and replace it
    if array.ndim == 2 and array.shape[0] == rows and array.dtype == np.float32:
        return array
    return None
