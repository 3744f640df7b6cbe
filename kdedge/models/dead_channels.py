"""Dead BatchNorm channels, made exactly constant before INT8.

A channel whose input never varied in training (a depthwise filter behind a ReLU channel that never
fires) ends with a BatchNorm running variance of ~0. BatchNorm then multiplies that channel by
``γ/√(var+ε) ≈ γ/√ε`` (316·γ for ε = 1e-5); harmless in float, since its input minus the running mean
is ~0, but once BatchNorm is folded into the convolution that channel's weights are the largest in
the tensor by two orders of magnitude (measured: 137 vs a median channel's 0.96 on a ``dw_cnn@0.5``
seed). A per-tensor INT8 weight scale spans them, and every other channel's weights round to 0 or ±1:
PTQ lost 26-64 points on that student.

A channel whose γ is 0 outputs ``β`` whatever its input, and PT2E's quantization-aware training
turns it into NaN (it divides by γ/√(var+ε)). :func:`silence_dead_channels` sets each such channel's
convolution weights to 0, the BatchNorm's running mean to the convolution's bias (0 without one) and
γ to a tiny nonzero value, so the channel outputs exactly ``β`` for every input: what it output on
every training image (its input there was its running mean, or γ was 0).
The float model's function on the data is unchanged; the folded weights lose their outlier. The INT8
exports and quantization-aware training apply it to a copy of the model; the FP32 artifacts ship the
model as trained.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdedge._modes import evaluating

__all__ = ["DEAD_VARIANCE", "SILENT_SCALE", "dead_channels", "silence_dead_channels"]

#: A channel is dead when its running variance is at most this fraction of its BatchNorm's ε: its output then varied on the
#: training data by at most |γ|·√(1e-6) = 0.001·|γ|.
DEAD_VARIANCE = 1e-6

#: The scale γ a silenced channel gets: any γ then gives exactly β, since the normalized input is 0; not 0 itself, because PT2E's
#: quantization-aware conv+BatchNorm divides the convolution's output by γ/√(var+ε) (0/0 would be NaN, and was, measured).
SILENT_SCALE = 1e-12

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def dead_channels(model: nn.Module, *, variance: bool = True) -> dict[str, list[int]]:
    """``{BatchNorm module name: [channel, ...]}`` for each channel whose output is constant: its running variance is ~0
    (``DEAD_VARIANCE · ε``; only with ``variance``), or its scale γ is 0."""
    found: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
            dead = module.running_var <= DEAD_VARIANCE * module.eps if variance else torch.zeros_like(module.running_var, dtype=torch.bool)
            if module.weight is not None:
                dead |= module.weight.detach() == 0
            if dead.any():
                found[name] = dead.nonzero().flatten().tolist()
    return found


def _producers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, str]:
    """``{BatchNorm module name: convolution module name}`` for each BatchNorm that normalizes one convolution's output alone.

    Read from ``torch.export``'s graph (weights named by the graph signature), not from the order modules were registered in;
    empty when the model cannot be exported (its INT8 export then reports why).
    """
    device = next(iter(model.parameters()), torch.zeros(())).device
    try:
        with evaluating(model):
            program = torch.export.export(model, (torch.zeros(2, *input_shape, device=device),))
    except Exception:  # noqa: BLE001 - torch.export raises many types; an untraceable model is quantized as it is
        return {}
    names = program.graph_signature.inputs_to_parameters | program.graph_signature.inputs_to_buffers

    def owner(node: object) -> str | None:
        name = names.get(getattr(node, "name", ""))
        return name.rsplit(".", 1)[0] if name else None

    pairs: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target) or len(node.args) < 5:
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and "conv" in str(source.target) and len(source.users) == 1):
            continue
        if any(isinstance(a, torch.fx.Node) and len(a.users) != 1 for a in (*source.args[1:3], node.args[4])):
            continue  # a convolution or BatchNorm called at more than one place: changing it would change the others
        bn, conv = owner(node.args[4]), owner(source.args[1])  # running_var; the convolution's weight
        if bn is not None and conv is not None:
            pairs[bn] = conv
    return pairs


def silence_dead_channels(model: nn.Module, input_shape: tuple[int, ...], *, variance: bool = True) -> tuple[nn.Module, dict[str, list[int]]]:
    """A copy of ``model`` whose dead BatchNorm channels output exactly ``β`` (see the module's docstring), and what was changed.

    Returns ``(model, {})`` — the model itself, not a copy — when no channel can be silenced, and leaves out a dead channel whose
    BatchNorm does not follow a convolution alone (its folded weights are not a convolution's). ``input_shape``: one sample's
    ``(C, H, W)``, to trace which convolution feeds which BatchNorm. ``variance=False``: only the channels whose γ is 0 —
    with per-channel weight scales a dead channel's folded weights set only their own scale, and silencing them would only
    leave a zero channel whose scale the quantizers clamp to float32's ε.
    """
    dead = dead_channels(model, variance=variance)
    if not dead:
        return model, {}
    pairs = _producers(model, input_shape)
    modules = dict(model.named_modules())
    dead = {bn: channels for bn, channels in dead.items() if isinstance(modules.get(pairs.get(bn, "")), _CONVS)}
    if not dead:
        return model, {}
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    silenced: dict[str, list[int]] = {}
    for bn_name, channels in dead.items():
        conv, bn = modules[pairs[bn_name]], modules[bn_name]
        index = torch.tensor(channels)
        with torch.no_grad():
            conv.weight[index] = 0
            bn.running_mean[index] = conv.bias[index] if conv.bias is not None else 0
            if bn.weight is not None:
                bn.weight[index] = SILENT_SCALE
        silenced[bn_name] = channels
    return model, silenced
