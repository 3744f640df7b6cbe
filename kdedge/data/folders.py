"""Image folders: ``DIR/train/<class>/*.jpg`` (and ``test/``, ``val/``), decoded with Pillow in DataLoader workers.

The layout is torchvision's ImageFolder convention: one sub-folder per class, class index =
position of the folder name in sorted order, images anywhere below it (JPEG, PNG, WebP, BMP).
Files are listed and their headers read once, at load time, so a non-image file, an empty class
or images of mixed sizes are reported before any training is paid for; pixels are decoded only
when a batch needs them, so memory does not grow with the number of images.

The transform is the one every exported artifact declares (:class:`ImageTransform`):
``ImageOps.exif_transpose`` (photos from phones carry their rotation in EXIF), conversion to
``L`` or ``RGB``, and — with ``image_size`` — a bilinear resize of the shorter side to
``image_size`` followed by a center crop to ``image_size × image_size``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdedge._fs import atomic_file, cache_dir
from kdedge.data.spec import UINT8_SCALE, DatasetSpec, DataSplits, ImageDataset, channel_mean_std, stratified_rows
from kdedge.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "FolderDataset", "ImageTransform", "default_workers", "is_image_folder", "load_folder", "resize_and_crop", "write_image_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_WIDE_GRAY = ("I", "I;16", "I;16B", "I;16L")
#: Training images whose pixels give the recorded mean and std.
NORM_SAMPLE = 1000


def default_workers() -> int:
    """DataLoader worker processes decoding images: one per core, at most 8.

    Measured on 2 cores (``benchmarks/folders.py``): the workers decode while the main process
    trains, and the training step's own threads leave them enough time.
    """
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


@dataclass(frozen=True)
class ImageTransform:
    """How a stored image file becomes a ``(C, H, W)`` uint8 array — the deployment's preprocessing too.

    Attributes:
        color: Pillow mode the image is converted to: ``"L"`` (1 channel) or ``"RGB"`` (3).
        size: ``(H, W)`` of the result.
        resize: Shorter side after a bilinear resize, before the center crop to ``size``; None
            uses images as they are (they must all be ``size``).
    """

    color: str
    size: tuple[int, int]
    resize: int | None = None

    def __call__(self, path: str | Path) -> np.ndarray:
        from PIL import Image, ImageOps

        with Image.open(path) as image:
            # exif_transpose parses the EXIF block: only for files that carry one (most PNGs do not; 49 µs per image saved).
            if "exif" in image.info:
                image = ImageOps.exif_transpose(image)
            if image.mode in _WIDE_GRAY:  # 16/32-bit grayscale: its top 8 bits (convert("L") would clip at 255)
                image = Image.fromarray(_top_byte(np.asarray(image)))
            image = image.convert(self.color) if image.mode != self.color else image
            if self.resize is not None:
                image = resize_and_crop(image, self.resize, self.size)
            elif image.size != (self.size[1], self.size[0]):
                raise DataError(f"{path}: image is {image.size[0]}×{image.size[1]}, the others are {self.size[1]}×{self.size[0]}; "
                                "pass --image-size N to resize them all")
            array = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, C), read while the file is open
        return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))  # -> (C, H, W)


def _top_byte(pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels from 16-bit (or, when values exceed 16 bits, 32-bit) grayscale."""
    pixels = pixels.astype(np.int64)
    shift = 8 if pixels.max(initial=0) < 65536 else 24
    return (pixels >> shift).clip(0, 255).astype(np.uint8)


def resize_and_crop(image: Any, shorter: int, size: tuple[int, int]) -> Any:
    """Resize ``image`` (a PIL image) so its shorter side is ``shorter`` (bilinear), then center-crop to ``size`` ``(H, W)``.

    The arithmetic is torchvision's ``Resize(shorter)`` + ``CenterCrop(size)``: the longer side
    becomes ``int(shorter * long / short)``, the crop's corner ``round((W' - W) / 2)``.
    """
    from PIL import Image

    w, h = image.size
    if w <= h:
        new = (shorter, int(shorter * h / w))
    else:
        new = (int(shorter * w / h), shorter)
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BILINEAR)
    ch, cw = size
    left, top = round((new[0] - cw) / 2.0), round((new[1] - ch) / 2.0)
    return image.crop((left, top, left + cw, top + ch))


def is_image_folder(directory: Path) -> bool:
    """Whether ``directory`` has a ``train/`` folder of class folders."""
    train = directory / "train"
    return train.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in train.iterdir())


@dataclass
class _Listing:
    """The files of one split: paths relative to the root, labels, and (size, mtime_ns) per file."""

    files: np.ndarray  # (N,) bytes
    labels: np.ndarray  # (N,) int64
    stats: np.ndarray  # (N, 2) int64
    sizes: dict[tuple[int, int], str]  # (width, height) -> one file of that size
    modes: set[str]


def _list_split(root: Path, split: str, classes: list[str]) -> _Listing:
    files: list[str] = []
    labels: list[int] = []
    stats: list[tuple[int, int]] = []
    sizes: dict[tuple[int, int], str] = {}
    modes: set[str] = set()
    from PIL import Image, UnidentifiedImageError

    for label, cls in enumerate(classes):
        class_dir = root / split / cls
        if not class_dir.is_dir():
            continue
        found = 0
        seen: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True, onerror=_walk_error):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:  # a symbolic link back up the tree
                raise DataError(f"{dirpath}: a symbolic link loop (this folder is already listed above); remove the link")
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name in ("Thumbs.db", "desktop.ini"):
                    continue  # what file managers leave behind
                path = Path(dirpath) / name
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DataError(f"{path}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); move it out of {root / split}")
                try:
                    with Image.open(path) as image:  # reads the header only
                        sizes.setdefault(image.size[::-1] if _exif_rotates(image) else image.size, str(path))  # as displayed
                        modes.add(image.mode)
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                    raise DataError(f"{path}: cannot be read as an image ({exc}); remove or replace the file") from None
                st = path.stat()
                files.append(os.fsencode(path.relative_to(root)))  # bytes: any file name the OS allows, UTF-8 or not
                labels.append(label)
                stats.append((st.st_size, st.st_mtime_ns))
                found += 1
        if found == 0:
            raise DataError(f"{class_dir}: empty class folder; put its images in it or remove the folder")
    return _Listing(np.array(files, dtype=np.bytes_) if files else np.array([], dtype="S1"), np.array(labels, dtype=np.int64),
                    np.array(stats, dtype=np.int64).reshape(-1, 2), sizes, modes)


def _walk_error(exc: OSError) -> None:
    raise DataError(f"{exc.filename}: cannot be listed ({exc.strerror}); check its permissions") from None


def _exif_rotates(image: Any) -> bool:
    if "exif" not in image.info:  # getexif() on a PNG without an EXIF chunk would decode the whole image to look for one
        return False
    try:
        return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap width and height
    except Exception:  # noqa: BLE001 — a malformed EXIF block: Pillow's exif_transpose leaves such an image as it is
        return False


def _classes(root: Path, split: str) -> list[str]:
    return sorted(p.name for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith("."))


class _DecodedFile:
    """A file of decoded uint8 images, ``C·H·W`` bytes each, read a batch at a time with ``pread``."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape, self.row = path, tuple(shape), math.prod(shape)
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, rows: np.ndarray) -> torch.Tensor:
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        flat = out.reshape(len(rows), -1)
        for j, r in enumerate(rows.tolist()):
            if os.preadv(self.fd, [flat[j]], r * self.row) != self.row:
                raise DataError(f"{self.path}: the decoded-image cache is shorter than expected; delete it (kdedge rebuilds it)")
        return torch.from_numpy(out)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            os.close(self.fd)


def _decode_to(data: FolderDataset, path: Path, row: int, progress: Any) -> None:
    """Decode all of ``data`` (with its workers) into ``path``, written under a temporary name and renamed when complete."""
    start = time.perf_counter()
    task = progress.add("decoding images", len(data)) if progress is not None else None
    with atomic_file(path, fsync=True) as tmp, open(tmp, "wb") as f:
        f.truncate(len(data) * row)
        batch = max(1, min(256, (16 << 20) // row))
        for index, x in data.raw_batches(torch.arange(len(data)).split(batch)):
            f.seek(int(index[0]) * row)
            f.write(memoryview(np.ascontiguousarray(x.numpy())).cast("B"))
            if task is not None:
                progress.update(task, advance=len(index))
    if task is not None:
        seconds = time.perf_counter() - start
        progress.finish(task, f"data: decoded {len(data):,} images once in {seconds:.1f} s ({len(data) / max(seconds, 1e-9):,.0f} images/s); "
                              f"later passes read {path}")


class _Decode(Dataset):
    """Runs in DataLoader workers: index -> (index, pixels or None, error or None)."""

    def __init__(self, data: FolderDataset) -> None:
        self.root, self.files, self.transform = data.root, data.files, data.transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        path = self.root / os.fsdecode(self.files[i])
        try:
            return i, self.transform(path), None
        except DataError as exc:
            return i, None, str(exc)
        except Exception as exc:  # noqa: BLE001 — Pillow's errors for truncated, corrupt or huge data (OSError, SyntaxError, DecompressionBombError...)
            return i, None, f"{path}: cannot be decoded ({type(exc).__name__}: {exc}); remove or replace the file"


def _collate(items: list[tuple[int, np.ndarray | None, str | None]]) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    errors = [e for _i, _x, e in items if e is not None]
    index = torch.tensor([i for i, _x, _e in items], dtype=torch.int64)
    if errors:
        return index, None, errors[0]
    return index, torch.from_numpy(np.stack([x for _i, x, _e in items])), None  # type: ignore[misc]


class FolderDataset(ImageDataset):
    """Labelled image files under ``root``, decoded a batch at a time (see :mod:`kdedge.data.folders`).

    Args:
        root: The folder the file paths are relative to.
        files: ``(N,)`` relative paths, as bytes.
        labels: ``(N,)`` class indices.
        stats: ``(N, 2)`` file size and modification time (ns): with the paths they identify the
            images for the teacher-logit cache without reading every file (a file rewritten with
            the same size within the same nanosecond would go unnoticed; the cache is also checked
            against the teacher's outputs on a few images).
        spec: The dataset's spec.
        transform: File -> ``(C, H, W)`` uint8.
        workers: DataLoader worker processes for :meth:`batches` (0 decodes in this process).
        decode_cache: Let :meth:`prepare` decode every image once into kdedge's cache, so later
            passes read pixels instead of decoding files (see :meth:`prepare`).
    """

    def __init__(self, root: Path, files: np.ndarray, labels: torch.Tensor, stats: np.ndarray, spec: DatasetSpec, transform: ImageTransform,
                 *, workers: int | None = None, decode_cache: bool = True) -> None:
        super().__init__(labels, spec)
        self.root, self.files, self.stats, self.transform = root, files, stats, transform
        self.workers = default_workers() if workers is None else workers
        self.decode_cache = decode_cache
        self._decoded: _DecodedFile | None = None
        self._decoded_rows: np.ndarray | None = None  # a subset's rows in its parent's decoded file

    def prepare(self, progress: Any = None) -> None:
        """Decode every image once into ``<cache>/decoded/<key>.u8`` (uint8 ``(N, C, H, W)``) and read pixels from it from now on.

        The transform is deterministic (augmentation happens later, on batches), so a decoded
        image is the same on every pass: the first pass decodes with the workers, later passes
        read ``C·H·W`` bytes per image with ``pread`` — as fast as an array, and with no memory
        that grows with the dataset (no mapping: each batch is read into its own buffer). The key
        is the file listing (paths, sizes, mtimes) and the transform. Skipped when the decoded
        set would take more than half the free disk space, or with ``decode_cache=False``.
        """
        if not self.decode_cache or self._decoded is not None or len(self) == 0:
            return
        row = math.prod(self.spec.input_shape)
        directory = cache_dir() / "decoded"
        key = hashlib.sha256(f"kdedge-decoded-v1|{self.transform!r}|{self.spec.input_shape}|{self.listing_sha256()}".encode()).hexdigest()
        path = directory / f"{key}.u8"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not (path.is_file() and path.stat().st_size == len(self) * row):
                if len(self) * row > shutil.disk_usage(directory).free / 2:
                    if progress is not None:
                        progress.line(f"data: {len(self) * row / 2**30:.1f} GiB of decoded pixels would take over half the free space in "
                                      f"{directory}; decoding every pass instead")
                    return
                _decode_to(self, path, row, progress)
            self._decoded = _DecodedFile(path, self.spec.input_shape)
        except OSError as exc:  # an unwritable cache, a full disk: train on, decoding every pass
            if progress is not None:
                progress.line(f"data: cannot cache decoded images in {directory} ({exc.strerror or exc}); decoding every pass instead")

    def raw(self, index: torch.Tensor) -> torch.Tensor:
        if self._decoded is not None:
            rows = torch.as_tensor(index).reshape(-1).numpy()
            return self._decoded.read(rows if self._decoded_rows is None else self._decoded_rows[rows])
        decode = _Decode(self)
        _index, x, error = _collate([decode[int(i)] for i in index])
        if error is not None:
            raise DataError(error)
        return x if x is not None else torch.empty(0, *self.spec.input_shape, dtype=torch.uint8)

    def subset(self, rows: torch.Tensor) -> FolderDataset:
        r = torch.as_tensor(rows, dtype=torch.int64).reshape(-1).numpy()
        child = FolderDataset(self.root, self.files[r], self.labels[r], self.stats[r], self.spec, self.transform, workers=self.workers,
                              decode_cache=self.decode_cache)
        if self._decoded is not None:  # a shard or a limit of a prepared set reads the same decoded file
            child._decoded, child._decoded_rows = self._decoded, (r if self._decoded_rows is None else self._decoded_rows[r])
        return child

    def raw_batches(self, index_batches: Iterable[torch.Tensor], *, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(index, stored pixels)`` for each batch of sample indices, in order, decoded by the worker processes."""
        batches = [torch.as_tensor(b).cpu().tolist() for b in index_batches]
        if self._decoded is not None or self.workers == 0 or len(batches) <= 1:
            for b in batches:
                idx = torch.tensor(b, dtype=torch.int64)
                yield idx, self.raw(idx)
            return
        loader = DataLoader(_Decode(self), batch_sampler=batches, num_workers=self.workers, collate_fn=_collate, prefetch_factor=4,
                            pin_memory=pin_memory)
        with _sigchld_restored():
            for index, x, error in loader:
                if error is not None:
                    raise DataError(error)
                yield index, x

    def batches(self, index_batches: Iterable[torch.Tensor], *, device: torch.device | str | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        pin = torch.device(device or "cpu").type == "cuda"
        for index, x in self.raw_batches(index_batches, pin_memory=pin):
            yield index, self.normalize(x, device), self.labels[index].to(device or "cpu")

    def _identity(self, h: hashlib._Hash) -> None:  # type: ignore[name-defined]
        h.update(f"{self.transform!r}|{self.listing_sha256()}".encode())

    def listing_sha256(self) -> str:
        """sha256 of the relative paths, sizes and modification times: this split's files, wherever the folder lies."""
        return _listing_sha256(self.files, self.stats)


@contextlib.contextmanager
def _sigchld_restored() -> Iterator[None]:
    """The process's SIGCHLD handler as it was before, once the DataLoader's workers are done.

    torch installs a Python SIGCHLD handler for its first worker DataLoader and leaves it for the
    life of the process. With it installed, a process that has opened and closed OpenVINO models
    compiled for different thread counts (runtime tuning does) dies of SIGSEGV at the next child
    that exits (a ``subprocess.run``): measured with openvino 2026.4.1, any Python-level SIGCHLD
    handler, even a no-op, does it; the default disposition does not. Worker deaths are still
    reported by torch's own liveness check while the loader runs.
    """
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGCHLD) if main and hasattr(signal, "SIGCHLD") else None
    try:
        yield
    finally:
        if saved is not None and signal.getsignal(signal.SIGCHLD) is not saved:
            signal.signal(signal.SIGCHLD, saved)


def _listing_sha256(files: np.ndarray, stats: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(b"\0".join(files.tolist()))
    h.update(np.ascontiguousarray(stats).tobytes())
    return h.hexdigest()


def _split_dirs(root: Path) -> tuple[str, str | None]:
    """(test split folder, validation folder or None): ``test/`` (with ``val/`` for validation), else ``val/`` as the test split."""
    has = {s: (root / s).is_dir() for s in ("test", "val")}
    if has["test"]:
        return "test", "val" if has["val"] else None
    if has["val"]:
        return "val", None
    raise DataError(f"{root}: has train/ but no test/ or val/ folder; add DIR/test/<class>/ images to score the models on")


def load_folder(root: str | Path, *, image_size: int | None = None, workers: int | None = None,
                norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None, decode_cache: bool = True) -> DataSplits:
    """Load ``root/train/<class>/*`` with ``root/test/`` (or ``root/val/``) — and ``root/val/`` as validation when both exist.

    Args:
        root: The folder holding ``train/`` and ``test/`` or ``val/``.
        image_size: Resize the shorter side to this and center-crop a square; None uses the
            images as they are (they must then all have one size).
        workers: DataLoader worker processes decoding images (default :func:`default_workers`).
        norm: ``(mean, std)`` to record instead of measuring them on :data:`NORM_SAMPLE`
            training images (a model's recorded normalization, say).
        decode_cache: Let training decode each image once into kdedge's cache (:meth:`FolderDataset.prepare`).

    Raises:
        DataError: A missing split, an empty class folder, a file that is not an image, a test or
            validation class missing from ``train/``, or mixed sizes without ``image_size``.
    """
    root = Path(root).expanduser()
    if image_size is not None and image_size < 8:
        raise DataError(f"--image-size must be at least 8 pixels, got {image_size}")
    classes = _classes(root, "train")
    if len(classes) < 2:
        raise DataError(f"{root / 'train'}: found {len(classes)} class folder(s); expected one folder per class, at least 2")
    test_dir, val_dir = _split_dirs(root)
    listings = {"train": _list_split(root, "train", classes)}
    for split in (test_dir, val_dir):
        if split is None:
            continue
        extra = sorted(set(_classes(root, split)) - set(classes))
        if extra:
            raise DataError(f"{root / split}: has class folder(s) {', '.join(extra[:5])} that train/ lacks; every class needs training images "
                            "(add them to train/ or remove them here)")
        listings[split] = _list_split(root, split, classes)
        if len(listings[split].files) == 0:
            raise DataError(f"{root / split}: holds no images; expected {split}/<class>/ folders of images")
    sizes = {s: f for listing in listings.values() for s, f in listing.sizes.items()}
    if image_size is None and len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise DataError(f"{root}: images have different sizes ({f1} is {s1[0]}×{s1[1]}, {f2} is {s2[0]}×{s2[1]}); "
                        "pass --image-size N to resize the shorter side to N and center-crop N×N")
    color = "L" if all(m in _GRAY_MODES for listing in listings.values() for m in listing.modes) else "RGB"
    if image_size is not None:
        hw = (image_size, image_size)
    else:
        (w, h), = sizes.keys()
        hw = (h, w)
    transform = ImageTransform(color=color, size=hw, resize=image_size)
    channels = 1 if color == "L" else 3
    spec = DatasetSpec(name=str(root), input_shape=(channels, *hw), num_classes=len(classes), labels=tuple(classes),
                       mean=(0.0,) * channels, std=(1.0,) * channels, scale=UINT8_SCALE, color=color, resize=image_size,
                       files={f"{s}_listing": _listing_sha256(lst.files, lst.stats) for s, lst in listings.items()})

    def dataset(listing: _Listing, spec: DatasetSpec) -> FolderDataset:
        return FolderDataset(root, listing.files, torch.from_numpy(listing.labels), listing.stats, spec, transform, workers=workers,
                             decode_cache=decode_cache)

    if norm is None:  # measured on stored pixels: the placeholder mean/std above play no part
        norm = _sample_normalization(dataset(listings["train"], spec))
    spec = dataclasses.replace(spec, mean=norm[0], std=norm[1])
    final = {s: dataset(lst, spec) for s, lst in listings.items()}
    return DataSplits(final["train"], final[test_dir], spec, final[val_dir] if val_dir else None)


def _sample_normalization(train: FolderDataset, n: int = NORM_SAMPLE) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the pixels (scaled to [0, 1]) of ``n`` training images, a stratified subset drawn with seed 0."""
    rows = stratified_rows(train.labels, n)
    return channel_mean_std((raw for _idx, raw in train.raw_batches(rows.split(100))), UINT8_SCALE)


def write_image_folder(root: str | Path, split: str, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], *,
                       format: str = "png", quality: int = 95) -> list[Path]:
    """Write ``images`` as ``root/split/<class>/<index>.<format>``: the layout :func:`load_folder` reads.

    Args:
        images: ``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, H, W, 3)`` uint8 pixels (RGB).
        labels: ``(N,)`` class indices into ``class_names``.
        format: ``png`` (lossless), ``jpeg`` or ``webp``.
        quality: JPEG/WebP quality.

    Returns:
        The files written, in order.
    """
    from PIL import Image

    ext = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}[format.lower()]
    paths = []
    width = len(str(max(len(images) - 1, 0)))
    for i, (pixels, label) in enumerate(zip(images, labels)):
        pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
        path = Path(root) / split / class_names[int(label)] / f"{i:0{width}d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)  # only classes with images get a folder: an empty one is refused
        options = {} if ext == "png" else {"quality": quality}
        Image.fromarray(np.ascontiguousarray(pixels)).save(path, **options)
        paths.append(path)
    return paths
