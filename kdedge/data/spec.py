"""What a dataset is: its spec (shape, classes, labels, normalization) and a tensor-backed Dataset.

The spec travels with every checkpoint and, later, with every exported artifact, so a
deployment knows how to preprocess an input and name an output without the training code.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdedge.errors import DataError

__all__ = ["DatasetSpec", "ImageDataset", "channel_mean_std", "ArrayDataset", "DataSplits", "UINT8_SCALE", "pixel_scale", "stratified_rows"]

UINT8_SCALE = 1.0 / 255.0

# The built-in datasets of the kdedge versions whose specs did not record `scale` yet: their
# files are uint8 IDX, so 1/255 is what those specs meant. A closed, historical list: every spec
# written since records its scale.
_LEGACY_UINT8_BUILTINS = ("fashion-mnist", "mnist")

_COLOR_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}


def pixel_scale(dtype: torch.dtype) -> float:
    """The scale that brings stored pixels of ``dtype`` to the range mean/std were measured in.

    ``uint8`` pixels are 0..255 and become ``[0, 1]``; floating-point storage (and integer types
    other than uint8, which the loaders convert to float32) is used as stored.
    """
    return UINT8_SCALE if dtype == torch.uint8 else 1.0


def stratified_rows(labels: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` rows of a split whose classes are ``labels`` ``(N,)``: a seeded random subset in which every class keeps its share.

    Wherever kdedge uses part of a split (``--train-limit``/``--test-limit``, parity and calibration
    images, timing batches) it takes these rows, never the first ``n``: an image folder lists its
    files class by class, so a prefix would hold the first classes only. When ``n`` is at least the
    number of classes present, each gets one row and the other ``n - K`` are shared in proportion
    to ``count - 1`` (largest remainders, ties to the lower class index), so no class is left out
    and none gets more rows than it has; with fewer rows than classes the largest classes get one
    each. Within a class the rows are a uniform random choice (``seed``). Vectorized: O(N log N)
    for any number of classes.

    Returns:
        The chosen row indices ``(min(n, N),)`` int64, ascending (the split's own order).
    """
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu()
    total = labels.numel()
    if n >= total:
        return torch.arange(total)
    if n <= 0:
        raise DataError(f"a data limit must be positive, got {n}")
    classes, counts = torch.unique(labels, return_counts=True)  # classes ascending
    k = classes.numel()
    generator = torch.Generator().manual_seed(seed)
    if n < k:  # one row for each of the n largest classes, ties drawn with the seed
        ties = torch.rand(k, generator=generator, dtype=torch.float64)
        largest = torch.argsort(-(counts.double() + ties / 2))[:n]  # ties / 2 < 1: it only orders equal counts
        quota = torch.zeros(k, dtype=torch.int64)
        quota[largest] = 1
    else:
        share = (counts - 1).double()
        exact = share * (n - k) / max(float(share.sum()), 1.0)
        quota = exact.floor().to(torch.int64)
        left = n - k - int(quota.sum())
        if left > 0:  # largest remainder first; a stable sort breaks ties by class index
            by_remainder = torch.sort(-(exact - quota.double()), stable=True).indices
            quota[by_remainder[:left]] += 1
        quota = torch.minimum(quota + 1, counts)
    # Rows grouped by class, in a seeded random order inside each class; keep each class's first `quota`.
    keys = torch.rand(total, generator=generator, dtype=torch.float64)
    order = torch.argsort(keys)
    order = order[torch.sort(labels[order], stable=True).indices]
    group = torch.repeat_interleave(torch.arange(k), counts)  # the class position of each row of `order`
    rank = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[group]
    return order[rank < quota[group]].sort().values


def channel_mean_std(chunks: Iterable[torch.Tensor], scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of ``pixel * scale`` over ``(B, C, H, W)`` chunks, accumulated in float64.

    One chunk at a time: no float copy of the whole set. Rounded to 6 decimals, as specs record them.
    """
    total = squares = None
    count = 0
    for chunk in chunks:
        x = chunk.to(torch.float64) * scale
        s, q = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None:
        raise DataError("cannot measure mean/std on no images")
    mean = total / count
    std = ((squares - count * mean * mean) / max(count - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-6)  # type: ignore[operator]
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything a model and a deployment need to know about the inputs and outputs.

    Attributes:
        name: Built-in name or the path the data came from.
        input_shape: One sample's shape, ``(channels, height, width)``.
        num_classes: Number of output classes.
        labels: One human-readable name per class index.
        mean: Per-channel mean subtracted after multiplying the stored pixels by ``scale``.
        std: Per-channel standard deviation divided after subtracting ``mean``.
        scale: What stored pixels are multiplied by first: ``1/255`` for ``uint8`` storage, ``1.0``
            for floating-point storage (:func:`pixel_scale`). The loaders derive it from the data;
            :class:`ArrayDataset` applies this value and refuses one that is not its images'.
            None only in a spec read from a file written before kdedge recorded it (see
            :meth:`from_dict`).
        files: sha256 of each source file, by role (``train_images``...), for provenance.
        color: Channel order of the stored pixels: ``"L"`` (one gray channel), ``"RGB"`` or
            ``"RGBA"``; None when the source does not say (an array with 3 channels may be BGR).
        resize: The image-folder transform: resize the shorter side to ``resize`` pixels
            (bilinear, Pillow's antialiased resampling), then center-crop to ``input_shape``'s
            H × W. None: images are used at their stored size.

    An input is ``x = (pixel * scale - mean[c]) / std[c]``.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    labels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float | None = UINT8_SCALE
    files: dict[str, str] = field(default_factory=dict, compare=False)
    color: str | None = None
    resize: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if len(self.input_shape) != 3 or any(int(d) <= 0 for d in self.input_shape):
            problems.append(f"input_shape must be (C, H, W) with positive sizes, got {self.input_shape}")
        if self.num_classes < 2:
            problems.append(f"num_classes must be >= 2, got {self.num_classes}")
        if len(self.labels) != self.num_classes:
            problems.append(f"{len(self.labels)} labels for {self.num_classes} classes")
        channels = self.input_shape[0] if self.input_shape else 0
        if len(self.mean) != channels or len(self.std) != channels:
            problems.append(f"mean/std need one value per channel ({channels}), got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            problems.append(f"std must be positive, got {self.std}")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            problems.append(f"scale must be a positive number (1/255 for uint8 pixels, 1.0 for float), got {self.scale!r}")
        if self.color is not None and (self.color not in _COLOR_CHANNELS or _COLOR_CHANNELS[self.color] != channels):
            problems.append(f"color must be one of L (1 channel), RGB (3) or RGBA (4) matching the {channels} channel(s), got {self.color!r}")
        if self.resize is not None and not (isinstance(self.resize, int) and self.resize > 0):
            problems.append(f"resize must be a positive number of pixels or None, got {self.resize!r}")
        if problems:
            raise DataError(f"invalid dataset spec for {self.name!r}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["labels"] = list(self.labels)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSpec:
        """The spec :meth:`to_dict` wrote, or one written before ``scale`` was recorded.

        A spec without ``scale`` comes from a kdedge that scaled uint8 pixels by 1/255 and used
        float pixels as stored, without saying which the data was. For the built-in datasets of
        those versions (uint8 IDX files) that is 1/255; for any other data the file cannot tell,
        so ``scale`` is None (unknown) rather than a guess that could be wrong by 255x.
        """
        try:
            name = str(d["name"])
            if "scale" in d:
                scale = None if d["scale"] is None else float(d["scale"])
            else:
                scale = UINT8_SCALE if name in _LEGACY_UINT8_BUILTINS else None
            return cls(
                name=name,
                input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
                num_classes=int(d["num_classes"]),
                labels=tuple(str(v) for v in d["labels"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                scale=scale,
                files=dict(d.get("files", {})),
                color=None if d.get("color") is None else str(d["color"]),
                resize=None if d.get("resize") is None else int(d["resize"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed dataset spec ({exc!r}); expected the keys of DatasetSpec") from None


class ImageDataset(Dataset):
    """N labelled images sharing one :class:`DatasetSpec`, normalized on access.

    The stored pixels stay as stored (``uint8`` in memory, memory-mapped, or JPEG/PNG files on
    disk); only the batch being used is decoded and normalized, so no copy of the whole set is
    ever made. Subclasses say how to read the stored pixels of some samples (:meth:`raw`) and how
    to take a subset without copying them (:meth:`subset`); this class does the rest.

    Besides the per-item ``Dataset`` protocol it offers batch access — :meth:`inputs` for
    given samples, :meth:`batches` for an epoch given its index batches, :meth:`chunks` for one
    sequential pass — which the training loop, the teacher cache, export and bench use.
    """

    spec: DatasetSpec
    labels: torch.Tensor  # (N,) int64

    def __init__(self, labels: torch.Tensor, spec: DatasetSpec) -> None:
        if labels.ndim != 1:
            raise DataError(f"labels must be (N,), got shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            raise DataError(
                f"labels must lie in [0, {spec.num_classes - 1}], found [{int(labels.min())}, {int(labels.max())}]"
            )
        self.labels = labels.to(torch.int64)
        self.spec = spec
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        # x_norm = (x * scale - mean) / std = x * a + b, one fused multiply-add per batch. The
        # scale is the spec's own, the value exported metadata and manifests declare.
        scale = spec.scale if spec.scale is not None else UINT8_SCALE
        self._a = scale / std
        self._b = -mean / std
        self._fingerprint: str | None = None

    # -- what a subclass provides -------------------------------------------------------------
    def raw(self, index: torch.Tensor) -> torch.Tensor:
        """Stored pixels ``(B, C, H, W)`` of samples ``index`` (a 1-D int64 tensor), as stored (uint8 or float32)."""
        raise NotImplementedError

    def subset(self, rows: torch.Tensor) -> ImageDataset:
        """The samples ``rows`` (1-D int64, in that order) as a dataset, without copying pixels."""
        raise NotImplementedError

    def _identity(self, h: hashlib._Hash) -> None:  # type: ignore[name-defined]
        """Feed what identifies the stored pixels into ``h`` (see :meth:`fingerprint`)."""
        raise NotImplementedError

    def prepare(self, progress: Any = None) -> None:
        """Get ready for repeated passes (an image folder decodes its images once into a cache); a no-op here."""

    # -- shared --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs(torch.tensor([index]))[0], int(self.labels[index])

    def normalize(self, raw: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Normalized float32 inputs from stored pixels ``(B, C, H, W)``: ``raw * scale - mean) / std``."""
        if device is not None:
            raw = raw.to(device, non_blocking=True)
        a, b = self._a.to(raw.device), self._b.to(raw.device)
        return torch.addcmul(b, raw.to(torch.float32), a).contiguous()

    def _rows(self, index: torch.Tensor | slice | None) -> torch.Tensor:
        if index is None:
            return torch.arange(len(self))
        if isinstance(index, slice):
            return torch.arange(len(self))[index]
        return torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()

    def inputs(self, index: torch.Tensor | slice | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Normalized float32 inputs ``(B, C, H, W)`` for ``index`` (all when None: only for small sets)."""
        return self.normalize(self.raw(self._rows(index)), device)

    def batches(self, index_batches: Iterable[torch.Tensor], *, device: torch.device | str | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(index, x, y)`` for each batch of sample indices, in order; ``x`` normalized on ``device``."""
        for idx in index_batches:
            idx = idx.cpu()
            yield idx, self.normalize(self.raw(idx), device), self.labels[idx].to(device or "cpu")

    def chunks(self, batch_size: int, *, device: torch.device | str | None = None, limit: int | None = None
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass in order over the first ``limit`` samples (all when None): ``(x, y)`` batches."""
        n = len(self) if limit is None else min(limit, len(self))
        order = [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        for _idx, x, y in self.batches(order, device=device):
            yield x, y

    def pass_source(self, *, max_bytes: int = 256 << 20, batch_size: int = 1024) -> Callable[[], Iterator[np.ndarray]]:
        """A re-iterable source of all normalized inputs ``(B, C, H, W)`` float32, in order, for repeated passes.

        A set whose floats fit in ``max_bytes`` is normalized once and kept (each pass yields that
        one array); a larger one is streamed ``batch_size`` samples at a time on every pass, so
        no copy of the whole set is ever made.
        """
        if len(self) * math.prod(self.spec.input_shape) * 4 <= max_bytes:
            whole = self.inputs().cpu().numpy()
            return lambda: iter([whole])
        self.prepare()  # an image folder decodes once, not on every pass
        return lambda: (x.cpu().numpy() for x, _y in self.chunks(batch_size))

    def sample(self, n: int, *, seed: int = 0) -> torch.Tensor:
        """Normalized inputs ``(min(n, N), C, H, W)`` of a seeded, class-stratified subset (:func:`stratified_rows`), in the split's order."""
        return self.inputs(stratified_rows(self.labels, n, seed=seed))

    def batch_of(self, n: int) -> np.ndarray:
        """``n`` normalized inputs ``(n, C, H, W)`` as float32 from every class (:meth:`sample`), repeated when the split is smaller: a timing batch of real images."""
        first = self.sample(n).cpu().numpy()
        return np.ascontiguousarray(np.concatenate([first] * (n // len(first) + 1))[:n] if len(first) < n else first, dtype=np.float32)

    def take(self, n: int | None, *, seed: int = 0) -> ImageDataset:
        """``n`` samples (all when None) from every class in its share: a seeded stratified subset (:func:`stratified_rows`).

        Never the first ``n``: an image folder lists its files class by class, so a prefix would
        keep only the first classes.
        """
        if n is None:
            return self
        if n <= 0:
            raise DataError(f"a data limit must be positive, got {n}")
        return self if n >= len(self) else self.subset(stratified_rows(self.labels, n, seed=seed))

    def fingerprint(self) -> str:
        """sha256 of what identifies the stored images, the labels and the normalization."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            s = self.spec
            h.update(repr((type(self).__name__, s.input_shape, s.mean, s.std, s.scale, s.color, s.resize)).encode())
            self._identity(h)
            h.update(np.ascontiguousarray(self.labels.cpu().numpy()).tobytes())  # 8 bytes per sample
            self._fingerprint = h.hexdigest()
        return self._fingerprint


#: Pixels hashed per step by :meth:`ArrayDataset.fingerprint` (bounds its extra memory).
_HASH_CHUNK_BYTES = 64 << 20


class ArrayDataset(ImageDataset):
    """An image-classification dataset over an array of pixels (in memory or memory-mapped).

    Images are kept as stored and multiplied by ``spec.scale`` on access (1/255 for ``uint8``
    pixels, 1.0 for float images), so a 60k-image set costs 47 MB rather than 188 MB, and a
    memory-mapped ``.npy`` is read a batch at a time.

    Args:
        images: ``(N, C, H, W)`` tensor — or ``(N, H, W, C)`` with ``layout="NHWC"`` (kept as
            stored; batches are transposed as they are read) — ``uint8`` or floating point.
        labels: ``(N,)`` integer class indices.
        spec: The dataset's spec; its normalization (``scale``, ``mean``, ``std``) is applied by
            :meth:`inputs`, so what the spec declares is what the model sees.
        layout: How ``images`` is stored.
        rows: The stored rows this dataset consists of (a subset, in order); None: all.

    Raises:
        DataError: Shapes, labels or the spec's ``scale`` do not fit the images (a ``uint8`` set
            needs scale 1/255, a float set 1.0: :func:`pixel_scale`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, *, layout: str = "NCHW",
                 rows: torch.Tensor | None = None) -> None:
        if images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if layout not in ("NCHW", "NHWC"):
            raise DataError(f"layout must be NCHW or NHWC, got {layout!r}")
        stored = images.permute(0, 3, 1, 2) if layout == "NHWC" else images  # a view: nothing is copied
        n = stored.shape[0] if rows is None else rows.shape[0]
        if labels.ndim != 1 or labels.shape[0] != n:
            raise DataError(f"image/label count mismatch: {n} images, labels of shape {tuple(labels.shape)}")
        if tuple(stored.shape[1:]) != tuple(spec.input_shape):
            raise DataError(f"images have shape {tuple(stored.shape[1:])}, spec says {spec.input_shape}")
        expected = pixel_scale(images.dtype)
        if spec.scale is None or not math.isclose(spec.scale, expected, rel_tol=1e-6):
            raise DataError(
                f"images stored as {str(images.dtype).removeprefix('torch.')} take pixel scale {expected:.6g}, but spec {spec.name!r} "
                f"declares scale {spec.scale!r}; build the spec with scale=kdedge.data.spec.pixel_scale(images.dtype) (or load the data with kdedge.load_dataset)"
            )
        super().__init__(labels, spec)
        self._stored = images
        self.layout = layout
        #: The stored images as an ``(N, C, H, W)`` view (all rows, even for a subset).
        self.images = stored
        self.rows = None if rows is None else rows.to(torch.int64).cpu()

    def raw(self, index: torch.Tensor) -> torch.Tensor:
        index = index.to(self.images.device)
        if self.rows is not None:
            index = self.rows.to(self.images.device)[index]
        if index.numel() and bool((index[1:] - index[:-1] == 1).all()):
            return self.images[int(index[0]) : int(index[-1]) + 1]  # a contiguous run: a view, read once
        return self.images[index]

    def subset(self, rows: torch.Tensor) -> ArrayDataset:
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1).cpu()
        k = rows.numel()
        if self.rows is None and bool((rows == torch.arange(k)).all()):  # a prefix: a plain view, as take() always gave
            return ArrayDataset(self._stored[:k], self.labels[:k], self.spec, layout=self.layout)
        return ArrayDataset(self._stored, self.labels[rows], self.spec, layout=self.layout, rows=rows if self.rows is None else self.rows[rows])

    def to(self, device: torch.device | str) -> ArrayDataset:
        """A copy whose tensors live on ``device`` (e.g. the whole set on a GPU)."""
        return ArrayDataset(self._stored.to(device), self.labels.to(device), self.spec, layout=self.layout, rows=self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored pixels (all rows)."""
        return self._stored.numel() * self._stored.element_size()

    def _identity(self, h: hashlib._Hash) -> None:  # type: ignore[name-defined]
        stored = self._stored
        h.update(repr((tuple(stored.shape), str(stored.dtype), self.layout)).encode())
        per_row = max(1, math.prod(stored.shape[1:]) * stored.element_size())
        step = max(1, _HASH_CHUNK_BYTES // per_row)
        for i in range(0, stored.shape[0], step):  # chunk by chunk: never a copy of the whole set
            h.update(memoryview(np.ascontiguousarray(stored[i : i + step].cpu().numpy())).cast("B"))
        if self.rows is not None:
            h.update(np.ascontiguousarray(self.rows.numpy()).tobytes())


@dataclass
class DataSplits:
    """A train and a test split sharing one spec, and optionally a validation split held out of training."""

    train: ImageDataset
    test: ImageDataset
    spec: DatasetSpec
    val: ImageDataset | None = None

    def limit(self, train: int | None = None, test: int | None = None) -> DataSplits:
        return DataSplits(self.train.take(train), self.test.take(test), self.spec, self.val)
