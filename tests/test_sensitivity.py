"""Per-layer INT8 sensitivity and layers kept in float, on a model built so one layer cannot survive INT8.

``OutlierNet`` computes ``W x`` exactly in FP32 (``fc1`` splits ``x`` into ``relu(x)`` and ``relu(-x)``,
``fc2`` recombines them), and every row of ``fc1`` also has a weight of 1000 on an input pixel that is
always 0. That weight changes nothing in float, but it sets each row's per-channel INT8 scale to
1000/127, so the ±1 weights round to 0 and ``fc1`` in INT8 outputs nothing: accuracy falls to the
majority class. ``fc2`` alone in INT8 keeps nearly all of it. So the ranking, the ``auto`` choice and
every runtime's artifact with ``fc1`` kept in float have answers known in advance.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdedge.errors import ConfigError
from kdedge.exporters.edge import edge_predict, export_edge, load_edge
from kdedge.exporters.onnx import export_onnx
from kdedge.exporters.quantize import quantize_int8
from kdedge.models import ModelSpec
from kdedge.ort import ort_predict, ort_session
from kdedge.sensitivity import (check_float_layers, choose_float_layers, keep_float_quantizer, layer_sensitivity, onnx_float_nodes,
                                quantizable_layers)

pytestmark = pytest.mark.edge("executorch")  # the sensitivity pass simulates with ExecuTorch's XNNPACK quantizer

SHAPE = (1, 4, 4)


class OutlierNet(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        k, n = w.shape  # n = 15 used pixels; the 16th is always 0
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(16, 2 * n + 2)
        self.fc2 = nn.Linear(2 * n + 2, k)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.zero_()
            self.fc1.weight[:n, :n] = torch.eye(n)
            self.fc1.weight[n : 2 * n, :n] = -torch.eye(n)
            self.fc1.weight[:, n] = 1000.0  # the outlier: multiplies a pixel that is always 0
            self.fc2.weight.zero_()
            self.fc2.bias.zero_()
            self.fc2.weight[:, :n] = w
            self.fc2.weight[:, n : 2 * n] = -w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.flat(x))))


def _data(n: int, w: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 16)
    x[:, :15] = torch.randn(n, 15, generator=g)
    return x.reshape(n, *SHAPE), (x[:, :15] @ w.T).argmax(1)


@pytest.fixture(scope="module")
def case():
    w = torch.randn(4, 15, generator=torch.Generator().manual_seed(0))
    model = OutlierNet(w).eval()
    x_val, y_val = _data(2000, w, seed=1)
    calibration, _ = _data(256, w, seed=2)
    return model, DataLoader(TensorDataset(x_val, y_val), batch_size=500), calibration.numpy(), x_val.numpy(), y_val.numpy()


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def test_layers_and_bad_names(case):
    model = case[0]
    assert quantizable_layers(model) == ["fc1", "fc2"]
    assert check_float_layers(model, ["fc1", "fc1"]) == ("fc1",)
    with pytest.raises(ConfigError, match=r"--keep-float 'fc9' is not a layer of OutlierNet; .* one of: fc1, fc2"):
        check_float_layers(model, ["fc9"])
    with pytest.raises(ConfigError, match="'flat' is not a layer"):  # a module, but it holds no convolution or linear layer
        check_float_layers(model, ["flat"])


def test_sensitivity_ranks_the_outlier_layer_and_auto_keeps_only_it(case):
    model, val, calibration, _, _ = case
    s = layer_sensitivity(model, val, calibration)
    assert s.fp32_accuracy == 1.0  # W x exactly
    assert s.int8_accuracy < 0.6  # fc1 in INT8 outputs zeros
    assert [r.layer for r in s.layers] == ["fc1", "fc2"]
    fc1, fc2 = s.layers
    assert fc1.drop_pt > 40 and fc2.drop_pt < 3, s.layers
    assert s.most_sensitive(1) == ["fc1"]
    kept = choose_float_layers(model, val, calibration, s, "auto", max_drop=3.0)
    assert kept == ["fc1"]
    assert s.steps[0]["drop_pt"] > 40 and s.steps[1]["drop_pt"] <= 3.0
    assert choose_float_layers(model, val, calibration, s, 1, max_drop=0.0) == ["fc1"]
    assert s.to_dict()["layers"][0] == {"layer": "fc1", "accuracy": fc1.accuracy, "drop_pt": fc1.drop_pt}


def test_onnx_int8_keeps_the_layer_float_in_onnxruntime(case, tmp_path):
    model, _, calibration, x, y = case
    export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert len(onnx_float_nodes(proto, ["fc1"])) == 1
    with pytest.raises(ConfigError, match="no Conv/Gemm/MatMul node of the ONNX graph has this layer's weights"):
        onnx_float_nodes(proto, ["fc3"])
    quantize_int8(tmp_path / "m.onnx", tmp_path / "all.onnx", calibration=calibration)
    info = quantize_int8(tmp_path / "m.onnx", tmp_path / "kept.onnx", calibration=calibration, keep_float=("fc1",))
    assert info.float_layers == ["fc1"] and len(info.float_nodes or []) == 1
    kept = onnx.load(str(tmp_path / "kept.onnx"))
    dequantized = {n.output[0] for n in kept.graph.node if n.op_type == "DequantizeLinear"}
    gemms = {n.input[1]: n for n in kept.graph.node if n.op_type in ("Gemm", "MatMul")}
    assert "fc1.weight" in gemms and not set(gemms["fc1.weight"].input) & dequantized  # float weights, float input
    assert any(n.input[1] in dequantized for n in kept.graph.node if n.op_type in ("Gemm", "MatMul") and n is not gemms["fc1.weight"])  # fc2 is INT8
    all_int8 = _accuracy(ort_predict(ort_session(tmp_path / "all.onnx"), x), y)
    kept_int8 = _accuracy(ort_predict(ort_session(tmp_path / "kept.onnx"), x), y)
    assert all_int8 < 0.6 and kept_int8 > 0.97, (all_int8, kept_int8)


@pytest.mark.parametrize("fmt", ["executorch", "litert"])
def test_edge_int8_keeps_the_layer_float_in_its_runtime(case, tmp_path, fmt):
    from kdedge.exporters.edge import edge_unavailable

    if edge_unavailable(fmt):
        pytest.skip(edge_unavailable(fmt))
    model, _, calibration, x, y = case
    accuracy = {}
    for name, keep in (("all", ()), ("kept", ("fc1",))):
        path = tmp_path / f"{name}.{'pte' if fmt == 'executorch' else 'tflite'}"
        details = export_edge(fmt, out=path, precision="int8", model=model, input_shape=SHAPE, calibration=calibration, metadata={},
                              max_batch=64, keep_float=keep)
        assert details["quantization"].get("float_layers") == (list(keep) or None)
        accuracy[name] = _accuracy(edge_predict(load_edge(fmt, path), x, batch_size=64), y)
    assert accuracy["all"] < 0.6 and accuracy["kept"] > 0.97, accuracy


def test_keep_float_quantizer_marks_nothing_when_empty():
    sentinel = object()
    assert keep_float_quantizer(sentinel, ()) is sentinel


def test_qat_model_trains_no_fake_quant_for_kept_layers_and_reloads(case):
    from kdedge.models.qat import QATModel

    model = case[0]
    qat = QATModel(model, SHAPE, keep_float=("fc1",))
    graph = qat.converted()
    linears = [n for n in graph.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    weight_inputs = {str(n.args[1].target) if n.args[1].op == "get_attr" else "dequantized" for n in linears}
    assert len(linears) == 2 and len(weight_inputs) == 2 and "dequantized" in weight_inputs  # fc1 float, fc2 through a dequantize
    assert qat.quantization()["float_layers"] == ["fc1"]
    spec = ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)).with_qat("xnnpack", ("features.0.0",))
    assert ModelSpec.from_dict(spec.to_dict()) == spec and spec.name != spec.with_qat("xnnpack").name
    assert "float_layers" not in ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)).with_qat("xnnpack").to_dict()
