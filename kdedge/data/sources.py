"""Where data comes from: built-in datasets, directories of IDX files and ``.npz`` archives.

Built-in datasets are looked up, in order, in ``$KDEDGE_DATA/<name>``, ``~/.cache/kdedge/<name>``
(``$KDEDGE_CACHE`` overrides ``~/.cache/kdedge``) and ``/usr/share/datasets/<name>`` (Debian's
``dataset-fashion-mnist`` installs there). When none has the files, the official files are
downloaded into the cache and their sha256 checked; ``KDEDGE_OFFLINE=1`` skips the download.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdedge.data import cifar
from kdedge.data.idx import read_idx
from kdedge.data.folders import is_image_folder, load_folder
from kdedge.data.spec import ArrayDataset, DatasetSpec, DataSplits, channel_mean_std, pixel_scale
from kdedge._fs import cache_dir, file_sha256
from kdedge.errors import DataError

__all__ = [
    "BUILTIN_DATASETS",
    "hold_out",
    "load_builtin",
    "load_data_for",
    "load_npy_dir",
    "BuiltinDataset",
    "cache_dir",
    "fetch_builtin",
    "find_builtin",
    "load_dataset",
    "load_idx_dir",
    "load_npz",
    "locate_dataset",
]

_ROLES = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset kdedge knows by name: its files, where to fetch them, and its constants."""

    name: str
    labels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: dict[str, tuple[str, str]]  # role -> (file name, sha256 of the official file)
    mirrors: tuple[str, ...]
    debian_package: str | None = None  # installs the files into /usr/share/datasets/<name>
    format: str = "idx"  # "idx": the four MNIST-style files; "cifar10": the binary CIFAR-10 archive (kdedge.data.cifar)


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "fashion-mnist": BuiltinDataset(
        name="fashion-mnist",
        labels=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mean=(0.2860,),
        std=(0.3530,),
        files={
            "train_images": ("train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        debian_package="dataset-fashion-mnist",
    ),
    "cifar10": BuiltinDataset(
        name="cifar10",
        labels=cifar.CIFAR10_LABELS,
        mean=cifar.CIFAR10_MEAN,
        std=cifar.CIFAR10_STD,
        files={"archive": (cifar.ARCHIVE, cifar.SHA256)},
        mirrors=cifar.MIRRORS,
        format="cifar10",
    ),
    "mnist": BuiltinDataset(
        name="mnist",
        labels=tuple(str(i) for i in range(10)),
        mean=(0.1307,),
        std=(0.3081,),
        files={
            "train_images": ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
}


def _search_dirs(name: str) -> list[Path]:
    dirs = []
    if os.environ.get("KDEDGE_DATA"):
        dirs.append(Path(os.environ["KDEDGE_DATA"]) / name)
    dirs += [cache_dir() / name, Path("/usr/share/datasets") / name]
    return dirs



def _find_file(directory: Path, file_name: str) -> Path | None:
    """``file_name`` (``*.gz``) or its uncompressed twin in ``directory``."""
    for candidate in (file_name, file_name.removesuffix(".gz")):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def fetch_builtin(builtin: BuiltinDataset, dest: Path, *, timeout: float = 30.0) -> None:
    """Download ``builtin``'s official files into ``dest``, checking each sha256.

    Each file is written to a temporary name and renamed only after its checksum matches.

    Raises:
        DataError: No mirror served a file with the expected checksum.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for file_name, sha in builtin.files.values():
        if _find_file(dest, file_name) is not None:
            continue
        errors = []
        for mirror in builtin.mirrors:
            url = mirror + file_name
            fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{file_name}.", suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out)
                got = file_sha256(tmp)
                if got != sha:
                    errors.append(f"{url}: sha256 {got[:12]}… != expected {sha[:12]}…")
                    continue
                tmp.replace(dest / file_name)
                break
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DataError("; ".join(errors))


def find_builtin(name: str) -> Path | None:
    """The first search directory that holds all four files of built-in dataset ``name``."""
    builtin = _builtin(name)
    for directory in _search_dirs(builtin.name):
        if builtin.format == "cifar10":
            if cifar.find_cifar10([directory]) is not None:
                return directory
        elif all(_find_file(directory, builtin.files[r][0]) for r in _ROLES):
            return directory
    return None


def _builtin(name: str) -> BuiltinDataset:
    try:
        return BUILTIN_DATASETS[name]
    except KeyError:
        raise DataError(f"unknown built-in dataset {name!r}; expected one of {', '.join(BUILTIN_DATASETS)}") from None


def locate_dataset(name: str) -> Path:
    """Find built-in dataset ``name`` locally or download it; returns its directory.

    Raises:
        DataError: Not found locally and the download failed (or ``KDEDGE_OFFLINE`` is set).
    """
    return _resolve_builtin(_builtin(name))


def _resolve_builtin(builtin: BuiltinDataset) -> Path:
    found = find_builtin(builtin.name)
    if found is not None:
        return found
    searched = ", ".join(str(d) for d in _search_dirs(builtin.name))
    debian = f"install Debian's {builtin.debian_package} package, or " if builtin.debian_package else ""
    what = "the four IDX files" if builtin.format == "idx" else "the archive"
    hint = (
        f"{debian}put {what} "
        f"({', '.join(f[0] for f in builtin.files.values())}) in $KDEDGE_DATA/{builtin.name}, "
        "or pass --data DIR"
    )
    if os.environ.get("KDEDGE_OFFLINE"):
        raise DataError(f"dataset {builtin.name!r} not found in {searched} and KDEDGE_OFFLINE is set; {hint}")
    dest = cache_dir() / builtin.name
    try:
        fetch_builtin(builtin, dest)
    except DataError as exc:
        raise DataError(f"dataset {builtin.name!r} not found in {searched} and the download failed ({exc}); {hint}") from exc
    return dest


_MAX_CLASSES = 100_000


_CHANNELS = (1, 3, 4)
_MAX_CONVERTED_BYTES = 2 << 30  # a memory-mapped array of another dtype converted to float32 in memory, at most
LAYOUTS = ("NCHW", "NHWC")


def _layout(shape: tuple[int, ...], source: str, layout: str | None) -> str:
    """NCHW or NHWC for a 4-D image array: ``layout`` when given, else what the shape says unambiguously."""
    if layout is not None:
        layout = layout.upper()
        if layout not in LAYOUTS:
            raise DataError(f"--layout must be NCHW or NHWC, got {layout!r}")
        channels = shape[1] if layout == "NCHW" else shape[3]
        if channels not in _CHANNELS:
            raise DataError(f"{source}: images of shape {shape} in {layout} have {channels} channels; expected 1, 3 or 4 — check --layout")
        return layout
    first, last = shape[1] in _CHANNELS, shape[3] in _CHANNELS
    if first and not last:
        return "NCHW"
    if last and not first:
        return "NHWC"
    if first and last and (shape[2] == shape[3]) != (shape[1] == shape[2]):  # one reading gives square images: (N, 1, 4, 4)
        return "NCHW" if shape[2] == shape[3] else "NHWC"
    if first and last:
        raise DataError(f"{source}: images of shape {shape} could be (N, C, H, W) or (N, H, W, C); pass --layout NCHW or --layout NHWC")
    if shape[1] < min(shape[2], shape[3]):  # another channel count (2 for a spectrogram pair, 8 bands...): the axis smaller than both others
        return "NCHW"
    if shape[3] < min(shape[1], shape[2]):
        return "NHWC"
    raise DataError(f"{source}: images of shape {shape} have no recognizable channel axis (1, 3 or 4 channels, or an axis smaller than "
                    "the two image sides) first (N, C, H, W) or last (N, H, W, C); pass --layout NCHW or --layout NHWC")


def _stack_images(images: np.ndarray, source: str, layout: str | None = None) -> tuple[torch.Tensor, str]:
    """The images as a tensor sharing ``images``' memory where the dtype allows, and their layout.

    ``uint8`` and ``float32`` pixels are used as stored (a memory-mapped file stays mapped); other
    integer and float types are converted to float32 — one copy, made chunk by chunk.
    """
    if images.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{source}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), found shape {images.shape}")
    found = _layout(images.shape, source, layout)
    if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{source}: images must hold integer or floating-point pixels, found dtype {images.dtype}")
    if images.dtype != np.uint8 and images.dtype != np.float32:
        if isinstance(images, np.memmap) and images.size * 4 > _MAX_CONVERTED_BYTES:
            raise DataError(f"{source}: {images.dtype} pixels ({images.size * 4 / 2**30:.1f} GiB as float32) would be converted in memory; "
                            "save the arrays as uint8 or float32 so they stay memory-mapped")
        with np.errstate(over="ignore", invalid="ignore"):
            images = images.astype(np.float32)
    if images.dtype == np.float32:
        step = max(1, (16 << 20) // max(1, math.prod(images.shape[1:])))
        for i in range(0, images.shape[0], step):  # chunked: a bool mask of the whole set would be as large as a uint8 copy
            if not np.isfinite(images[i : i + step]).all():
                raise DataError(f"{source}: images hold values that are not finite in float32 (NaN, inf or beyond ±3.4e38); clean the data")
    if not images.flags.c_contiguous:
        images = np.ascontiguousarray(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memory map: kdedge never writes to it
        return torch.from_numpy(images), found


def _labels(labels: np.ndarray, source: str) -> torch.Tensor:
    if labels.ndim == 2 and labels.shape[1] == 1:  # (N, 1), as Keras and many exporters write them
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: labels must be a 1-D (or (N, 1)) integer array, found {labels.dtype} of shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{source}: labels must be non-negative class indices, found {labels.min()}")
    if labels.size and labels.max() >= _MAX_CLASSES:
        raise DataError(f"{source}: labels go up to {labels.max()}; kdedge handles at most {_MAX_CLASSES:,} classes — are these class indices?")
    return torch.from_numpy(labels.astype(np.int64))


def _normalization(images: torch.Tensor, layout: str = "NCHW", rows: torch.Tensor | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the scaled pixels (of ``rows`` only, when given), read chunk by chunk."""
    stored = images.permute(0, 3, 1, 2) if layout == "NHWC" else images
    n = stored.shape[0] if rows is None else rows.shape[0]
    step = max(1, (8 << 20) // max(1, math.prod(stored.shape[1:])))
    chunks = (stored[i : i + step] if rows is None else stored[rows[i : i + step]] for i in range(0, n, step))
    return channel_mean_std(chunks, pixel_scale(images.dtype))  # the scale ArrayDataset applies


_Split = tuple[torch.Tensor, torch.Tensor, str]  # images as stored, labels (N,), layout


def _build(
    name: str,
    train: _Split,
    test: _Split,
    *,
    labels: tuple[str, ...] | None = None,
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    files: dict[str, str] | None = None,
    color: str | None = None,
) -> DataSplits:
    views = {}
    for split, (x, y, layout) in (("train", train), ("test", test)):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{name}: image/label count mismatch in the {split} split: {x.shape[0]} images, {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise DataError(f"{name}: the {split} split is empty")
        views[split] = x.permute(0, 3, 1, 2) if layout == "NHWC" else x
    xtr, xte = train[0], test[0]
    if views["train"].shape[1:] != views["test"].shape[1:]:
        raise DataError(f"{name}: train images are {tuple(views['train'].shape[1:])} (C, H, W) but test images are {tuple(views['test'].shape[1:])}")
    if pixel_scale(xtr.dtype) != pixel_scale(xte.dtype):  # one spec, one scale: both splits must be stored alike
        raise DataError(f"{name}: train images are stored as {str(xtr.dtype).removeprefix('torch.')} but test images as "
                        f"{str(xte.dtype).removeprefix('torch.')}; store both splits as uint8 pixels, or both as float")
    ytr, yte = train[1], test[1]
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if labels is None:
        labels = tuple(str(i) for i in range(num_classes))
    elif len(labels) < num_classes:
        raise DataError(f"{name}: {len(labels)} label names but labels go up to {num_classes - 1}")
    mean, std = norm if norm is not None else _normalization(xtr, train[2])
    shape = tuple(int(d) for d in views["train"].shape[1:])
    spec = DatasetSpec(
        name=name,
        input_shape=shape,  # type: ignore[arg-type]
        num_classes=len(labels),
        labels=labels,
        mean=mean,
        std=std,
        scale=pixel_scale(xtr.dtype),  # derived from how the pixels are stored, never assumed
        files=files or {},
        color=color or ("L" if shape[0] == 1 else None),  # three channels may be RGB or BGR: an array does not say
    )
    return DataSplits(ArrayDataset(xtr, ytr, spec, layout=train[2]), ArrayDataset(xte, yte, spec, layout=test[2]), spec)


def _idx_files(directory: Path) -> dict[str, Path]:
    patterns = {
        "train_images": ("train-images",),
        "train_labels": ("train-labels",),
        "test_images": ("t10k-images", "test-images"),
        "test_labels": ("t10k-labels", "test-labels"),
    }
    found: dict[str, Path] = {}
    names = sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    for role, prefixes in patterns.items():
        hits = [p for p in names if p.name.startswith(prefixes) and "idx" in p.name]
        if hits:
            found[role] = hits[0]
    missing = [r for r in _ROLES if r not in found]
    if missing:
        raise DataError(
            f"{directory}: no IDX file for {', '.join(missing)}; expected train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
        )
    return found


def load_idx_dir(
    directory: str | Path,
    *,
    name: str | None = None,
    labels: tuple[str, ...] | None = None,
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DataSplits:
    """Load a directory holding the four MNIST-style IDX files (gzipped or raw)."""
    directory = Path(directory)
    files = _idx_files(directory)
    arrays = {role: read_idx(path) for role, path in files.items()}
    train = (*_stack_images(arrays["train_images"], str(files["train_images"]), "NCHW" if arrays["train_images"].ndim == 4 else None),
             _labels(arrays["train_labels"], str(files["train_labels"])))
    test = (*_stack_images(arrays["test_images"], str(files["test_images"]), "NCHW" if arrays["test_images"].ndim == 4 else None),
            _labels(arrays["test_labels"], str(files["test_labels"])))
    train, test = (train[0], train[2], train[1]), (test[0], test[2], test[1])
    hashes = {role: file_sha256(path) for role, path in files.items()}
    return _build(name or str(directory), train, test, labels=labels, norm=norm, files=hashes)


def _from_arrays(arrays: dict[str, np.ndarray], src: str, *, layout: str | None, files: dict[str, str], test_fraction: float = 1 / 7) -> DataSplits:
    """Splits from ``x_train/y_train/x_test/y_test``, or from ``x``/``y`` with a fixed held-out test part."""
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        xtr, ltr = _stack_images(arrays["x_train"], src, layout)
        xte, lte = _stack_images(arrays["x_test"], src, layout)
        labels = _label_names(arrays, src)
        return _build(src, (xtr, _labels(arrays["y_train"], src), ltr), (xte, _labels(arrays["y_test"], src), lte), labels=labels, files=files)
    if {"x", "y"} <= arrays.keys():
        (x, lay), y = _stack_images(arrays["x"], src, layout), _labels(arrays["y"], src)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{src}: image/label count mismatch: {x.shape[0]} images, {y.shape[0]} labels")
        n_test = max(1, int(round(x.shape[0] * test_fraction)))
        if x.shape[0] - n_test < 1:
            raise DataError(f"{src}: {x.shape[0]} samples are too few to split into train and test")
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        train_rows, test_rows = order[n_test:], order[:n_test]
        # Both splits index the same stored array (no copy of a memory-mapped file); mean/std are the train rows'.
        whole = _build(src, (x, y, lay), (x, y, lay), labels=_label_names(arrays, src), files=files, norm=_normalization(x, lay, train_rows))
        return DataSplits(whole.train.subset(train_rows), whole.test.subset(test_rows), whole.spec)
    raise DataError(f"{src}: found arrays {sorted(arrays)}; expected x and y, or x_train, y_train, x_test and y_test")


def _label_names(arrays: dict[str, np.ndarray], src: str) -> tuple[str, ...] | None:
    if "labels" not in arrays:
        return None
    return tuple(str(v) for v in np.asarray(arrays["labels"]).tolist())


def load_npz(path: str | Path, *, test_fraction: float = 1 / 7, layout: str | None = None) -> DataSplits:
    """Load an ``.npz`` with ``x_train/y_train/x_test/y_test``, or ``x``/``y`` to be split.

    With only ``x`` and ``y`` a fixed permutation (seed 0) holds out ``test_fraction`` for
    testing, so the split is the same on every machine. An optional ``labels`` array names the
    classes. Pickled object arrays are refused. An ``.npz`` is read into memory whole (it is a
    zip); arrays larger than memory belong in ``.npy`` files (:func:`load_npy_dir`).

    Args:
        layout: ``"NCHW"`` or ``"NHWC"``; None recognizes it from the shape (a channel axis of 1,
            3 or 4 first or last), and refuses a shape that could be either.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected an .npz with arrays x and y") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc}); expected arrays x and y (or x_train/y_train/x_test/y_test)") from exc
    return _from_arrays(arrays, str(path), layout=layout, files={"npz": file_sha256(path)}, test_fraction=test_fraction)


_NPY_KEYS = ("x_train", "y_train", "x_test", "y_test", "x", "y", "labels")


def is_npy_dir(directory: Path) -> bool:
    """Whether ``directory`` holds kdedge's ``.npy`` layout (``x_train.npy`` ... or ``x.npy``/``y.npy``)."""
    return (directory / "x_train.npy").is_file() or (directory / "x.npy").is_file()


def load_npy_dir(directory: str | Path, *, test_fraction: float = 1 / 7, layout: str | None = None) -> DataSplits:
    """Load ``x_train.npy``, ``y_train.npy``, ``x_test.npy``, ``y_test.npy`` (or ``x.npy``/``y.npy``) memory-mapped.

    The pixel files are mapped, not read: batches are read from disk as they are used, so an
    array larger than memory trains (``uint8`` and ``float32`` pixels; other dtypes are converted
    in memory). An optional ``labels.npy`` names the classes. The provenance recorded is each
    file's size and modification time (hashing a 60 GB file would take a minute at every start).
    """
    directory = Path(directory)
    arrays: dict[str, np.ndarray] = {}
    stamps: dict[str, str] = {}
    for key in _NPY_KEYS:
        f = directory / f"{key}.npy"
        if not f.is_file():
            continue
        try:
            arrays[key] = np.load(f, mmap_mode="r" if key.startswith("x") else None, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{f}: not a readable .npy array ({exc}); save it with numpy.save(..., allow_pickle=False)") from exc
        st = f.stat()
        stamps[key] = f"size {st.st_size} mtime_ns {st.st_mtime_ns}"
    return _from_arrays(arrays, str(directory), layout=layout, files=stamps, test_fraction=test_fraction)


def load_builtin(builtin: BuiltinDataset) -> DataSplits:
    """A built-in dataset, found locally or downloaded (see :func:`locate_dataset`), with its published normalization."""
    directory = _resolve_builtin(builtin)
    if builtin.format == "cifar10":
        archive = cifar.find_cifar10([directory])
        xtr, ytr, xte, yte = cifar.read_cifar10(archive)  # type: ignore[arg-type]
        files = {"archive": file_sha256(archive)} if archive is not None and archive.is_file() else {}
        return _build(builtin.name, (torch.from_numpy(xtr), torch.from_numpy(ytr), "NHWC"), (torch.from_numpy(xte), torch.from_numpy(yte), "NHWC"),
                      labels=builtin.labels, norm=(builtin.mean, builtin.std), files=files, color="RGB")
    return load_idx_dir(directory, name=builtin.name, labels=builtin.labels, norm=(builtin.mean, builtin.std))


def hold_out(splits: DataSplits, fraction: float, *, seed: int = 0) -> DataSplits:
    """Move a fixed random ``fraction`` of the training samples (permutation ``seed``) into a validation split.

    The training split keeps its order; nothing is copied (both are subsets of the same storage).
    """
    if not 0 < fraction < 1:
        raise DataError(f"--val-split must be a fraction in (0, 1), got {fraction}")
    n = len(splits.train)
    n_val = int(round(n * fraction))
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"--val-split {fraction} of {n} training samples leaves {n_val} for validation and {n - n_val} for training; "
                        "both need at least one")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return DataSplits(splits.train.subset(order[n_val:].sort().values), splits.test, splits.spec, splits.train.subset(order[:n_val].sort().values))


def load_dataset(name_or_path: str, *, train_limit: int | None = None, test_limit: int | None = None, val_split: float | None = None,
                 image_size: int | None = None, layout: str | None = None, workers: int | None = None, decode_cache: bool = True,
                 norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> DataSplits:
    """Load a built-in dataset by name, an image folder, a directory of IDX or ``.npy`` files, or an ``.npz`` file.

    Args:
        name_or_path: ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"``, an image folder
            (``DIR/train/<class>/*.jpg`` and ``DIR/test/`` or ``DIR/val/``), a directory of IDX
            files or of ``x_train.npy``... (memory-mapped), or an ``.npz`` path.
        train_limit: Keep only N training samples (for quick runs), a seeded subset with every class in its
            share (:func:`~kdedge.data.spec.stratified_rows`), before ``val_split`` holds some out.
        test_limit: Keep only N test samples, chosen the same way.
        val_split: Hold out this fraction of the training samples for validation (fixed seed);
            an image folder's own ``val/`` (next to ``test/``) is used when this is None.
        image_size: Image folders: resize the shorter side and center-crop to this size.
        layout: Arrays: ``"NCHW"`` or ``"NHWC"`` when the shape is ambiguous.
        workers: Image folders: DataLoader worker processes decoding images.
        decode_cache: Image folders: training decodes each image once into kdedge's cache
            (:meth:`~kdedge.data.FolderDataset.prepare`).
        norm: Image folders: the ``(mean, std)`` to use instead of measuring them on a sample — a
            model's recorded normalization, when export or bench reload the folder it was trained on.

    Raises:
        DataError: Unknown name, missing or corrupt files, or options the data cannot take.
    """
    builtin = BUILTIN_DATASETS.get(name_or_path)
    path = Path(name_or_path).expanduser()
    folder = builtin is None and path.is_dir() and is_image_folder(path)
    if image_size is not None and not folder:
        raise DataError(f"--image-size applies to image folders (DIR/train/<class>/...), and {name_or_path!r} is not one; drop --image-size")
    if workers is not None and workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    if builtin is not None:
        splits = load_builtin(builtin)
    elif folder:
        splits = load_folder(path, image_size=image_size, workers=workers, decode_cache=decode_cache, norm=norm)
    elif path.is_dir():
        splits = load_npy_dir(path, layout=layout) if is_npy_dir(path) else load_idx_dir(path)
    elif path.suffix == ".npz":
        splits = load_npz(path, layout=layout)
    elif path.exists():
        raise DataError(f"{path}: unsupported data file; expected an image folder, a directory of IDX or .npy files, or an .npz archive")
    else:
        raise DataError(
            f"unknown dataset {name_or_path!r}: expected a built-in name ({', '.join(BUILTIN_DATASETS)}), "
            "an image folder (DIR/train/<class>/*.jpg), a directory of IDX or .npy files, or an .npz file"
        )
    splits = splits.limit(train_limit, test_limit)  # first: --train-limit 5000 --val-split 0.1 trains on 4,500 and validates on 500
    if val_split is not None:
        if splits.val is not None:
            raise DataError(f"{path}: has its own val/ folder, so --val-split would hold out a second validation set; drop --val-split")
        splits = hold_out(splits, val_split)
    return splits


def load_data_for(config: Any) -> DataSplits:
    """The data a run config names (``config.data``), with its data options: limits, validation split, image size, layout, workers."""
    return load_dataset(config.data, train_limit=config.train_limit, test_limit=config.test_limit, val_split=config.val_split,
                        image_size=config.image_size, layout=config.layout, workers=config.workers, decode_cache=config.decode_cache)
