"""Atomic output: a directory or file appears whole under its final name, or not at all."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Claim", "WorkDir", "atomic_dir", "atomic_file", "atomic_write_bytes", "claim_file", "claim_out", "claim_workdir", "claimed", "default_out",
           "file_lock", "file_sha256", "partial_dir",
           "publish_dir", "umask"]


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
    with _staged(out) as tmp:
        yield tmp
        os.rename(tmp, out)


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` (hidden, the umask's permissions), removed when the block raises, including KeyboardInterrupt."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a published directory follows the umask
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _numbered(base: Path, suffix: str = "") -> Iterator[Path]:
    """``base``, then ``base-2``, ``base-3``, ...: candidate names for a run that must not take another's (each with ``suffix``)."""
    yield base.with_name(base.name + suffix)
    for i in itertools.count(2):
        yield base.with_name(f"{base.name}{suffix}-{i}")


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


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created when missing) for the block: one process at a time, others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_out(kind: str) -> Path:
    """The name a command writes to when no ``--out`` is given: ``runs/<kind>-<local time>``.

    Only a name: :func:`claim_out` makes it unique (``-2``, ``-3``, ... when another run took it
    within the same second).
    """
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def partial_dir(out: Path) -> Path:
    """``OUT.partial``: where a training run writing ``OUT`` keeps its per-epoch checkpoint until it finishes."""
    return out.with_name(out.name + ".partial")


def claim_file(out: Path) -> Path:
    """``.OUT.claim``: the lock file a process holds while it writes ``OUT`` (hidden; removed when the run ends)."""
    return out.with_name(f".{out.name}.claim")


class Claim:
    """An output directory reserved by this process: ``OUT`` did not exist, and ``.OUT.claim`` is locked by it.

    Two runs can never write the same ``OUT``: the second one's claim fails at start (an explicit
    ``--out``) or takes the next free name (a default one). The lock dies with its process, so a
    killed run's name is free again; a training checkpoint it left in ``OUT.partial/`` is only
    continued by ``--resume``, and never silently overwritten.
    """

    def __init__(self, path: Path, lock: Any) -> None:
        self.path, self.partial, self._lock = path, partial_dir(path), lock  # lock None: a name another process holds (a DDP rank's view)

    def release(self, *, keep: bool = False) -> None:
        """Give the name back; ``keep`` leaves ``OUT.partial`` (a checkpoint to resume from) in place."""
        if self._lock is None:
            return
        if not keep:
            shutil.rmtree(self.partial, ignore_errors=True)
        _unlock(self._lock, claim_file(self.path))
        self._lock = None


def _lock(path: Path) -> Any | None:
    """``path`` opened and exclusively ``flock``-ed by this process, or None when a live process holds it."""
    while True:
        # Read-only suffices for flock: a claim file a killed run of another user left (mode 0644) is taken over, not a PermissionError.
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_CREAT, 0o666), "rb")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(f.fileno()).st_ino:
            return f
        f.close()  # its owner unlinked it between our open and our lock: lock the file that is there now


def _unlock(lock: Any, path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()  # while still locked: whoever opened the old file sees it is gone (see _lock) and retries
    lock.close()  # releases the flock


def _take(out: Path, *, resume: bool, checkpoint: str | tuple[str, ...]) -> tuple[Any | None, str | None]:
    """Try to claim ``out``: ``(the locked claim file, None)``, or ``(None, why not)``."""
    exists = f"output directory {out} already exists; pass another --out or remove it"
    if out.exists() or out.is_symlink():
        return None, exists
    lock = _lock(claim_file(out))
    if lock is None:
        return None, f"another kdedge process is writing {out} now; pass another --out, or wait for it to finish"
    partial = partial_dir(out)
    names = (checkpoint,) if isinstance(checkpoint, str) else checkpoint
    held = any((partial / n).is_file() for n in names)
    why = None
    if out.exists() or out.is_symlink():  # published by the process that held the name until a moment ago
        why = exists
    elif resume and not held:
        why = f"--resume: no checkpoint at {partial / names[0]}; the run to resume never finished an epoch there — run again without --resume"
    elif not resume and held:
        why = f"{partial} holds the checkpoint of an unfinished run; continue it with --resume, or remove {partial} to start over"
    if why is not None:
        _unlock(lock, claim_file(out))
        return None, why
    if not resume and (partial.exists() or partial.is_symlink()):  # left without a checkpoint by a killed process: nothing to keep
        shutil.rmtree(partial) if partial.is_dir() and not partial.is_symlink() else partial.unlink()
    return lock, None


def _writable_parent(path: Path, kind: str) -> None:
    """``path``'s parent exists (made when missing) and is writable, before anything else is paid for."""
    from kdedge.errors import ConfigError

    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {directory} for the {kind} output ({exc.strerror}); pass an --out in a writable place") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{directory} is not writable, so the {kind} output cannot be written there; pass an --out in a writable place")


def claim_out(out: str | Path | None, kind: str, *, resume: bool = False, checkpoint: str | tuple[str, ...] = "checkpoint.pt") -> Claim:
    """Reserve the directory a run will publish, when the run starts: ``out``, or a fresh ``runs/<kind>-<time>[-N]``.

    Args:
        out: The directory to write; None: a default name, made unique against other runs started in the same second.
        kind: The command (``train``, ``export``, ``bundle``...), for the default name.
        resume: Continue a killed run: ``OUT.partial/<checkpoint>`` must exist (and is kept).
        checkpoint: The file in ``OUT.partial`` that makes a run resumable (or several: any one of them does).

    Raises:
        ConfigError: ``out`` exists, another live process is writing it, or its ``.partial`` holds a
            checkpoint (without ``resume``) or none (with it).
    """
    from kdedge.errors import ConfigError

    try:
        if out is not None:
            path = Path(out)
            _writable_parent(path, kind)
            lock, why = _take(path, resume=resume, checkpoint=checkpoint)
            if lock is None:
                raise ConfigError(why)
            return Claim(path, lock)
        base = default_out(kind)
        _writable_parent(base, kind)
        for path in _numbered(base):
            lock, _why = _take(path, resume=False, checkpoint=checkpoint)
            if lock is not None:
                return Claim(path, lock)
        raise AssertionError("unreachable")
    except OSError as exc:  # a claim file or a killed run's leftovers that this user may not touch
        raise ConfigError(f"cannot claim {out or 'a run directory'} for the {kind} output ({exc.strerror}: {exc.filename}); "
                          "remove what is in the way or pass another --out") from exc


@contextlib.contextmanager
def claimed(out: str | Path | Claim | None, kind: str) -> Iterator[Claim]:
    """:func:`claim_out` for the block, released when it ends; a :class:`Claim` the caller holds is used as it is."""
    if isinstance(out, Claim):
        yield out
        return
    claim = claim_out(out, kind)
    try:
        yield claim
    finally:
        claim.release()


class WorkDir(Claim):
    """A directory a resumable command fills in place (``kdedge search``), claimed like an output; never removed on release."""

    def release(self, *, keep: bool = True) -> None:
        if self._lock is not None:
            _unlock(self._lock, claim_file(self.path))
            self._lock = None


def claim_workdir(out: str | Path | None, kind: str, *, resume: bool) -> WorkDir:
    """Claim the directory a resumable command fills in place (``kdedge search``) until released.

    A new one is created (a default name made unique against runs started in the same second);
    with ``resume`` it must exist. Either way a second process working in it is refused.

    Raises:
        ConfigError: It exists (without ``resume``), does not (with it), or another process works in it.
    """
    from kdedge.errors import ConfigError

    explicit = out is not None
    base = Path(out) if explicit else default_out(kind)
    _writable_parent(base, kind)
    for path in _numbered(base):
        lock = _lock(claim_file(path))
        if lock is None:
            if explicit:
                raise ConfigError(f"another kdedge process is working in {path} now; wait for it to finish, or pass another --out")
            continue
        why = None
        if resume and not path.is_dir():
            why = f"--resume: {path} is not a {kind} directory to continue; pass the --out of the killed {kind}"
        elif not resume:
            try:
                path.mkdir()
            except FileExistsError:
                why = f"{path} already exists; pass a new --out, or --resume to continue the {kind} there"
        if why is None:
            return WorkDir(path, lock)
        _unlock(lock, claim_file(path))
        if explicit:
            raise ConfigError(why)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def publish_dir(out: Path) -> Iterator[Path]:
    """Like :func:`atomic_dir`, for a user's result: when the final rename fails the finished result is kept, and the error says where.

    ``out`` is normally claimed (:func:`claim_out`), so the rename fails only when something else
    created ``out`` meanwhile (another tool, a person); the result then moves to a visible sibling.

    Raises:
        ResultKept: The rename failed; the message names the directory that holds the result.
    """
    from kdedge.errors import ResultKept

    with _staged(out) as tmp:
        yield tmp
    try:
        if out.exists() or out.is_symlink():  # rename(2) would replace an empty directory: never publish over anything
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
        os.rename(tmp, out)
    except OSError as exc:
        kept = tmp
        alt = next(p for p in _numbered(out, f".finished-{os.getpid()}") if not p.exists())
        with contextlib.suppress(OSError):
            os.rename(tmp, alt)
            kept = alt
        why = "it appeared while this run worked" if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) else exc.strerror
        raise ResultKept(f"the result is complete but could not be renamed to {out} ({why}); it is in {kept} — move it where you want it") from None
