"""Cached teacher views: augmented distillation that pays for the teacher once.

Long augmented distillation works best when teacher and student see the *same* view of an image
(Beyer et al., 2022: "a good teacher is patient and consistent"), but running the teacher on every
step costs more than the student's whole step. As FKD (Shen & Xing, 2022) does, :func:`teacher_views`
draws ``K`` augmented views per training image once — crop offset, flip and erasing box, rows of
:data:`~kdedge.distill.augment.VIEW_FIELDS` — and stores each view's parameters with the teacher's
log-probabilities on it (all classes, or the top ``k``) in fp16. Each epoch the student draws one
stored view per image, :func:`~kdedge.distill.augment.apply_views` renders it from the image again —
the exact pixels the teacher scored — and the stored output is the soft target.

On disk a cache is a directory ``<cache_dir>/<key>/`` of memory-mapped ``.npy`` files:
``views.npy`` ``(N, K, 7)`` int16, ``logp.npy`` ``(N, K, k)`` float16 and, for top-k,
``classes.npy`` ``(N, K, k)`` int16 (int32 beyond 32,767 classes); ``meta.json`` says what they are. The key covers the teacher's
identity (as the logit cache's does), the exact training inputs and the view recipe. While it is
computed the files live in ``<key>.partial/`` with the number of finished images, so a killed pass
continues where it stopped; the directory is renamed when complete, and a lock file keeps two
processes from scoring the same cache at once. A hit is checked against the
teacher's own outputs on a few images before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kdedge._fs import atomic_dir, atomic_file, file_lock
from kdedge.data.spec import ImageDataset
from kdedge.distill.augment import VIEW_FIELDS, apply_views, sample_views
from kdedge.distill.teacher import CachedPass, FrozenTeacher, index_batches, teacher_identity
from kdedge.distill.teacher_pass import TeacherPass, teacher_pass
from kdedge.errors import ConfigError, KdedgeError
from kdedge.progress import Progress

__all__ = ["TeacherViews", "ViewRecipe", "teacher_views", "view_cache_key"]

_FORMAT = "kdedge-views-v1"


@dataclass(frozen=True)
class ViewRecipe:
    """How the stored views are drawn and what is kept of the teacher's output.

    Attributes:
        views: ``K``, stored views per training image.
        pad: Maximum crop shift in pixels (edge padding), as :func:`~kdedge.distill.augment.sample_views`.
        flip: Random horizontal flips.
        erasing: Probability of random erasing per view.
        topk: Keep the ``k`` most probable classes per view (0: all classes).
        seed: Seeds the views; independent of the training seed, so runs with other seeds share one cache.
    """

    views: int
    pad: int = 2
    flip: bool = True
    erasing: float = 0.0
    topk: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.views < 1:
            problems.append(f"views must be >= 1, got {self.views}")
        if self.pad < 0:
            problems.append(f"pad must be >= 0, got {self.pad}")
        if not 0 <= self.erasing <= 1:
            problems.append(f"erasing must be in [0, 1], got {self.erasing}")
        if self.topk < 0:
            problems.append(f"topk must be >= 0 (0 keeps every class), got {self.topk}")
        if problems:
            raise ConfigError("invalid view recipe: " + "; ".join(problems))


def view_cache_key(teacher: FrozenTeacher, data: ImageDataset, recipe: ViewRecipe) -> str:
    """The cache directory's name: the teacher's identity, the exact training inputs and the recipe."""
    return hashlib.sha256(f"{_FORMAT}|{teacher_identity(teacher)}|{data.fingerprint()}|{sorted(asdict(recipe).items())}".encode()).hexdigest()


def full_logits(logp: torch.Tensor, classes: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """Log-probabilities over every class ``(B, C)`` float32 from stored rows ``(B, k)``.

    With top-k rows the probability the other ``C - k`` classes shared is spread evenly over them
    (their logits are unknown; what is known is their total), so a softmax at any temperature sees
    the stored classes in their true proportions.
    """
    logp = logp.float()
    if classes is None:
        return logp
    rest = (1.0 - logp.exp().sum(1, keepdim=True)).clamp_min(1e-6)
    others = num_classes - logp.shape[1]
    out = (rest / max(others, 1)).log().expand(-1, num_classes).clone()
    return out.scatter_(1, classes.long(), logp)


class TeacherViews(CachedPass):
    """``K`` stored views per training image and the teacher's log-probabilities on each.

    Backed by arrays in memory or by read-only memory-mapped ``.npy`` files.
    """

    def __init__(self, recipe: ViewRecipe, views: np.ndarray, logp: np.ndarray, classes: np.ndarray | None, num_classes: int, *, key: str,
                 path: Path | None = None, seconds: float = 0.0, hit: bool = False, runtime: str = "") -> None:
        super().__init__(key=key, path=path, seconds=seconds, hit=hit, runtime=runtime)
        self.recipe = recipe
        self._views, self._logp, self._classes = views, logp, classes
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self._views.shape[0]

    @property
    def view_rows(self) -> np.ndarray:
        """``(N, K, 7)`` int16: every image's stored views (:data:`~kdedge.distill.augment.VIEW_FIELDS`)."""
        return self._views

    @property
    def log_probs(self) -> np.ndarray:
        """``(N, K, k)`` float16: the teacher's log-probabilities on each view (all classes, or the top ``k``)."""
        return self._logp

    @property
    def classes(self) -> np.ndarray | None:
        """``(N, K, k)`` int16 (int32 beyond 32,767 classes): which classes :attr:`log_probs` holds; None when it holds all."""
        return self._classes

    @property
    def nbytes(self) -> int:
        """Bytes the views and outputs take (on disk: the ``.npy`` payloads)."""
        return sum(a.nbytes for a in (self._views, self._logp, self._classes) if a is not None)

    def rows(self, index: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """View rows ``(B, 7)`` and teacher log-probabilities ``(B, C)`` of view ``view[i]`` of image ``index[i]``."""
        i, j = index.cpu().numpy(), view.cpu().numpy()
        views = torch.from_numpy(np.asarray(self._views[i, j]))  # fancy indexing copies out of the memory map
        classes = torch.from_numpy(np.asarray(self._classes[i, j])) if self._classes is not None else None
        return views, full_logits(torch.from_numpy(np.asarray(self._logp[i, j])), classes, self.num_classes)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One stored view per image, uniformly at random: its rows and the teacher's log-probabilities (see :meth:`rows`)."""
        return self.rows(index, torch.randint(0, self.recipe.views, (len(index),), generator=generator))


def _class_dtype(num_classes: int) -> type:
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def _score(score: TeacherPass, x: torch.Tensor, views: torch.Tensor, recipe: ViewRecipe) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities ``(b, K, k)`` on the CPU (and classes for top-k) of the views ``(b, K, 7)`` of images ``x`` ``(b, C, H, W)``."""
    b, k = views.shape[:2]
    rendered = apply_views(x.repeat_interleave(k, 0), views.reshape(b * k, -1), pad=recipe.pad)
    # fp16 holds down to -65504: clamp so a (vanishingly unlikely) lower log-probability is not stored as -inf.
    logp = torch.log_softmax(score(rendered).float().cpu(), dim=1).clamp_min(float(np.finfo(np.float16).min))
    if recipe.topk and recipe.topk < logp.shape[1]:
        values, classes = logp.topk(recipe.topk, dim=1)
        return values.reshape(b, k, -1), classes.reshape(b, k, -1)
    return logp.reshape(b, k, -1), None


def _all_views(data: ImageDataset, recipe: ViewRecipe) -> torch.Tensor:
    """Every image's ``K`` views ``(N, K, 7)``, drawn from the recipe's seed (the same on every call and rank)."""
    _c, h, w = data.spec.input_shape
    flat = sample_views(len(data) * recipe.views, h, w, torch.Generator().manual_seed(recipe.seed), pad=recipe.pad, flip=recipe.flip,
                        erasing=recipe.erasing)
    return flat.view(len(data), recipe.views, len(VIEW_FIELDS))


def _width(recipe: ViewRecipe, num_classes: int) -> int:
    return recipe.topk if recipe.topk and recipe.topk < num_classes else num_classes


def teacher_views(teacher: FrozenTeacher, data: ImageDataset, recipe: ViewRecipe, *, cache_dir: str | Path | None = None,
                  batch_size: int = 1024, runtime: str = "auto", progress: Progress | None = None) -> TeacherViews:
    """The teacher's outputs on ``recipe.views`` augmented views of every training image, from the cache when present and verified.

    Args:
        teacher: The frozen teacher.
        data: Un-augmented training inputs (arrays or an image folder).
        recipe: The views to draw and what to keep of each output.
        cache_dir: Where ``<key>/`` cache directories live; None keeps everything in memory.
        batch_size: Views per teacher call.
        runtime: The teacher pass's runtime (see :func:`~kdedge.distill.teacher_pass.teacher_pass`).
        progress: Reports the pass (a bar, or a line when it starts and ends).
    """
    import kdedge.distributed as dist_

    progress = progress or Progress(False)
    ctx = dist_.context()
    key = view_cache_key(teacher, data, recipe)
    final = Path(cache_dir) / key if cache_dir is not None else None
    found = _verified(final, teacher, data, recipe, key, progress) if final is not None else None
    if ctx.enabled and not dist_.all_true(found is not None):  # every rank takes the same branch
        found = None
    if found is not None:
        progress.line(f"teacher views: {recipe.views} views of {len(data)} training images from the cache ({key[:12]}…)")
        return found
    start = time.perf_counter()
    score = teacher_pass(teacher, torch.from_numpy(data.batch_of(min(256, len(data)))), runtime=runtime)
    progress.line(f"teacher views: scoring {recipe.views} views of {len(data)} training images once, in {score.describe()}")
    task = progress.add("teacher views", len(data) * recipe.views)
    pass_ = _Pass(score, teacher.device, data, recipe, _all_views(data, recipe), max(1, batch_size // recipe.views), progress, task)
    if final is not None and not ctx.enabled:
        result = _score_to_dir(pass_, final, teacher)
    else:
        result = _score_in_memory(pass_, ctx, final, key)
    result.seconds, result.runtime = time.perf_counter() - start, score.runtime
    n = len(data) * recipe.views
    progress.finish(task, f"teacher views: {n} views in {result.seconds:.1f} s ({n / max(result.seconds, 1e-9):,.0f} images/s, {score.runtime}), "
                          f"{result.nbytes / 2**20:.1f} MiB")
    return result


def _verified(final: Path, teacher: FrozenTeacher, data: ImageDataset, recipe: ViewRecipe, key: str, progress: Progress) -> TeacherViews | None:
    found = _read(final, recipe, len(data), data.spec.num_classes, key)
    if found is not None and not _matches(teacher, data, found):
        progress.line(f"teacher views: the cached views in {final} do not match this teacher's outputs; scoring them again")
        return None
    return found


@dataclass
class _Pass:
    """One scoring pass: the scorer, where the images go, and the views to score."""

    score: TeacherPass
    device: torch.device
    data: ImageDataset
    recipe: ViewRecipe
    views: torch.Tensor  # (N, K, 7)
    per_batch: int  # images per teacher call
    progress: Progress
    task: int

    def rows(self, lo: int, hi: int, *, advance: int = 1) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """``(lo, hi, log-probabilities, classes)`` of images ``lo:hi``, a batch at a time; the bar advances ``advance`` views per view."""
        for idx, x, _y in self.data.batches(index_batches(lo, hi, self.per_batch), device=self.device):
            values, classes = _score(self.score, x, self.views[idx], self.recipe)
            self.progress.update(self.task, advance=len(idx) * self.recipe.views * advance)
            yield int(idx[0]), int(idx[-1]) + 1, values, classes


def _score_in_memory(p: _Pass, ctx, final: Path | None, key: str) -> TeacherViews:
    """Score in memory; under DDP each rank scores a contiguous shard and the shards are gathered (the main rank writes ``final``)."""
    import kdedge.distributed as dist_

    n, num_classes = len(p.data), p.data.spec.num_classes
    width = _width(p.recipe, num_classes)
    topk = width < num_classes
    world = ctx.world_size if ctx.enabled else 1
    lo, hi = dist_.shard_range(n, ctx)
    # (b, K, k) log-probabilities, with top-k's classes beside them: one tensor to gather.
    parts = [torch.cat([v, c.float()], 2) if c is not None else v for _lo, _hi, v, c in p.rows(lo, hi, advance=world)]
    rows = torch.cat(parts) if parts else torch.zeros(0, p.recipe.views, 2 * width if topk else width)  # an empty shard has the others' width
    rows = dist_.all_gather_rows(rows) if ctx.enabled else rows
    logp = rows[..., :width].numpy().astype(np.float16)
    classes = rows[..., width:].numpy().astype(_class_dtype(num_classes)) if topk else None
    views = p.views.numpy()
    written = None
    if final is not None and ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)  # torn or foreign (it failed verification): replaced
        try:
            with atomic_dir(final) as tmp:
                _write_meta(tmp, p.recipe, n, num_classes, key)
                np.save(tmp / "views.npy", views, allow_pickle=False)
                np.save(tmp / "logp.npy", logp, allow_pickle=False)
                if classes is not None:
                    np.save(tmp / "classes.npy", classes, allow_pickle=False)
                _write_json(tmp / "progress.json", {"images": n})
        except OSError:
            if not final.is_dir():  # not "another process published it first": a real write error
                raise
        written = final
    return TeacherViews(p.recipe, views, logp, classes, num_classes, key=key, path=written)


def _write_meta(directory: Path, recipe: ViewRecipe, n: int, num_classes: int, key: str) -> None:
    meta = {"format": _FORMAT, "key": key, "images": n, "num_classes": num_classes, "recipe": asdict(recipe), "view_fields": list(VIEW_FIELDS)}
    _write_json(directory / "meta.json", meta)


def _write_json(path: Path, obj: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _score_to_dir(p: _Pass, final: Path, teacher: FrozenTeacher) -> TeacherViews:
    """Score into memory-mapped files in ``<key>.partial/``, resuming from its progress; rename it to ``final`` when done.

    Under the cache's lock: a second process asking for the same cache waits, then finds it complete.
    """
    n, num_classes, key = len(p.data), p.data.spec.num_classes, final.name
    with file_lock(final.with_name(key + ".lock")):  # one process scores a cache at a time
        found = _verified(final, teacher, p.data, p.recipe, key, p.progress)
        if found is not None:  # another process finished it while this one waited
            return found
        shutil.rmtree(final, ignore_errors=True)  # torn or foreign (it failed verification): replaced
        partial = final.with_name(key + ".partial")
        done = _scored_so_far(partial, key, p.recipe, n, num_classes)
        if done is None:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            _write_meta(partial, p.recipe, n, num_classes, key)
            np.save(partial / "views.npy", p.views.numpy(), allow_pickle=False)
            done = 0
        _fill(p, partial, done)
        _write_json(partial / "progress.json", {"images": n})
        os.replace(partial, final)
    found = _read(final, p.recipe, n, num_classes, key)
    if found is None:
        raise KdedgeError(f"teacher views: {final} was written but cannot be read back (views.npy or logp.npy missing or of another shape); "
                          "remove it and run again")
    found.hit = False
    return found


def _fill(p: _Pass, partial: Path, done: int) -> None:
    """Score images ``done:N`` into the memory maps of ``partial``, saving the count of finished images every ~10 s."""
    n, num_classes = len(p.data), p.data.spec.num_classes
    width = _width(p.recipe, num_classes)
    shape, mode = (n, p.recipe.views, width), "r+" if done else "w+"
    logp = np.lib.format.open_memmap(partial / "logp.npy", mode=mode, dtype=np.float16, shape=shape)
    classes = np.lib.format.open_memmap(partial / "classes.npy", mode=mode, dtype=_class_dtype(num_classes), shape=shape) if width < num_classes else None
    if done:
        p.progress.line(f"teacher views: resuming after {done} of {n} images")
        p.progress.update(p.task, advance=done * p.recipe.views)
    last_save = time.monotonic()
    for lo, hi, values, cls in p.rows(done, n):
        logp[lo:hi] = values.numpy().astype(np.float16)
        if classes is not None and cls is not None:
            classes[lo:hi] = cls.numpy().astype(classes.dtype)
        if time.monotonic() - last_save > 10:  # the rows are on disk before the count says so
            for array in (logp, classes):
                if array is not None:
                    array.flush()
            _write_json(partial / "progress.json", {"images": hi})
            last_save = time.monotonic()
    for array in (logp, classes):
        if array is not None:
            array.flush()
    del logp, classes  # unmapped before the rename


def _scored_so_far(partial: Path, key: str, recipe: ViewRecipe, n: int, num_classes: int) -> int | None:
    """Images already scored in ``partial`` when it is this cache's unfinished pass with all its files, else None."""
    try:
        meta = json.loads((partial / "meta.json").read_text())
        done = int(json.loads((partial / "progress.json").read_text())["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if meta.get("key") != key or meta.get("images") != n or meta.get("num_classes") != num_classes or not 0 < done <= n:
        return None
    needed = ["views.npy", "logp.npy"] + (["classes.npy"] if _width(recipe, num_classes) < num_classes else [])
    return done if all((partial / name).is_file() for name in needed) else None


def _read(final: Path, recipe: ViewRecipe, n: int, num_classes: int, key: str) -> TeacherViews | None:
    """The complete cache in ``final``, memory-mapped read-only; None when absent, torn or of another shape."""
    if not final.is_dir():
        return None
    width = _width(recipe, num_classes)
    try:
        views = np.load(final / "views.npy", mmap_mode="r", allow_pickle=False)
        logp = np.load(final / "logp.npy", mmap_mode="r", allow_pickle=False)
        classes = np.load(final / "classes.npy", mmap_mode="r", allow_pickle=False) if width < num_classes else None
    except (ValueError, OSError):
        return None
    want = (n, recipe.views, width)
    if views.shape != (n, recipe.views, len(VIEW_FIELDS)) or logp.shape != want or logp.dtype != np.float16:
        return None
    if classes is not None and (classes.shape != want or classes.dtype != _class_dtype(num_classes)):
        return None
    return TeacherViews(recipe, views, logp, classes, num_classes, key=key, path=final, hit=True)


def _matches(teacher: FrozenTeacher, data: ImageDataset, found: TeacherViews, probe: int = 4) -> bool:
    """Whether the stored outputs of the first ``probe`` images' views equal what ``teacher`` computes on those views now."""
    n, k = min(probe, len(data)), found.recipe.views
    idx, view = torch.arange(n).repeat_interleave(k), torch.arange(k).repeat(n)
    rows, stored = found.rows(idx, view)
    x = next(iter(data.batches([torch.arange(n)], device=teacher.device)))[1].repeat_interleave(k, 0)
    fresh = torch.log_softmax(teacher(apply_views(x, rows, pad=found.recipe.pad)).float().cpu(), dim=1)
    if found.classes is not None:  # only the stored classes are exact
        cls = torch.from_numpy(np.asarray(found.classes[idx.numpy(), view.numpy()])).long()
        fresh, stored = fresh.gather(1, cls), stored.gather(1, cls)
    # fp16 keeps ~3 significant digits: 1e-3 relative (plus 1e-3 absolute) covers its rounding and the runtimes' difference.
    return bool(((fresh - stored).abs() <= 1e-3 * (1.0 + stored.abs())).all())
