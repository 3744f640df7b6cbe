"""Keeping converters and their libraries off the terminal: warnings, loggers and stdout silenced for a block.

A foundation (no kdedge imports): the exporters silence torch.onnx with it, and so does the teacher's
cache pass, which exports the teacher to run it in onnxruntime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_onnx_export", "silenced"]

#: The loggers torch.onnx's dynamo exporter reports progress and absent-op warnings through.
ONNX_EXPORT_LOGGERS = ("torch.onnx", "torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export")


@contextlib.contextmanager
def silenced(loggers: tuple[str, ...] = (), *, root: bool = False, stderr: contextlib.AbstractContextManager | None = None) -> Iterator[None]:
    """Silence warnings, the ``loggers`` (and the root logger with ``root``) below ERROR, stdout, and whatever ``stderr`` captures.

    ``stderr`` is entered inside the block: ``contextlib.redirect_stderr(io.StringIO())`` for
    Python's, :func:`native_stderr` for file descriptor 2. The loggers' levels are restored after.
    """
    quieted = [logging.getLogger(name) for name in loggers] + ([logging.getLogger()] if root else [])
    levels = [lg.level for lg in quieted]
    for lg in quieted:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), stderr or contextlib.nullcontext():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(quieted, levels):
            lg.setLevel(level)


def quiet_onnx_export() -> contextlib.AbstractContextManager[None]:
    """``torch.onnx.export`` logs progress and warns about absent torchvision ops: keep the CLI clean."""
    return silenced(ONNX_EXPORT_LOGGERS, stderr=contextlib.redirect_stderr(io.StringIO()))
