"""Dead BatchNorm channels: silenced before INT8, so a per-tensor weight scale is set by the channels that compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import kdedge
from conftest import make_idx_dir
from kdedge.config import ExportConfig
from kdedge.models.dead_channels import dead_channels, silence_dead_channels

SHAPE = (1, 12, 12)


def _folded_ranges(model: nn.Module, conv: int = 3) -> torch.Tensor:
    """Each output channel's largest |weight| of a convolution (by default the depthwise one) once its BatchNorm is folded in."""
    conv, bn = model[conv], model[conv + 1]
    w = conv.weight * (bn.weight / (bn.running_var + bn.eps).sqrt()).reshape(-1, 1, 1, 1)
    return w.detach().flatten(1).abs().amax(1)


@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    """A small trained CNN whose depthwise channel 1 only ever sees zeros (the ReLU channel before it never fires)."""
    data = kdedge.load_dataset(str(make_idx_dir(tmp_path_factory.mktemp("dead") / "data", n_train=300, n_test=60, size=12, classes=3)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight[1], model[1].bias[1] = 0.0, -1.0  # channel 1 outputs -1 for every input: ReLU makes it 0, and it gets no gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data.train.inputs(torch.arange(len(data.train))), data.train.labels
    model.train()
    for _ in range(4):
        for i in range(0, len(x), 32):
            loss = nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert model[4].running_var[1] < 0.9 ** 39  # the depthwise channel's statistics decay towards 0 (x0.9 a step, 40 steps) ...
    with torch.no_grad():
        model[4].running_var[1] = 0.0  # ... and reach it in a longer run
    return data, model


def test_a_dead_channel_is_silenced_without_changing_the_function(dead):
    data, model = dead
    ranges = _folded_ranges(model)
    assert ranges[1] > 50 * ranges[[0, 2, 3]].max()  # the outlier a per-tensor scale would span
    assert dead_channels(model) == {"1": [1], "4": [1]}  # γ = 0 in the first block, variance 0 in the second
    silenced, changed = silence_dead_channels(model, SHAPE)
    assert changed == {"1": [1], "4": [1]} and silenced is not model and model[3].weight[1].abs().sum() > 0  # a copy; the model is as trained
    assert _folded_ranges(silenced)[1] == 0
    x = torch.cat([data.test.inputs(torch.arange(len(data.test))), torch.randn(64, *SHAPE) * 3])  # the data, and inputs far from it
    with torch.no_grad():
        torch.testing.assert_close(silenced(x), model(x), rtol=0, atol=1e-6)
    # A BatchNorm that does not follow a convolution alone is reported dead but left as it is; a live model is returned itself
    head = nn.Sequential(nn.Flatten(), nn.Linear(144, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        head[2].running_var[2] = 0.0
    assert dead_channels(head) == {"2": [2]} and silence_dead_channels(head, SHAPE) == (head, {})
    assert silence_dead_channels(silenced, SHAPE)[1] == {"4": [1]}  # still dead by its statistics: silencing again changes nothing
    with torch.no_grad():
        torch.testing.assert_close(silence_dead_channels(silenced, SHAPE)[0](x), model(x), rtol=0, atol=1e-6)
    live = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    assert silence_dead_channels(live, SHAPE) == (live, {})


def _onnx_weight_scales(path) -> dict[tuple[int, ...], float]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return {tuple(consts[n.input[0]].shape): float(consts[n.input[1]].max()) for n in graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[0]].dtype == np.int8 and consts[n.input[0]].ndim == 4}


@pytest.mark.edge("litert")
def test_per_tensor_ptq_scales_the_depthwise_weights_by_the_channels_that_compute(dead, tmp_path):
    """ONNX (onnxruntime's quantizer) and LiteRT (PT2E) PTQ per tensor: the depthwise scale is the live channels' range / 127,
    not the dead channel's (100x wider, and every live weight would round to 0 or ±1)."""
    from ai_edge_litert.interpreter import Interpreter

    data, model = dead
    silenced, _ = silence_dead_channels(model, SHAPE)
    live = float(_folded_ranges(silenced).max()) / 127
    result = kdedge.export_model(model, tmp_path / "x", data=data, config=ExportConfig(formats=("onnx", "onnx-int8", "litert-int8"), per_channel=False,
                                                                                       parity_samples=60, calibration_samples=128, evaluate=False))
    assert all(a.parity["passed"] for a in result.artifacts), [(a.path, a.parity) for a in result.artifacts]
    doc = json.loads((tmp_path / "x" / "export.json").read_text())
    onnx_q = next(a for a in doc["artifacts"] if a["path"] == "model.int8.onnx")["details"]["quantization"]
    assert onnx_q["dead_channels_silenced"] == {"1": [1], "4": [1]}
    assert result.artifact("model.int8.tflite").details["dead_channels_silenced"] == {"1": [1], "4": [1]}
    assert {p.name for p in (tmp_path / "x").iterdir()} == {"export.json", "model.onnx", "model.int8.onnx", "model.int8.tflite",
                                                             "model.int8.tflite.json"}  # the silenced FP32 file quantized was not shipped
    depthwise = _onnx_weight_scales(tmp_path / "x" / "model.int8.onnx")[(4, 1, 3, 3)]
    assert depthwise == pytest.approx(live * 127 / 63.5, rel=0.02)  # 7-bit weights (reduce_range, onnxruntime's default on x86 here)
    per_channel = kdedge.export_model(model, tmp_path / "c", data=data, config=ExportConfig(formats=("onnx", "onnx-int8"), parity_samples=60,
                                                                                           calibration_samples=128, evaluate=False))
    assert "dead_channels_silenced" not in per_channel.artifact("model.int8.onnx").details["quantization"]  # its own scale per channel
    interpreter = Interpreter(model_path=str(tmp_path / "x" / "model.int8.tflite"))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    op = [op for op in interpreter._get_ops_details() if op["op_name"] == "DEPTHWISE_CONV_2D"][-1]  # the 1-channel first convolution is one too
    scales = tensors[op["inputs"][1]]["quantization_parameters"]["scales"]
    assert scales.size == 1 and float(scales[0]) == pytest.approx(live, rel=0.02)


@pytest.mark.edge("executorch")
def test_quantization_aware_training_starts_from_the_silenced_model(dead):
    from kdedge.models.qat import QATModel, calibrate

    data, model = dead
    qat = QATModel(model, SHAPE, scheme="xnnpack-per-tensor", epochs=2)
    assert qat.silenced == {"1": [1], "4": [1]} and qat.quantization()["dead_channels_silenced"] == {"1": [1], "4": [1]}
    assert QATModel(model, SHAPE, scheme="xnnpack").silenced == {"1": [1]}  # per channel: only γ = 0, which PT2E's QAT turns into NaN
    x = data.train.inputs(torch.arange(64))
    calibrate(qat, [x])
    qat.start_epoch(1)
    qat.train()
    loss = qat(x).logsumexp(1).mean()
    loss.backward()  # the silenced channel trains without a 0/0 in the conv+BatchNorm simulation
    assert all(torch.isfinite(p.grad).all() for p in qat.parameters() if p.grad is not None)
    qat.eval()
    graph = qat.converted()
    with torch.no_grad():
        out = graph(x)
        torch.testing.assert_close(out, qat(x), rtol=0, atol=1.01 * qat.output_scale(graph))
    silenced, _ = silence_dead_channels(model, SHAPE)
    weights = [n for n in graph.graph.nodes if n.op == "call_function" and "dequantize_per_tensor" in str(n.target) and n.args[0].op == "get_attr"
               and getattr(graph, n.args[0].target).shape == (4, 1, 3, 3)]
    widest = max(float(_folded_ranges(silenced, i).max()) for i in (0, 3))  # both convolutions' weights are (4, 1, 3, 3)
    assert len(weights) == 2 and all(n.args[1] < 1.01 * widest / 127 for n in weights), [n.args[1] for n in weights]
