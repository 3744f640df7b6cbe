"""CIFAR-10 from its official binary archive, read without extracting it and without pickle.

The author's page (https://www.cs.toronto.edu/~kriz/cifar.html) ships three versions of the set.
kdedge reads only the binary one: the "python version" is pickled, and unpickling a file can run
code. The archive holds ``cifar-10-batches-bin/data_batch_1.bin`` … ``data_batch_5.bin`` (10,000
training records each) and ``test_batch.bin`` (10,000 test records). A record is 3,073 bytes: one
label byte (0-9), then the 32×32 image as three planes of 1,024 bytes — red, green, blue — each in
row-major order.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from kdedge.errors import DataError

__all__ = [
    "ARCHIVE",
    "CIFAR10_LABELS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FOLDER",
    "MIRRORS",
    "SHA256",
    "SIZE",
    "TEST_FILE",
    "TRAIN_FILES",
    "find_cifar10",
    "read_cifar10",
]

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and std of the 50,000 training images on [0, 1] pixels, in RGB order: the values
# in common use for CIFAR-10 (e.g. torchvision-based training scripts' Normalize((0.4914, 0.4822,
# 0.4465), (0.2470, 0.2435, 0.2616))). Quoted, not recomputed here.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

ARCHIVE = "cifar-10-binary.tar.gz"
# sha256 and size of the official archive as listed by TensorFlow Datasets in
# tensorflow/datasets: tensorflow_datasets/url_checksums/cifar10.txt (commit 333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5):
#   https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz  170052171  c4a38c50…a59bca1dd
# Other projects pin the same digest, one noting that the file also matched the md5 the author
# publishes (c32a1d4ab5d03f1284b67883e8d87530).
SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
SIZE = 170_052_171
MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
_FILES = (*TRAIN_FILES, TEST_FILE)

_SIDE, _CHANNELS = 32, 3
_RECORD = 1 + _CHANNELS * _SIDE * _SIDE  # 3,073 bytes: label + R, G, B planes
_MAX_RECORDS = 10_000  # every official batch holds exactly this many; a larger size is not CIFAR-10
_HINT = f"delete it and download {ARCHIVE} again from {MIRRORS[0]}"


def find_cifar10(dirs: Iterable[str | Path]) -> Path | None:
    """The first CIFAR-10 source in ``dirs``, as :func:`read_cifar10` would read it.

    A directory counts when it holds a complete extracted ``cifar-10-batches-bin/`` folder (all six
    ``.bin`` files), is such a folder itself, or holds ``cifar-10-binary.tar.gz``; the extracted
    folder wins because it reads without decompressing.

    Returns:
        The extracted folder or the archive file, or None when no directory holds either.
    """
    for directory in dirs:
        found = _holding(Path(directory))
        if found is not None:
            return found
    return None


def _holding(directory: Path) -> Path | None:
    for folder in (directory / FOLDER, directory):
        if all((folder / name).is_file() for name in _FILES):
            return folder
    if (directory / ARCHIVE).is_file():
        return directory / ARCHIVE
    return None


def read_cifar10(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10's binary version from the archive or from its extracted folder.

    Members are read from the archive in memory, never extracted to disk, and a member that is a
    link is refused rather than followed. Peak memory is about the raw records plus the returned
    arrays (~330 MB for the real set).

    Args:
        path: ``cifar-10-binary.tar.gz``, a directory holding it, a directory holding the extracted
            ``cifar-10-batches-bin/`` folder, or that folder itself.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images as (N, 32, 32, 3) uint8 in RGB order (NHWC),
        labels as (N,) int64 class indices into :data:`CIFAR10_LABELS`.

    Raises:
        DataError: Nothing CIFAR-10 at ``path``, or a missing, truncated or corrupt file.
    """
    source = _source(Path(path))
    if source.is_file():
        raw, where = _read_archive(source), {name: f"{source}:{FOLDER}/{name}" for name in _FILES}
    else:
        raw, where = _read_folder(source), {name: str(source / name) for name in _FILES}
    # pop: each file's bytes are dropped once its split is built, so at most raw + arrays are held.
    x_train, y_train = _split([raw.pop(name) for name in TRAIN_FILES], [where[name] for name in TRAIN_FILES])
    x_test, y_test = _split([raw.pop(TEST_FILE)], [where[TEST_FILE]])
    return x_train, y_train, x_test, y_test


def _source(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory; expected {ARCHIVE}, or a directory holding it or {FOLDER}/")
    found = _holding(path)
    if found is not None:
        return found
    if (path / FOLDER).is_dir():
        missing = [name for name in _FILES if not (path / FOLDER / name).is_file()]
        raise DataError(f"{path / FOLDER}: missing {', '.join(missing)}; extract {ARCHIVE} again or put the archive itself in {path}")
    raise DataError(f"{path}: holds neither {ARCHIVE} nor an extracted {FOLDER}/; download {MIRRORS[0]}{ARCHIVE} into it")


def _check_size(size: int, source: str) -> None:
    """Refuse a size that is not 1 to 10,000 whole records, before any byte is read."""
    if size == 0 or size % _RECORD or size > _MAX_RECORDS * _RECORD:
        raise DataError(
            f"{source}: {size:,} bytes is not 1 to {_MAX_RECORDS:,} whole {_RECORD:,}-byte CIFAR-10 records "
            f"(1 label + 32×32×3 pixels); the file is truncated or not the binary version — {_HINT}"
        )


def _read_folder(folder: Path) -> dict[str, np.ndarray]:
    raw = {}
    for name in _FILES:
        path = folder / name
        _check_size(path.stat().st_size, str(path))
        raw[name] = np.fromfile(path, dtype=np.uint8)
    return raw


def _read_archive(archive: Path) -> dict[str, np.ndarray]:
    """The six ``.bin`` members' bytes, streamed through once (``r|*``: no seeking back in the gzip)."""
    raw: dict[str, np.ndarray] = {}
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                base = name.removeprefix(f"{FOLDER}/")
                if name != f"{FOLDER}/{base}" or base not in _FILES:
                    continue  # batches.meta.txt, readme.html, the folder entry
                source = f"{archive}:{name}"
                if not member.isreg():
                    # extractfile() would follow a symlink or hard link to another member; refuse it instead.
                    kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "special entry"
                    raise DataError(f"{source} is a {kind}, expected a regular file; kdedge never follows links in archives — {_HINT}")
                if base in raw:
                    raise DataError(f"{source} appears twice in the archive; {_HINT}")
                _check_size(member.size, source)
                raw[base] = _read_member(tar, member, source)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{archive}: not a readable {ARCHIVE} ({exc}); {_HINT}") from exc
    missing = [name for name in _FILES if name not in raw]
    if missing:
        raise DataError(f"{archive}: no {', '.join(f'{FOLDER}/{n}' for n in missing)} in the archive; {_HINT}")
    return raw


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, source: str) -> np.ndarray:
    buf = np.empty(member.size, dtype=np.uint8)
    view = memoryview(buf)
    stream = tar.extractfile(member)
    if stream is None:  # only for non-regular members, which _read_archive refuses first
        raise DataError(f"{source}: not a regular file in the archive; {_HINT}")
    got = 0
    while got < member.size:
        n = stream.readinto(view[got:])
        if not n:
            raise DataError(f"{source}: ends after {got:,} of {member.size:,} bytes; the archive is truncated — {_HINT}")
        got += n
    return buf


def _split(raws: list[np.ndarray], sources: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Records of one split's files -> images (N, 32, 32, 3) uint8 and labels (N,) int64."""
    images, labels = [], []
    for raw, source in zip(raws, sources):
        _check_size(raw.size, source)
        records = raw.reshape(-1, _RECORD)
        label = records[:, 0]
        bad = np.flatnonzero(label >= len(CIFAR10_LABELS))
        if bad.size:
            raise DataError(f"{source}: record {bad[0]} has label {label[bad[0]]}, expected 0-9; the file is corrupt — {_HINT}")
        # (N, 3072) -> (N, C, H, W) planes -> (N, H, W, C); views until the concatenation below copies once.
        images.append(records[:, 1:].reshape(-1, _CHANNELS, _SIDE, _SIDE).transpose(0, 2, 3, 1))
        labels.append(label)
    # Into a C-ordered buffer: concatenate alone would keep the planes' (N, C, H, W) memory order.
    out = np.empty((sum(len(x) for x in images), _SIDE, _SIDE, _CHANNELS), dtype=np.uint8)
    np.concatenate(images, out=out)
    return out, np.concatenate(labels).astype(np.int64)
