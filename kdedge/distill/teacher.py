"""The frozen teacher and its logit cache.

Without augmentation every epoch shows the teacher the same inputs, so its logits are computed
once and looked up by sample index afterwards: later epochs cost only the student. The cache is
keyed by a hash of the teacher's weights *and* of the exact input tensors (pixels, labels and
normalization); change either and the key changes. Augmented inputs are never served from it —
the training loop runs the teacher per batch instead.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdedge.data.spec import ArrayDataset
from kdedge.models.zoo import state_dict_sha256

__all__ = ["FrozenTeacher", "TeacherLogits", "teacher_logits", "logit_cache_key"]


class FrozenTeacher:
    """A teacher model in eval mode with gradients off; calling it returns logits.

    Deliberately not an ``nn.Module``: it can't be registered inside the student, wrapped by
    DDP or switched back to train mode by ``student.train()``.
    """

    def __init__(self, model: nn.Module, *, device: torch.device | str = "cpu", channels_last: bool = False) -> None:
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self._sha: str | None = None

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x.to(self.device)).float()

    def fingerprint(self) -> str:
        """sha256 of the teacher's weights and buffers (BN statistics included)."""
        if self._sha is None:
            self._sha = state_dict_sha256(self.model)
        return self._sha


class TeacherLogits:
    """Teacher logits for every training sample, indexed by sample index.

    Backed by a tensor in memory or by a read-only memory-mapped ``.npy`` file.
    """

    def __init__(self, array: np.ndarray | torch.Tensor, *, key: str, path: Path | None = None, seconds: float = 0.0, hit: bool = False) -> None:
        self._array = array
        self.key = key
        self.path = path
        self.seconds = seconds  # time spent computing (0 on a disk hit)
        self.hit = hit

    def __len__(self) -> int:
        return self._array.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        if isinstance(self._array, torch.Tensor):
            return self._array[index]
        return torch.from_numpy(np.asarray(self._array[index.cpu().numpy()]))  # fancy index copies: writable

    def tensor(self) -> torch.Tensor:
        return self._array if isinstance(self._array, torch.Tensor) else torch.from_numpy(np.array(self._array))


def logit_cache_key(teacher: FrozenTeacher, data: ArrayDataset) -> str:
    return hashlib.sha256(f"kdedge-logits-v1|{teacher.fingerprint()}|{data.fingerprint()}".encode()).hexdigest()


@torch.inference_mode()
def _compute(teacher: FrozenTeacher, data: ArrayDataset, batch_size: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Logits of samples ``lo:hi`` (all by default)."""
    hi = len(data) if hi is None else hi
    chunks = [teacher(data.inputs(slice(i, min(i + batch_size, hi)), device=teacher.device)).cpu() for i in range(lo, hi, batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def teacher_logits(teacher: FrozenTeacher, data: ArrayDataset, *, cache_dir: str | Path | None = None, batch_size: int = 500) -> TeacherLogits:
    """The teacher's logits ``(N, K)`` over ``data``, from the disk cache when present.

    Args:
        teacher: The frozen teacher.
        data: Un-augmented training inputs.
        cache_dir: Where ``<key>.npy`` files live; None keeps the logits in memory only.
        batch_size: Inference batch size.
    """
    import kdedge.distributed as dist_

    ctx = dist_.context()
    key = logit_cache_key(teacher, data)
    path = Path(cache_dir) / f"{key}.npy" if cache_dir is not None else None
    array = _read_cache(path, len(data)) if path is not None else None
    # Under DDP every rank must take the same branch: use the file only if every rank could read it.
    if ctx.enabled and not dist_.all_true(array is not None):
        array = None
    if array is not None:
        return TeacherLogits(array, key=key, path=path, hit=True)
    start = time.perf_counter()
    if ctx.enabled:
        # Each rank computes a contiguous shard; the shards are gathered so every rank holds all logits.
        bounds = [len(data) * r // ctx.world_size for r in range(ctx.world_size + 1)]
        lo, hi = bounds[ctx.rank], bounds[ctx.rank + 1]
        part = _compute(teacher, data, batch_size, lo, hi)
        logits = dist_.all_gather_rows(part)
    else:
        logits = _compute(teacher, data, batch_size)
    seconds = time.perf_counter() - start
    if path is None or not ctx.is_main:
        return TeacherLogits(logits, key=key, seconds=seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, logits.numpy().astype(np.float32), allow_pickle=False)
        os.replace(tmp, path)  # atomic: readers see the old file, no file, or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return TeacherLogits(logits, key=key, path=path, seconds=seconds)


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
