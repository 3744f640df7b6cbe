"""Layers an INT8 artifact keeps in float: the names, and how each quantizer is told.

A *layer* is a module name (``features.0.0``, ``head.3``): a convolution or linear layer, or a
module holding several (``features.2`` keeps the whole block). Every INT8 export takes the same
names (:class:`~kdedge.config.ExportConfig` ``keep_float``; :mod:`kdedge.sensitivity` chooses them):

* PT2E quantizers (ExecuTorch, LiteRT, quantization-aware training): :func:`keep_float_quantizer`
  marks the layer's nodes — and the BatchNorm/activation chain that follows it, which the
  quantizers fuse into it — as annotated with nothing while the quantizer annotates, so no observer
  is placed on them;
* onnxruntime's QDQ quantizer (ONNX INT8, the ORT format, and OpenVINO, which converts that file):
  :func:`onnx_float_nodes` names the Conv/Gemm/MatMul nodes whose weights are the layer's
  (the exporter keeps parameter names as initializer names), passed as ``nodes_to_exclude``.

The runtimes then run those layers in float, converting at their edges (ExecuTorch and LiteRT
partition, onnxruntime and OpenVINO run the float nodes between DequantizeLinear and QuantizeLinear).
A name that reaches no node of the graph being quantized is an error, never a layer left INT8 in silence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from kdedge.errors import ConfigError, ExportError

__all__ = ["check_float_layers", "keep_float_quantizer", "onnx_float_nodes", "quantizable_layers"]

#: Nodes a quantizer fuses into the layer before them (its output is quantized after them).
_FOLLOWERS = ("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
              "cudnn_batch_norm", "getitem")
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def quantizable_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s convolution and linear layers, in definition order: what INT8 quantizes and can keep in float."""
    return [name for name, module in model.named_modules() if isinstance(module, _LAYERS)]


def check_float_layers(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    """``names`` sorted, without repeats, each a module of ``model`` holding at least one convolution or linear layer.

    Raises:
        ConfigError: A name is not such a module (one line listing the model's layers).
    """
    names = tuple(sorted({str(n) for n in names}))  # a set of layers: the order given changes nothing
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


def _within(node: torch.fx.Node, name: str) -> bool:
    """Whether ``node`` runs in module ``name`` or one of its submodules."""
    stack = node.meta.get("nn_module_stack") or {}
    return any(_path(path) == name or _path(path).startswith(name + ".") for path, _ in stack.values())


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


def keep_float_quantizer(quantizer: Any, float_layers: Sequence[str] = (), *, only: str | None = None, inside: str | None = None) -> Any:
    """``quantizer`` (a torchao PT2E quantizer) leaving the nodes of ``float_layers`` unquantized; with ``only``, everything but that layer.

    ``inside`` names the submodule that holds the model (``"model"`` behind a
    :class:`~kdedge.data.pixels.PixelInput`): the wrapper's own operations outside it (the in-graph
    preprocessing) stay float, and the model's first layer quantizes their result as it would its
    float input; the layer names are then the model's own (``features.0``, not ``model.features.0``). The nodes are marked as annotated with no quantization spec while ``quantizer``
    annotates, so its patterns skip them (a pattern is annotated only when none of its nodes is).
    Returns ``quantizer`` itself when there is nothing to keep.
    """
    if not float_layers and only is None and inside is None:
        return quantizer
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    class KeepFloat(Quantizer):
        """The wrapped quantizer, after marking the float nodes."""

        inner = quantizer

        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return quantizer.transform_for_annotation(model)

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            graph = model.graph
            within = f"{inside}." if inside is not None else ""  # the layer names are the model's, which sits in `inside`
            units = {name: _unit(graph, within + name) for name in ([only] if only is not None else float_layers)}
            missing = [name for name, nodes in units.items() if not nodes]
            if missing:  # e.g. a module called through another attribute name: its nodes record that name
                raise ExportError(f"--keep-float {', '.join(missing)}: no operation of the captured graph records this module "
                                  "(is it called through another attribute?); name the module as the model's forward calls it")
            if only is not None:
                marked = {n for n in graph.nodes if n.op == "call_function"} - units[only]
            else:
                marked = set().union(set(), *units.values())
            if inside is not None:
                marked |= {n for n in graph.nodes if n.op == "call_function" and not _within(n, inside)}
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
        ExportError: A layer has no such node (its weights were renamed by the export, or it is not a layer).
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
        raise ExportError(f"--keep-float {', '.join(missing)}: no Conv/Gemm/MatMul node of the ONNX graph has this layer's weights "
                          "(the exporter renamed them); this layer cannot be kept float in the ONNX INT8 file")
    return sorted({n for nodes in found.values() for n in nodes})


