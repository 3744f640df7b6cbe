"""Where data comes from: built-in datasets, directories of IDX files and ``.npz`` archives.

Built-in datasets are looked up, in order, in ``$KDEDGE_DATA/<name>``, ``~/.cache/kdedge/<name>``
(``$KDEDGE_CACHE`` overrides ``~/.cache/kdedge``) and ``/usr/share/datasets/<name>`` (Debian's
``dataset-fashion-mnist`` installs there). When none has the files, the official files are
downloaded into the cache and their sha256 checked; ``KDEDGE_OFFLINE=1`` skips the download.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdedge.data.idx import read_idx
from kdedge.data.spec import ArrayDataset, DatasetSpec, DataSplits, pixel_scale
from kdedge._fs import file_sha256
from kdedge.errors import DataError

__all__ = [
    "BUILTIN_DATASETS",
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


def cache_dir() -> Path:
    """kdedge's cache root: ``$KDEDGE_CACHE`` or ``~/.cache/kdedge``."""
    return Path(os.environ.get("KDEDGE_CACHE") or Path.home() / ".cache" / "kdedge")


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
    for role in _ROLES:
        file_name, sha = builtin.files[role]
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
        if all(_find_file(directory, builtin.files[r][0]) for r in _ROLES):
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
    hint = (
        f"{debian}put the four IDX files "
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


def _stack_images(images: np.ndarray, source: str) -> torch.Tensor:
    if images.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{source}: images must be (N, H, W) or (N, C, H, W), found shape {images.shape}")
    if images.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{source}: images must hold integer or floating-point pixels, found dtype {images.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        as_float = images.astype(np.float32)
    if not np.isfinite(as_float).all():
        raise DataError(f"{source}: images hold values that are not finite in float32 (NaN, inf or beyond ±3.4e38); clean the data")
    return torch.from_numpy(np.ascontiguousarray(as_float))


def _labels(labels: np.ndarray, source: str) -> torch.Tensor:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: labels must be a 1-D integer array, found {labels.dtype} of shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{source}: labels must be non-negative class indices, found {labels.min()}")
    if labels.size and labels.max() >= _MAX_CLASSES:
        raise DataError(f"{source}: labels go up to {labels.max()}; kdedge handles at most {_MAX_CLASSES:,} classes — are these class indices?")
    return torch.from_numpy(labels.astype(np.int64))


def _normalization(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64) * pixel_scale(images.dtype)  # the scale ArrayDataset applies
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _build(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    labels: tuple[str, ...] | None = None,
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    files: dict[str, str] | None = None,
) -> DataSplits:
    (xtr, ytr), (xte, yte) = train, test
    for split, (x, y) in (("train", train), ("test", test)):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{name}: image/label count mismatch in the {split} split: {x.shape[0]} images, {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise DataError(f"{name}: the {split} split is empty")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{name}: train images are {tuple(xtr.shape[1:])} but test images are {tuple(xte.shape[1:])}")
    if pixel_scale(xtr.dtype) != pixel_scale(xte.dtype):  # one spec, one scale: both splits must be stored alike
        raise DataError(f"{name}: train images are stored as {str(xtr.dtype).removeprefix('torch.')} but test images as "
                        f"{str(xte.dtype).removeprefix('torch.')}; store both splits as uint8 pixels, or both as float")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if labels is None:
        labels = tuple(str(i) for i in range(num_classes))
    elif len(labels) < num_classes:
        raise DataError(f"{name}: {len(labels)} label names but labels go up to {num_classes - 1}")
    mean, std = norm if norm is not None else _normalization(xtr)
    spec = DatasetSpec(
        name=name,
        input_shape=tuple(int(d) for d in xtr.shape[1:]),  # type: ignore[arg-type]
        num_classes=len(labels),
        labels=labels,
        mean=mean,
        std=std,
        scale=pixel_scale(xtr.dtype),  # derived from how the pixels are stored, never assumed
        files=files or {},
    )
    return DataSplits(ArrayDataset(xtr, ytr, spec), ArrayDataset(xte, yte, spec), spec)


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
    train = (_stack_images(arrays["train_images"], str(files["train_images"])),
             _labels(arrays["train_labels"], str(files["train_labels"])))
    test = (_stack_images(arrays["test_images"], str(files["test_images"])),
            _labels(arrays["test_labels"], str(files["test_labels"])))
    hashes = {role: file_sha256(path) for role, path in files.items()}
    return _build(name or str(directory), train, test, labels=labels, norm=norm, files=hashes)


def load_npz(path: str | Path, *, test_fraction: float = 1 / 7) -> DataSplits:
    """Load an ``.npz`` with ``x_train/y_train/x_test/y_test``, or ``x``/``y`` to be split.

    With only ``x`` and ``y`` a fixed permutation (seed 0) holds out ``test_fraction`` for
    testing, so the split is the same on every machine. An optional ``labels`` array names the
    classes. Pickled object arrays are refused.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected an .npz with arrays x and y") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc}); expected arrays x and y (or x_train/y_train/x_test/y_test)") from exc
    src = str(path)
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        train = (_stack_images(arrays["x_train"], src), _labels(arrays["y_train"], src))
        test = (_stack_images(arrays["x_test"], src), _labels(arrays["y_test"], src))
    elif {"x", "y"} <= arrays.keys():
        x, y = _stack_images(arrays["x"], src), _labels(arrays["y"], src)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{src}: image/label count mismatch: {x.shape[0]} images, {y.shape[0]} labels")
        n_test = max(1, int(round(x.shape[0] * test_fraction)))
        if x.shape[0] - n_test < 1:
            raise DataError(f"{src}: {x.shape[0]} samples are too few to split into train and test")
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        train = (x[order[n_test:]], y[order[n_test:]])
        test = (x[order[:n_test]], y[order[:n_test]])
    else:
        raise DataError(f"{src}: found arrays {sorted(arrays)}; expected x and y, or x_train, y_train, x_test and y_test")
    labels = None
    if "labels" in arrays:
        labels = tuple(str(v) for v in arrays["labels"].tolist())
    return _build(str(path), train, test, labels=labels, files={"npz": file_sha256(path)})


def load_dataset(name_or_path: str, *, train_limit: int | None = None, test_limit: int | None = None) -> DataSplits:
    """Load a built-in dataset by name, a directory of IDX files, or an ``.npz`` file.

    Args:
        name_or_path: ``"fashion-mnist"``, ``"mnist"``, a directory or an ``.npz`` path.
        train_limit: Keep only the first N training samples (for quick runs).
        test_limit: Keep only the first N test samples.

    Raises:
        DataError: Unknown name, missing or corrupt files.
    """
    builtin = BUILTIN_DATASETS.get(name_or_path)
    if builtin is not None:
        directory = _resolve_builtin(builtin)
        splits = load_idx_dir(directory, name=builtin.name, labels=builtin.labels, norm=(builtin.mean, builtin.std))
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            splits = load_idx_dir(path)
        elif path.suffix == ".npz":
            splits = load_npz(path)
        elif path.exists():
            raise DataError(f"{path}: unsupported data file; expected a directory of IDX files or an .npz archive")
        else:
            raise DataError(
                f"unknown dataset {name_or_path!r}: expected a built-in name ({', '.join(BUILTIN_DATASETS)}), "
                "a directory of IDX files or an .npz file"
            )
    return splits.limit(train_limit, test_limit)
