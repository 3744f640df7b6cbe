"""Per-layer INT8 sensitivity, and the choice of layers an INT8 artifact keeps in float.

A model's INT8 accuracy loss is rarely spread evenly: one layer (often the first convolution, a
depthwise one, or the classifier) can account for most of it. :func:`layer_sensitivity` measures
each layer's share the direct way — the model with *only that layer* quantized, calibrated on
training images, scored on the given (validation) images — and :func:`choose_float_layers` picks
the layers to leave in float: the ``n`` most sensitive, or (``auto``) the fewest, in order of
sensitivity, after which the whole model's simulated INT8 drop is within a budget.

The measurement runs in PyTorch with the quantizer ExecuTorch's INT8 export uses (torchao PT2E,
``XNNPACKQuantizer``: int8 weights per output channel, or per tensor with ``per_channel=False``, int8
per-tensor activations; per tensor, on the model with its dead BatchNorm channels silenced as the
per-tensor exports quantize it, :mod:`kdedge.models.dead_channels`, FP32 accuracy included), so it is
one scheme standing for all runtimes; each runtime's own artifact is then measured as always. How every
INT8 export keeps the chosen layers float is :mod:`kdedge.models.float_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdedge.errors import ConfigError, ModelError
from kdedge.models.float_layers import check_float_layers, keep_float_quantizer, onnx_float_nodes, quantizable_layers

__all__ = ["LayerSensitivity", "Sensitivity", "check_float_layers", "choose_float_layers", "keep_float_quantizer", "layer_sensitivity",
           "onnx_float_nodes", "plan_float_layers", "quantizable_layers"]


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's INT8 sensitivity: accuracy with only it quantized, and the drop from FP32 in points."""

    layer: str
    accuracy: float
    drop_pt: float


_SCHEME = "XNNPACKQuantizer (torchao pt2e): int8 {} weights, int8 per-tensor activations, evaluated in PyTorch"


@dataclass
class Sensitivity:
    """:func:`layer_sensitivity`'s result; ``layers`` sorted from the most sensitive."""

    fp32_accuracy: float
    int8_accuracy: float
    layers: list[LayerSensitivity]
    images: int
    calibration_images: int
    scheme: str = _SCHEME.format("per-channel")

    @property
    def per_channel(self) -> bool:
        return "per-tensor weights" not in self.scheme
    steps: list[dict[str, Any]] = field(default_factory=list)  # choose_float_layers' auto search

    @property
    def int8_drop_pt(self) -> float:
        return round(100 * (self.fp32_accuracy - self.int8_accuracy), 4)

    def most_sensitive(self, n: int) -> list[str]:
        """The ``n`` layers whose quantization alone costs the most."""
        return [s.layer for s in self.layers][: max(0, n)]

    def to_dict(self) -> dict[str, Any]:
        return {"measured_on_images": self.images, "calibration_images": self.calibration_images, "method": "only this layer INT8",
                "scheme": self.scheme, "fp32_accuracy": self.fp32_accuracy, "int8_accuracy": self.int8_accuracy, "int8_drop_pt": self.int8_drop_pt,
                "layers": [{"layer": s.layer, "accuracy": s.accuracy, "drop_pt": s.drop_pt} for s in self.layers],
                **({"auto_steps": self.steps} if self.steps else {})}


def _quantized_accuracy(model: nn.Module, data: Dataset | DataLoader, calibration: torch.Tensor, *, float_layers: Sequence[str] = (),
                        only: str | None = None, batch: int = 64, per_channel: bool = True) -> float:
    """Accuracy of ``model`` quantized by XNNPACK's PT2E quantizer (``float_layers`` kept float; ``only``: that layer alone INT8)."""
    from kdedge.metrics import evaluate
    from kdedge.models.qat import _quantizer, _torchao

    pt2e, quantize_pt2e = _torchao()
    quantizer = keep_float_quantizer(_quantizer("xnnpack" if per_channel else "xnnpack-per-tensor", qat=False), float_layers, only=only)
    example = (torch.zeros(2, *calibration.shape[1:]),)  # a batch of 2: torch.export would fix a batch of 1 as a constant
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            graph = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
        except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelError(f"cannot measure {type(model).__name__}'s INT8 sensitivity: torch.export cannot capture it ({type(exc).__name__}: "
                             f"{first}); kdedge --debug shows where it failed") from exc
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        for chunk in calibration.split(batch):
            prepared(chunk)
        converted = quantize_pt2e.convert_pt2e(prepared)
    pt2e.allow_exported_model_train_eval(converted)
    return evaluate(converted, data).accuracy


def _cpu_float(model: nn.Module, input_shape: tuple[int, ...], per_channel: bool) -> nn.Module:
    import copy

    from kdedge.models.dead_channels import silence_dead_channels

    from kdedge.models.zoo import runs_outside_torch

    from kdedge.models.qat import QATModel

    if runs_outside_torch(model):
        raise ConfigError("per-layer INT8 sensitivity needs the PyTorch model; an ONNX model's layers are quantized by onnxruntime as a whole")
    if isinstance(model, QATModel):
        raise ModelError("the model is already quantization-aware (a --qat run); measure the FP32 student it was trained from")
    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    return model if per_channel else silence_dead_channels(model, input_shape)[0]  # as the per-tensor INT8 exports quantize it


def layer_sensitivity(model: nn.Module, data: Dataset | DataLoader, calibration: np.ndarray | torch.Tensor, *,
                      layers: Sequence[str] | None = None, log: Any = None, per_channel: bool = True) -> Sensitivity:
    """Each layer's INT8 sensitivity: ``model`` with only that layer quantized, scored on ``data`` (validation images).

    Args:
        model: The FP32 PyTorch model (copied; not modified).
        data: The images to score on: a validation split, not the test set, when the result chooses anything.
        calibration: Preprocessed training inputs ``(N, C, H, W)`` for the activation ranges (the exports use the same).
        layers: Module names to measure (default: every convolution and linear layer, :func:`quantizable_layers`).
        log: Called with one line per layer.
        per_channel: INT8 weights with one scale per output channel (the exports' default), or per tensor (``--per-tensor``).

    Returns:
        FP32 and all-INT8 accuracy, and each layer's accuracy and drop in points, most sensitive first.
    """
    from kdedge.metrics import evaluate

    inputs = torch.as_tensor(np.ascontiguousarray(calibration, dtype=np.float32))
    model = _cpu_float(model, tuple(inputs.shape[1:]), per_channel)
    names = check_float_layers(model, layers) if layers is not None else tuple(quantizable_layers(model))
    fp32 = evaluate(model, data).accuracy
    int8 = _quantized_accuracy(model, data, inputs, per_channel=per_channel)
    rows = []
    for name in names:
        acc = _quantized_accuracy(model, data, inputs, only=name, per_channel=per_channel)
        rows.append(LayerSensitivity(name, acc, round(100 * (fp32 - acc), 4)))
        if log:
            log(f"sensitivity: {name} alone INT8 {acc:.4f} (drop {rows[-1].drop_pt:+.2f} pt)")
    rows.sort(key=lambda s: -s.drop_pt)
    n = len(data.dataset) if isinstance(data, DataLoader) else len(data)  # type: ignore[arg-type]
    return Sensitivity(fp32_accuracy=fp32, int8_accuracy=int8, layers=rows, images=n, calibration_images=len(inputs),
                       scheme=_SCHEME.format("per-channel" if per_channel else "per-tensor"))


def choose_float_layers(model: nn.Module, data: Dataset | DataLoader, calibration: np.ndarray | torch.Tensor, sensitivity: Sensitivity,
                        keep: int | str, *, max_drop: float, log: Any = None) -> list[str]:
    """The layers to keep in float: ``keep`` most sensitive (an int), or ``"auto"``.

    ``auto``: layers are added in order of sensitivity, re-measuring the whole model's INT8 accuracy on
    ``data`` after each, until its drop is within ``max_drop`` points, at most half the layers; if the
    budget is never met, the set with the smallest drop is kept. Each step is recorded in ``sensitivity.steps``.
    """
    if keep != "auto":
        return sensitivity.most_sensitive(int(keep))
    inputs = torch.as_tensor(np.ascontiguousarray(calibration, dtype=np.float32))
    model = _cpu_float(model, tuple(inputs.shape[1:]), sensitivity.per_channel)
    order = sensitivity.most_sensitive(len(sensitivity.layers))  # every layer: the whole model's loss may come from several together
    limit = min(len(order), max(1, math.ceil(len(sensitivity.layers) / 2)))
    kept: list[str] = []
    drop = sensitivity.int8_drop_pt
    sensitivity.steps = [{"float_layers": [], "int8_accuracy": sensitivity.int8_accuracy, "drop_pt": drop}]
    best = (drop, 0)
    while drop > max_drop and len(kept) < limit:
        kept.append(order[len(kept)])
        acc = _quantized_accuracy(model, data, inputs, float_layers=kept, per_channel=sensitivity.per_channel)
        drop = round(100 * (sensitivity.fp32_accuracy - acc), 4)
        sensitivity.steps.append({"float_layers": list(kept), "int8_accuracy": acc, "drop_pt": drop})
        if log:
            log(f"keep-float auto: {', '.join(kept)} in float: INT8 {acc:.4f} (drop {drop:+.2f} pt)")
        best = min(best, (drop, len(kept)))
    return kept[: best[1]]


def plan_float_layers(model: nn.Module, data: Any, calibration: np.ndarray, keep: int | str, *, max_drop: float,
                      log: Any = None, per_channel: bool = True) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``compress-and-export --keep-float N|auto``: measure sensitivity, choose the float layers; returns them and the manifest record.

    ``data`` is the run's :class:`~kdedge.data.DataSplits`: sensitivity is scored on its validation split, or, without one,
    on 5,000 training images (never the test set, which stays the final report's).
    """
    scored, split = (data.val, "validation") if data.val is not None else (data.train.take(min(5000, len(data.train)), seed=1), "train (no validation split)")
    if log:
        log(f"sensitivity: each layer alone INT8 on {len(scored)} {split} images")
    sensitivity = layer_sensitivity(model, scored, calibration, log=log, per_channel=per_channel)
    kept = choose_float_layers(model, scored, calibration, sensitivity, keep, max_drop=max_drop, log=log)
    why = (f"the {len(kept)} most sensitive" if keep != "auto" else
           f"auto: fewest most-sensitive layers after which the simulated INT8 drop is within --max-quant-drop {max_drop:g} pt"
           if not sensitivity.steps or sensitivity.steps[len(kept)]["drop_pt"] <= max_drop else
           "auto: the simulated INT8 drop never came within --max-quant-drop; the set that lost least")
    if log:
        log(f"keep-float: {', '.join(kept) or 'no layer'} in float ({why})")
    return tuple(kept), {"keep_float": keep, "float_layers": list(kept), "why": why, "split": split, **sensitivity.to_dict()}
