"""kdedge's exceptions.

Every error a user can cause derives from :class:`KdedgeError`. The CLI turns each one into a
single line on stderr and exit code 2; a traceback means a bug in kdedge, not bad input.
Messages say what was expected, what was found and what to do next.
"""

from __future__ import annotations

__all__ = [
    "KdedgeError",
    "ConfigError",
    "TrainingDiverged",
    "ResultKept",
    "DataError",
    "ModelError",
    "ExportError",
    "ParityError",
    "BackendUnavailable",
    "cause",
    "first_line",
]


class KdedgeError(Exception):
    """Base class for every error caused by input, configuration or environment."""


class ConfigError(KdedgeError):
    """A configuration value, flag or YAML key is invalid."""


class TrainingDiverged(ConfigError):
    """Training diverged (non-finite loss, accuracy at chance): a setting, usually the step size, is wrong."""


class ResultKept(ConfigError):
    """A run finished, but its result could not take its name; the message says where it is."""


class DataError(KdedgeError):
    """A dataset cannot be found, read, or does not fit the model."""


class ModelError(KdedgeError):
    """A model name, checkpoint or architecture cannot be resolved or loaded."""


class ExportError(KdedgeError):
    """A model cannot be exported."""


class ParityError(ExportError):
    """An exported model's outputs differ from the reference beyond tolerance."""


class BackendUnavailable(KdedgeError):
    """An optional runtime (onnxruntime, TensorRT, CUDA) is not installed or not usable."""


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), at most 300 characters."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def cause(exc: BaseException) -> str:
    """The innermost cause's type and first line: torch.onnx and the edge converters wrap the useful message."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc)}"
