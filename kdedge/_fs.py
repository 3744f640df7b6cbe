"""Atomic output: a directory or file appears whole under its final name, or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "atomic_write_bytes", "default_out", "file_sha256", "new_dir", "umask"]


def cache_dir() -> Path:
    """kdedge's cache root: ``$KDEDGE_CACHE`` or ``~/.cache/kdedge``."""
    return Path(os.environ.get("KDEDGE_CACHE") or Path.home() / ".cache" / "kdedge")


def umask() -> int:
    """The process's umask (reading it means setting it; it is restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; rename it to ``out`` when the block succeeds.

    The rename fails if ``out`` appeared meanwhile (never merge into another directory). On any
    error, including KeyboardInterrupt, the temporary directory is removed.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a published directory follows the umask
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed over ``path`` when the block succeeds, removed when it fails.

    Readers see the old file, no file, or the whole new one. The file gets the permissions the
    umask gives any new file (``mkstemp`` would leave 0600 on a shared cache); ``fsync`` flushes it
    to disk before the rename, so a crash cannot leave a full-size file of zeros under ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_out(kind: str) -> Path:
    """Where a command writes when no ``--out`` is given: ``runs/<kind>-<local time>``."""
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_dir(out: str | Path | None, kind: str) -> Path:
    """``out`` (or :func:`default_out`) as a directory that does not exist yet.

    Raises:
        ConfigError: It exists; every command refuses to write into an existing directory.
    """
    from kdedge.errors import ConfigError

    path = Path(out) if out is not None else default_out(kind)
    if path.exists():
        raise ConfigError(f"output directory {path} already exists; pass another --out or remove it")
    return path
