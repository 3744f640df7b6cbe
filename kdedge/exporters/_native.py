"""What the exporters share: silencing converters and runtimes, and their errors in one line.

Converters log from Python (warnings, loggers, progress bars on stdout), and the edge ones from
C++ straight to file descriptor 2. :func:`silenced` keeps the Python side off the terminal;
:func:`quiet` adds fd 2 and hands the native lines back, so an error can quote the runtime's own
reason. :func:`cause` and :func:`first_line` turn an exception into the part of the one-line error
that names what went wrong.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

from kdedge._quiet import silenced  # re-exported: the backends import it from here
from kdedge.errors import cause, first_line  # re-exported: the backends import them from here

_FD2_LOCK = threading.Lock()
_FD2_HELD = threading.local()

__all__ = ["attach_native_log", "cause", "first_line", "last_native_line", "native_stderr", "quiet", "silenced", "version_of"]


def quiet(native: list[str], loggers: tuple[str, ...] = (), *, root: bool = False) -> contextlib.AbstractContextManager[None]:
    """:func:`silenced` with file descriptor 2 captured: the native lines are appended to ``native`` when the block ends."""
    return silenced(loggers, root=root, stderr=native_stderr(native))


@contextlib.contextmanager
def native_stderr(lines: list[str]) -> Iterator[None]:
    """Collect what is written to file descriptor 2 (C++ logging bypasses ``sys.stderr``) into ``lines``.

    fd 2 is process-wide: one lock serializes the redirections (a nested one in the same thread
    is a no-op inside the outer), and two threads can never leave it pointing at a deleted file.
    """
    if getattr(_FD2_HELD, "held", False):  # nested in this thread: the outer redirection already captures
        yield
        return
    with _FD2_LOCK:
        _FD2_HELD.held = True
        try:
            yield from _redirected(lines)
        finally:
            _FD2_HELD.held = False


def _redirected(lines: list[str]) -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (an embedded interpreter): nothing to capture
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def last_native_line(native: list[str]) -> str:
    """The runtime's last native log line, without its ``[file.cpp:123]`` / ``file.cc:123]`` prefix."""
    for line in reversed(native):
        line = line.strip()
        if line:
            return (line.split("] ", 1)[1] if "] " in line[:80] else line)[:300]
    return ""




def attach_native_log(exc: BaseException, native: list[str]) -> None:
    """Keep the native log on the exception chain (``kdedge --debug`` prints it) instead of on the terminal."""
    if native:
        exc.add_note("native log:\n" + "\n".join(native[-50:]))


def version_of(distribution: str) -> str:
    """An installed distribution's version, without a local ``+...`` tag."""
    from importlib.metadata import version

    return version(distribution).split("+")[0]
