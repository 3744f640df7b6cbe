"""Distributed data parallel under ``torchrun``: the process group, batch sharding, reductions.

kdedge uses PyTorch's own engine and nothing else: ``torchrun`` starts the processes and sets
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; :func:`init_from_env` joins that group (gloo on CPU,
nccl on CUDA). ``--batch-size`` stays the *global* batch: every rank draws the same shuffled
order and takes its slice of each batch, so with DDP's gradient averaging one step of N
processes is one step of one process on the same samples (up to float summation order).

Without a process group every helper here is a no-op, so the training loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "context", "init_from_env", "shutdown", "shard", "shard_range", "all_reduce_sum", "all_gather_rows", "all_true"]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes outputs and shows progress."""
        return self.rank == 0


def context() -> DistContext:
    """The current process group's view, or a single-process context."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def init_from_env(device: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes, if it describes one with more than one process.

    Args:
        device: The run's device setting; CUDA runs use nccl and bind each process to
            ``cuda:LOCAL_RANK``, CPU runs use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return context()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return context()


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, ctx: DistContext) -> tuple[int, int]:
    """This rank's contiguous slice ``lo:hi`` of ``n`` samples (all of them without DDP): for passes whose shards are gathered in rank order."""
    if not ctx.enabled:
        return 0, n
    return n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size


def shard(index: torch.Tensor, ctx: DistContext, *, pad_from: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's slice ``index[rank::world]`` of a global batch.

    A final batch smaller than the world is topped up from ``pad_from`` (the epoch's order) so
    that every rank has a non-empty batch and all ranks take the same number of steps.
    """
    if not ctx.enabled:
        return index
    if index.numel() < ctx.world_size:
        source = pad_from if pad_from is not None else index
        index = torch.cat([index, source[: ctx.world_size - index.numel()]])
    return index[ctx.rank :: ctx.world_size]


def _comm_device() -> torch.device:
    """Where the backend's collectives take their tensors: the current GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, wherever it lives; returns it."""
    if dist.is_available() and dist.is_initialized():
        comm = tensor.to(_comm_device())
        dist.all_reduce(comm, op=dist.ReduceOp.SUM)
        if comm is not tensor:
            tensor.copy_(comm)
    return tensor


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (so all ranks take the same branch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``rows`` ``(n_r, ...)`` in rank order, on ``rows``' device; shards may differ in length."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    world, comm = dist.get_world_size(), _comm_device()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=comm)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=comm)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(rows.device)
