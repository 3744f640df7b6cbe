"""Per-layer INT8 sensitivity, and INT8 artifacts that keep their most sensitive layers in float.

A model's INT8 accuracy loss is rarely spread evenly: one layer (often the first convolution, a
depthwise one, or the classifier) can account for most of it. :func:`layer_sensitivity` measures
each layer's share the direct way — the model with *only that layer* quantized, calibrated on
training images, scored on the given (validation) images — and :func:`choose_float_layers` picks
the layers to leave in float: the ``n`` most sensitive, or (``auto``) the fewest, in order of
sensitivity, after which the whole model's simulated INT8 drop is within a budget.

The measurement runs in PyTorch with the quantizer ExecuTorch's INT8 export uses (torchao PT2E,
``XNNPACKQuantizer``: int8 per-output-channel weights, int8 per-tensor activations), so it is one
scheme standing for all runtimes; each runtime's own artifact is then measured as always.

A *layer* is a module name (``features.0.0``, ``head.3``): a convolution or linear layer, or a
module holding several (``features.2`` keeps the whole block). Every INT8 export takes the same
names (:class:`~kdedge.config.ExportConfig` ``keep_float``):

* PT2E quantizers (ExecuTorch, LiteRT, quantization-aware training): :func:`keep_float_quantizer`
  marks the layer's nodes — and the BatchNorm/activation chain that follows it, which the
  quantizers fuse into it — as annotated with nothing, so no observer is placed on them;
* onnxruntime's QDQ quantizer (ONNX INT8, the ORT format, and OpenVINO, which converts that file):
  :func:`onnx_float_nodes` names the Conv/Gemm/MatMul nodes whose weights are the layer's
  (the exporter keeps parameter names as initializer names), passed as ``nodes_to_exclude``.

The runtimes then run those layers in float, converting at their edges (ExecuTorch and LiteRT
partition, onnxruntime and OpenVINO run the float nodes between DequantizeLinear and QuantizeLinear).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdedge.errors import ConfigError

__all__ = ["LayerSensitivity", "Sensitivity", "choose_float_layers", "check_float_layers", "keep_float_quantizer", "layer_sensitivity",
           "onnx_float_nodes", "quantizable_layers"]

#: Nodes a quantizer fuses into the layer before them (its output is quantized after them).
_FOLLOWERS = ("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
              "cudnn_batch_norm", "getitem")
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def quantizable_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s convolution and linear layers, in definition order: what INT8 quantizes and can keep in float."""
    return [name for name, module in model.named_modules() if isinstance(module, _LAYERS)]


def check_float_layers(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each a module of ``model`` holding at least one convolution or linear layer.

    Raises:
        ConfigError: A name is not such a module (one line listing the model's layers).
    """
    names = tuple(dict.fromkeys(str(n) for n in names))
    modules = dict(model.named_modules())
    layers = quantizable_layers(model)
    for name in names:
        if not name or name not in modules or not any(layer == name or layer.startswith(name + ".") for layer in layers):
            shown = ", ".join(layers[:12]) + (f", ... ({len(layers)} in all)" if len(layers) > 12 else "")
            raise ConfigError(f"--keep-float {name!r} is not a layer of {type(model).__name__}; expected a module name holding a convolution "
                              f"or linear layer, one of: {shown}")
    return names


def _path(qualified: str) -> str:
    return qualified[len("L['self']."):] if qualified.startswith("L['self'].") else qualified


def _in_module(node: torch.fx.Node, name: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(_path(path) == name for path, _ in stack.values())


def _op_name(node: torch.fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return target.split(".")[0]


def _unit(graph: torch.fx.Graph, name: str) -> set[torch.fx.Node]:
    """The compute nodes of module ``name``, and the BatchNorm/activation chain each of its outputs feeds alone."""
    nodes = {n for n in graph.nodes if n.op == "call_function" and _in_module(n, name)}
    for node in [n for n in nodes if not any(u in nodes for u in n.users)]:
        while len(node.users) == 1:
            user = next(iter(node.users))
            if user.op != "call_function" or _op_name(user) not in _FOLLOWERS:
                break
            nodes.add(user)
            node = user
    return nodes


def keep_float_quantizer(quantizer: Any, float_layers: Sequence[str] = (), *, only: str | None = None) -> Any:
    """``quantizer`` (a torchao PT2E quantizer) leaving the nodes of ``float_layers`` unquantized; with ``only``, everything but that layer.

    The nodes are marked as annotated with no quantization spec while ``quantizer`` annotates, so
    its patterns skip them (a pattern is annotated only when none of its nodes is). Returns
    ``quantizer`` itself when there is nothing to keep.
    """
    if not float_layers and only is None:
        return quantizer
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    class KeepFloat(Quantizer):
        """The wrapped quantizer, after marking the float nodes."""

        inner = quantizer

        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return quantizer.transform_for_annotation(model)

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            graph = model.graph
            if only is not None:
                kept = _unit(graph, only)
                marked = {n for n in graph.nodes if n.op == "call_function"} - kept
            else:
                marked = set().union(*(_unit(graph, name) for name in float_layers))
            marker = QuantizationAnnotation(_annotated=True)
            for node in marked:
                node.meta["quantization_annotation"] = marker
            model = quantizer.annotate(model)
            # Unmarked again: an unannotated node is left float, while QAT's conv+BatchNorm rewrite expects a conv's annotation to
            # hold input and weight specs.
            for node in model.graph.nodes:
                if node.meta.get("quantization_annotation") is marker:
                    del node.meta["quantization_annotation"]
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            quantizer.validate(model)

        def prepare_obs_or_fq_callback(self, model: torch.fx.GraphModule, edge_or_node_to_obs_or_fq: dict) -> None:
            quantizer.prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)

    return KeepFloat()


def onnx_float_nodes(proto: Any, float_layers: Sequence[str]) -> list[str]:
    """The names of the Conv, ConvTranspose, Gemm and MatMul nodes of ``proto`` whose weights belong to ``float_layers``.

    Raises:
        ConfigError: A layer has no such node (its weights were renamed by the export, or it is not a layer).
    """
    initializers = {i.name for i in proto.graph.initializer}
    found: dict[str, list[str]] = {name: [] for name in float_layers}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        weights = [i for i in node.input[1:] if i in initializers]
        for name in float_layers:
            if any(w == f"{name}.weight" or w.startswith(f"{name}.") for w in weights):
                found[name].append(node.name)
    missing = [name for name, nodes in found.items() if not nodes]
    if missing:
        raise ConfigError(f"--keep-float {', '.join(missing)}: no Conv/Gemm/MatMul node of the ONNX graph has this layer's weights; "
                          "name convolution or linear modules of the exported model")
    return sorted({n for nodes in found.values() for n in nodes})


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's INT8 sensitivity: accuracy with only it quantized, and the drop from FP32 in points."""

    layer: str
    accuracy: float
    drop_pt: float


@dataclass
class Sensitivity:
    """:func:`layer_sensitivity`'s result; ``layers`` sorted from the most sensitive."""

    fp32_accuracy: float
    int8_accuracy: float
    layers: list[LayerSensitivity]
    images: int
    calibration_images: int
    scheme: str = "XNNPACKQuantizer (torchao pt2e): int8 per-channel weights, int8 per-tensor activations, evaluated in PyTorch"
    steps: list[dict[str, Any]] = field(default_factory=list)  # choose_float_layers' auto search

    @property
    def int8_drop_pt(self) -> float:
        return round(100 * (self.fp32_accuracy - self.int8_accuracy), 4)

    def most_sensitive(self, n: int) -> list[str]:
        """The ``n`` layers whose quantization alone costs the most (a layer that costs nothing is never among them)."""
        return [s.layer for s in self.layers if s.drop_pt > 0][: max(0, n)]

    def to_dict(self) -> dict[str, Any]:
        return {"measured_on_images": self.images, "calibration_images": self.calibration_images, "method": "only this layer INT8",
                "scheme": self.scheme, "fp32_accuracy": self.fp32_accuracy, "int8_accuracy": self.int8_accuracy, "int8_drop_pt": self.int8_drop_pt,
                "layers": [{"layer": s.layer, "accuracy": s.accuracy, "drop_pt": s.drop_pt} for s in self.layers],
                **({"auto_steps": self.steps} if self.steps else {})}


def _quantized_accuracy(model: nn.Module, data: Dataset | DataLoader, calibration: torch.Tensor, *, float_layers: Sequence[str] = (),
                        only: str | None = None, batch: int = 64) -> float:
    """Accuracy of ``model`` quantized by XNNPACK's PT2E quantizer (``float_layers`` kept float; ``only``: that layer alone INT8)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    from kdedge.metrics import evaluate
    from kdedge.models.qat import _torchao

    pt2e, quantize_pt2e = _torchao()
    quantizer = keep_float_quantizer(XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)),
                                     float_layers, only=only)
    example = (calibration[: min(len(calibration), batch)].clone(),)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        graph = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        for chunk in calibration.split(batch):
            prepared(chunk)
        converted = quantize_pt2e.convert_pt2e(prepared)
    pt2e.allow_exported_model_train_eval(converted)
    return evaluate(converted, data).accuracy


def _cpu_float(model: nn.Module) -> nn.Module:
    import copy

    from kdedge.models.zoo import runs_outside_torch

    if runs_outside_torch(model):
        raise ConfigError("per-layer INT8 sensitivity needs the PyTorch model; an ONNX model's layers are quantized by onnxruntime as a whole")
    return copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()


def layer_sensitivity(model: nn.Module, data: Dataset | DataLoader, calibration: np.ndarray | torch.Tensor, *,
                      layers: Sequence[str] | None = None, log: Any = None) -> Sensitivity:
    """Each layer's INT8 sensitivity: ``model`` with only that layer quantized, scored on ``data`` (validation images).

    Args:
        model: The FP32 PyTorch model (copied; not modified).
        data: The images to score on: a validation split, not the test set, when the result chooses anything.
        calibration: Preprocessed training inputs ``(N, C, H, W)`` for the activation ranges (the exports use the same).
        layers: Module names to measure (default: every convolution and linear layer, :func:`quantizable_layers`).
        log: Called with one line per layer.

    Returns:
        FP32 and all-INT8 accuracy, and each layer's accuracy and drop in points, most sensitive first.
    """
    from kdedge.metrics import evaluate

    model = _cpu_float(model)
    names = check_float_layers(model, layers) if layers is not None else tuple(quantizable_layers(model))
    inputs = torch.as_tensor(np.ascontiguousarray(calibration, dtype=np.float32))
    fp32 = evaluate(model, data).accuracy
    int8 = _quantized_accuracy(model, data, inputs)
    rows = []
    for name in names:
        acc = _quantized_accuracy(model, data, inputs, only=name)
        rows.append(LayerSensitivity(name, acc, round(100 * (fp32 - acc), 4)))
        if log:
            log(f"sensitivity: {name} alone INT8 {acc:.4f} (drop {rows[-1].drop_pt:+.2f} pt)")
    rows.sort(key=lambda s: -s.drop_pt)
    n = len(data.dataset) if isinstance(data, DataLoader) else len(data)  # type: ignore[arg-type]
    return Sensitivity(fp32_accuracy=fp32, int8_accuracy=int8, layers=rows, images=n, calibration_images=len(inputs))


def choose_float_layers(model: nn.Module, data: Dataset | DataLoader, calibration: np.ndarray | torch.Tensor, sensitivity: Sensitivity,
                        keep: int | str, *, max_drop: float, log: Any = None) -> list[str]:
    """The layers to keep in float: ``keep`` most sensitive (an int), or ``"auto"``.

    ``auto``: layers are added in order of sensitivity, re-measuring the whole model's INT8 accuracy on
    ``data`` after each, until its drop is within ``max_drop`` points, at most half the layers; if the
    budget is never met, the set with the smallest drop is kept. Each step is recorded in ``sensitivity.steps``.
    """
    if keep != "auto":
        return sensitivity.most_sensitive(int(keep))
    model = _cpu_float(model)
    inputs = torch.as_tensor(np.ascontiguousarray(calibration, dtype=np.float32))
    order = sensitivity.most_sensitive(len(sensitivity.layers))
    limit = min(len(order), max(1, math.ceil(len(sensitivity.layers) / 2)))
    kept: list[str] = []
    drop = sensitivity.int8_drop_pt
    sensitivity.steps = [{"float_layers": [], "int8_accuracy": sensitivity.int8_accuracy, "drop_pt": drop}]
    best = (drop, 0)
    while drop > max_drop and len(kept) < limit:
        kept.append(order[len(kept)])
        acc = _quantized_accuracy(model, data, inputs, float_layers=kept)
        drop = round(100 * (sensitivity.fp32_accuracy - acc), 4)
        sensitivity.steps.append({"float_layers": list(kept), "int8_accuracy": acc, "drop_pt": drop})
        if log:
            log(f"keep-float auto: {', '.join(kept)} in float: INT8 {acc:.4f} (drop {drop:+.2f} pt)")
        best = min(best, (drop, len(kept)))
    return kept[: best[1]]


def plan_float_layers(model: nn.Module, data: Any, calibration: np.ndarray, keep: int | str, *, max_drop: float,
                      log: Any = None) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``compress-and-export --keep-float N|auto``: measure sensitivity, choose the float layers; returns them and the manifest record.

    ``data`` is the run's :class:`~kdedge.data.DataSplits`: sensitivity is scored on its validation split, or, without one,
    on 5,000 training images (never the test set, which stays the final report's).
    """
    scored, split = (data.val, "validation") if data.val is not None else (data.train.take(min(5000, len(data.train)), seed=1), "train (no validation split)")
    if log:
        log(f"sensitivity: each layer alone INT8 on {len(scored)} {split} images")
    sensitivity = layer_sensitivity(model, scored, calibration, log=log)
    kept = choose_float_layers(model, scored, calibration, sensitivity, keep, max_drop=max_drop, log=log)
    why = (f"the {len(kept)} most sensitive" if keep != "auto" else
           f"auto: fewest most-sensitive layers after which the simulated INT8 drop is within --max-quant-drop {max_drop:g} pt"
           if not sensitivity.steps or sensitivity.steps[len(kept)]["drop_pt"] <= max_drop else
           "auto: the simulated INT8 drop never came within --max-quant-drop; the set that lost least")
    if log:
        log(f"keep-float: {', '.join(kept) or 'no layer'} in float ({why})")
    return tuple(kept), {"keep_float": keep, "float_layers": list(kept), "why": why, "split": split, **sensitivity.to_dict()}
