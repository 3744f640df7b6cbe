"""What a dataset is: its spec (shape, classes, labels, normalization) and a tensor-backed Dataset.

The spec travels with every checkpoint and, later, with every exported artifact, so a
deployment knows how to preprocess an input and name an output without the training code.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdedge.errors import DataError

__all__ = ["DatasetSpec", "ArrayDataset", "DataSplits", "UINT8_SCALE", "pixel_scale"]

UINT8_SCALE = 1.0 / 255.0

# The built-in datasets of the kdedge versions whose specs did not record `scale` yet: their
# files are uint8 IDX, so 1/255 is what those specs meant. A closed, historical list: every spec
# written since records its scale.
_LEGACY_UINT8_BUILTINS = ("fashion-mnist", "mnist")


def pixel_scale(dtype: torch.dtype) -> float:
    """The scale that brings stored pixels of ``dtype`` to the range mean/std were measured in.

    ``uint8`` pixels are 0..255 and become ``[0, 1]``; floating-point storage (and integer types
    other than uint8, which the loaders convert to float32) is used as stored.
    """
    return UINT8_SCALE if dtype == torch.uint8 else 1.0


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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed dataset spec ({exc!r}); expected the keys of DatasetSpec") from None


class ArrayDataset(Dataset):
    """An in-memory image-classification dataset that normalizes on access.

    Images are kept as stored and multiplied by ``spec.scale`` on access (1/255 for ``uint8``
    pixels, 1.0 for float images), so a 60k-image set costs 47 MB rather than 188 MB. Besides the per-item
    ``Dataset`` protocol it offers :meth:`inputs` for whole batches, which the training loop
    uses to avoid 60k Python calls per epoch.

    Args:
        images: ``(N, C, H, W)`` tensor, ``uint8`` or floating point.
        labels: ``(N,)`` integer class indices.
        spec: The dataset's spec; its normalization (``scale``, ``mean``, ``std``) is applied by
            :meth:`inputs`, so what the spec declares is what the model sees.

    Raises:
        DataError: Shapes, labels or the spec's ``scale`` do not fit the images (a ``uint8`` set
            needs scale 1/255, a float set 1.0: :func:`pixel_scale`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec) -> None:
        if images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"image/label count mismatch: {images.shape[0]} images, labels of shape {tuple(labels.shape)}"
            )
        if tuple(images.shape[1:]) != tuple(spec.input_shape):
            raise DataError(f"images have shape {tuple(images.shape[1:])}, spec says {spec.input_shape}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            raise DataError(
                f"labels must lie in [0, {spec.num_classes - 1}], found [{int(labels.min())}, {int(labels.max())}]"
            )
        expected = pixel_scale(images.dtype)
        if spec.scale is None or not math.isclose(spec.scale, expected, rel_tol=1e-6):
            raise DataError(
                f"images stored as {str(images.dtype).removeprefix('torch.')} take pixel scale {expected:.6g}, but spec {spec.name!r} "
                f"declares scale {spec.scale!r}; build the spec with scale=kdedge.data.spec.pixel_scale(images.dtype) (or load the data with kdedge.load_dataset)"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.spec = spec
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        # x_norm = (x * scale - mean) / std = x * a + b, one fused multiply-add per batch. The
        # scale is the spec's own, the value exported metadata and manifests declare.
        self._a = spec.scale / std
        self._b = -mean / std
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs(torch.tensor([index]))[0], int(self.labels[index])

    def inputs(self, index: torch.Tensor | slice | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Normalized float32 inputs ``(B, C, H, W)`` for ``index`` (all when None)."""
        raw = self.images if index is None else self.images[index]
        if device is not None:
            raw = raw.to(device, non_blocking=True)
        a, b = self._a.to(raw.device), self._b.to(raw.device)
        return torch.addcmul(b, raw.to(torch.float32), a)

    def take(self, n: int | None) -> ArrayDataset:
        """The first ``n`` samples (all when None) — the sets are shuffled at the source."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"a data limit must be positive, got {n}")
        return ArrayDataset(self.images[:n], self.labels[:n], self.spec)

    def to(self, device: torch.device | str) -> ArrayDataset:
        """A copy whose tensors live on ``device`` (e.g. the whole set on a GPU)."""
        return ArrayDataset(self.images.to(device), self.labels.to(device), self.spec)

    def fingerprint(self) -> str:
        """sha256 of the stored images, labels and normalization: identifies the exact inputs."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(repr((tuple(self.images.shape), str(self.images.dtype), self.spec.mean, self.spec.std)).encode())
            h.update(np.ascontiguousarray(self.images.cpu().numpy()).tobytes())
            h.update(np.ascontiguousarray(self.labels.cpu().numpy()).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


@dataclass
class DataSplits:
    """A train and a test split sharing one spec."""

    train: ArrayDataset
    test: ArrayDataset
    spec: DatasetSpec

    def limit(self, train: int | None = None, test: int | None = None) -> DataSplits:
        return DataSplits(self.train.take(train), self.test.take(test), self.spec)
