"""Bring your own model: ``package.module:factory`` or ``path/to/file.py:factory``.

The factory is called with ``num_classes`` and ``input_shape`` when its signature accepts them
(``factory(num_classes=10, input_shape=(1, 28, 28))``), else with no arguments, and must return an
``nn.Module``. Checkpoints of such models record the reference, so ``load_checkpoint`` can rebuild
them wherever the factory is importable — only with ``trust_code=True`` (``--trust-code``), since
that imports and runs the code a file names. A reference the user passes directly is trusted.

Errors from the user's code are one :class:`ModelError` line, chained to the original exception so
``kdedge --debug`` (``KDEDGE_DEBUG=1``) can show the traceback inside the user's file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from kdedge._modes import evaluating
from kdedge.config import is_factory_ref
from kdedge.errors import ModelError

__all__ = ["is_factory_ref", "load_factory", "build_from_factory"]


def load_factory(ref: str) -> Callable[..., nn.Module]:
    """Import the callable named by ``ref``; one clear ModelError for every way that can fail."""
    if not is_factory_ref(ref):
        raise ModelError(f"{ref!r} is not a factory reference; expected package.module:factory or path/to/file.py:factory")
    target, _, attr = ref.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"{ref}: no such file {path}; expected path/to/file.py:factory")
        name = "kdedge_byo_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ModelError(f"{ref}: cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error it raises becomes one line, its traceback the cause
            sys.modules.pop(name, None)
            raise ModelError(f"{ref}: importing {path.name} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            # Chained: the missing module may be one the user's package imports, not the package itself.
            raise ModelError(f"{ref}: no module named {exc.name!r}; is the package installed, or did you mean path/to/file.py:{attr}?") from exc
        except Exception as exc:
            raise ModelError(f"{ref}: importing {target} failed ({type(exc).__name__}: {exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        options = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise ModelError(f"{ref}: {target} has no callable {attr!r}; callables defined there: {', '.join(options) or 'none'}")
    return factory


def build_from_factory(ref: str, *, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Call the factory (with the data's shape when it takes it) and check it returned a module."""
    factory = load_factory(ref)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("input_shape", tuple(input_shape))) if k in params}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"{ref}: the factory raised {type(exc).__name__}: {first}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{ref}: the factory returned {type(model).__name__}, expected a torch.nn.Module")
    _check_output(ref, model, num_classes, tuple(input_shape))
    return model


def _check_output(ref: str, model: nn.Module, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """One forward pass on zeros: the model must map (B, *input_shape) to (B, num_classes)."""
    import torch

    try:
        with evaluating(model), torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise ModelError(f"{ref}: the model fails on inputs of shape (2, {', '.join(map(str, input_shape))}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{ref}: the model returns {shape} for 2 samples, expected logits of shape (2, {num_classes})")
