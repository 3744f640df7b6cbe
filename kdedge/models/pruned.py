"""Pruned architectures: a base model with some layers narrowed, rebuilt without pickle or torch-pruning.

A channel-pruned model is its base architecture (a zoo name, a ``net:`` genome, a factory) whose
convolutions, linear layers and BatchNorms keep fewer channels. Its :class:`~kdedge.models.ModelSpec`
records, per narrowed layer, ``(out, in, groups)``: ``create_model`` builds the base, narrows those
layers to the recorded widths (:func:`narrow`) and initializes them afresh; the checkpoint's weights
then load strictly. Nothing but the recorded integers comes from the file, so a zoo or genome
base needs no opt-in, and a factory base needs ``--trust-code`` as it always does.

Only the layers whose parameters are channel-shaped are recorded; a forward that hard-codes a
channel count (``x.view(-1, 128)``) cannot be narrowed by any pruner and fails the pruner's trace.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from kdedge.errors import ModelError

__all__ = ["LayerShapes", "NARROWABLE", "layer_shapes", "narrow", "narrowed_layers", "shapes_digest"]

#: Module name -> (out channels, in channels, groups); BatchNorm: (features, features, 1).
LayerShapes = dict[str, tuple[int, int, int]]

#: The layer types whose width a pruned spec can record and rebuild.
NARROWABLE: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _shape(module: nn.Module) -> tuple[int, int, int] | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (module.out_channels, module.in_channels, module.groups)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features, 1)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (module.num_features, module.num_features, 1)
    return None


def layer_shapes(model: nn.Module) -> LayerShapes:
    """Every narrowable layer's ``(out, in, groups)``, by module name."""
    return {name: s for name, m in model.named_modules() if isinstance(m, NARROWABLE) and (s := _shape(m)) is not None}


def narrowed_layers(base: nn.Module, pruned: nn.Module) -> LayerShapes:
    """The layers of ``pruned`` whose width differs from ``base``'s (the same architecture before pruning).

    Raises:
        ModelError: A layer outside :data:`NARROWABLE` changed a parameter's shape (it could not be
            rebuilt from a recorded width), or the two models do not have the same modules.
    """
    before, after = dict(base.named_modules()), dict(pruned.named_modules())
    if before.keys() != after.keys():
        raise ModelError("the pruned model's modules differ from its base's; a pruner may only narrow layers, not add or remove them")
    changed: LayerShapes = {}
    for name, module in after.items():
        own_before = {k: tuple(v.shape) for k, v in before[name].named_parameters(recurse=False)}
        own_after = {k: tuple(v.shape) for k, v in module.named_parameters(recurse=False)}
        if own_before == own_after and _shape(module) == _shape(before[name]):
            continue
        if not isinstance(module, NARROWABLE):
            raise ModelError(f"layer {name!r} ({type(module).__name__}) was narrowed by the pruner, but kdedge can record the widths of "
                             f"{', '.join(sorted({t.__name__ for t in NARROWABLE}))} only; keep it whole with --ignore-layers {name}")
        changed[name] = _shape(module)  # type: ignore[assignment]
    return changed


def shapes_digest(shapes: LayerShapes) -> str:
    """A short, stable name for a set of recorded widths (``resnet-pruned-<digest>``)."""
    return hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in shapes.items())).encode()).hexdigest()[:8]


def narrow(model: nn.Module, shapes: LayerShapes) -> nn.Module:
    """Narrow ``model``'s layers in place to the recorded ``(out, in, groups)`` and initialize them afresh.

    Parameters are re-created at the new shapes and ``reset_parameters`` draws them from the global
    RNG, as a fresh model's are: the same seed gives the same pruned model. A trained checkpoint's
    weights are loaded afterwards.

    Raises:
        ModelError: A recorded layer is missing, of a type kdedge cannot narrow, or its widths are not positive.
    """
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        module = modules.get(name)
        if module is None or not isinstance(module, NARROWABLE):
            found = "no such layer" if module is None else type(module).__name__
            raise ModelError(f"the pruned spec narrows layer {name!r}, but the base architecture has {found} there; was it pruned from another architecture?")
        out, cin, groups = (int(v) for v in shape)
        if min(out, cin, groups) < 1 or out % groups or cin % groups:
            raise ModelError(f"the pruned spec gives layer {name!r} widths (out {out}, in {cin}, groups {groups}); expected positive widths divisible by groups")
        _resize(module, out, cin, groups)
    return model


def _resize(module: nn.Module, out: int, cin: int, groups: int) -> None:
    def param(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape))

    if isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels, module.groups = out, cin, groups
        module.weight = param(out, cin // groups, *module.kernel_size)
        if module.bias is not None:
            module.bias = param(out)
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = out, cin
        module.weight = param(out, cin)
        if module.bias is not None:
            module.bias = param(out)
    else:  # BatchNorm
        module.num_features = out
        if module.affine:
            module.weight, module.bias = param(out), param(out)
        if module.track_running_stats:
            module.running_mean = torch.zeros(out)
            module.running_var = torch.ones(out)
    module.reset_parameters()
