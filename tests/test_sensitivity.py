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

from kdedge.errors import ConfigError, ExportError
from kdedge.exporters.edge import edge_predict, export_edge, load_edge
from kdedge.exporters.onnx import export_onnx
from kdedge.exporters.quantize import quantize_int8
from kdedge.models import ModelSpec
from kdedge.ort import ort_predict, ort_session
from kdedge.sensitivity import (check_float_layers, choose_float_layers, keep_float_quantizer, layer_sensitivity, onnx_float_nodes,
                                plan_float_layers, quantizable_layers)

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
    assert check_float_layers(model, ["fc2", "fc1", "fc1"]) == ("fc1", "fc2")  # a set: sorted, once each
    with pytest.raises(ConfigError, match=r"--keep-float 'fc9' is not a layer of OutlierNet; .* one of: fc1, fc2"):
        check_float_layers(model, ["fc9"])
    with pytest.raises(ConfigError, match="'flat' is not a layer"):  # a module, but it holds no convolution or linear layer
        check_float_layers(model, ["flat"])


def test_sensitivity_ranks_the_outlier_layer_and_auto_keeps_only_it(case):
    from types import SimpleNamespace

    model, val, calibration, _, _ = case
    s = layer_sensitivity(model, val, calibration)
    assert s.fp32_accuracy == 1.0  # W x exactly
    assert s.int8_accuracy < 0.6  # fc1 in INT8 outputs zeros
    assert [r.layer for r in s.layers] == ["fc1", "fc2"]
    fc1, fc2 = s.layers
    assert fc1.drop_pt > 40 and fc2.drop_pt < 3, s.layers
    assert s.most_sensitive(1) == ["fc1"] and choose_float_layers(model, val, calibration, s, 1, max_drop=0.0) == ["fc1"]
    # The bundle's path (compress-and-export --keep-float auto): measured on the validation split, recorded for the manifest.
    kept, record = plan_float_layers(model, SimpleNamespace(val=val, train=None), calibration, "auto", max_drop=3.0)
    assert kept == ("fc1",) and record["float_layers"] == ["fc1"] and record["split"] == "validation"
    assert record["why"].startswith("auto: fewest most-sensitive layers") and record["layers"][0]["layer"] == "fc1"
    steps = record["auto_steps"]
    assert [st["float_layers"] for st in steps] == [[], ["fc1"]] and steps[0]["drop_pt"] > 40 and steps[1]["drop_pt"] <= 3.0


def test_per_tensor_sensitivity_sees_the_outlier_that_per_channel_scales_absorb(case):
    """The outlier on one row of fc1 only: per channel, that row has its own scale and INT8 keeps nearly everything; per tensor
    (--per-tensor), the row sets fc1's one scale and fc1 collapses, so the ranking and the record follow the granularity."""
    import copy

    model, val, calibration, _, _ = case
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.fc1.weight[:, 15] = 0.0
        model.fc1.weight[-1, 15] = 1000.0  # a row whose output is always 0: the pixel is always 0
    per_channel = layer_sensitivity(model, val, calibration)
    per_tensor = layer_sensitivity(model, val, calibration, per_channel=False)
    assert per_channel.per_channel and per_channel.int8_drop_pt < 3, per_channel.layers
    assert not per_tensor.per_channel and "int8 per-tensor weights" in per_tensor.scheme
    assert per_tensor.layers[0].layer == "fc1" and per_tensor.layers[0].drop_pt > 40 and per_tensor.int8_drop_pt > 40, per_tensor.layers


def test_onnx_int8_keeps_the_layer_float_in_onnxruntime(case, tmp_path):
    model, _, calibration, x, y = case
    export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert len(onnx_float_nodes(proto, ["fc1"])) == 1
    with pytest.raises(ExportError, match="no Conv/Gemm/MatMul node of the ONNX graph has this layer's weights"):
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


def _conv_weights(graph: torch.fx.GraphModule) -> dict[str, str]:
    """Each convolution/linear node's module -> "float" (weights read as they are) or "int8" (through a dequantize)."""
    out = {}
    for n in graph.graph.nodes:
        if n.op == "call_function" and any(k in str(n.target) for k in ("conv2d", "linear")):
            module = list((n.meta.get("nn_module_stack") or {}).values())[-1][0]
            out[module.removeprefix("L['self'].")] = "int8" if "dequantize" in str(getattr(n.args[1], "target", "")) else "float"
    return out


def test_qat_model_trains_no_fake_quant_for_kept_layers_and_reloads(case):
    from kdedge.models.qat import QATModel

    qat = QATModel(case[0], SHAPE, keep_float=("fc1",))
    assert _conv_weights(qat.converted()) == {"fc1": "float", "fc2": "int8"}
    assert qat.quantization()["float_layers"] == ["fc1"]
    spec = ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)).with_qat("xnnpack", ("features.0.0",))
    assert ModelSpec.from_dict(spec.to_dict()) == spec and spec.name != spec.with_qat("xnnpack").name
    assert "float_layers" not in ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)).with_qat("xnnpack").to_dict()


def test_conv_batchnorm_relu_layer_kept_float_in_ptq_and_qat():
    """A convolution with its BatchNorm and ReLU (what the quantizers fuse): float under PTQ and QAT, the next one INT8."""
    from kdedge.models import create_model
    from kdedge.models.qat import QATModel, _quantizer, _torchao

    _, quantize_pt2e = _torchao()
    torch.manual_seed(0)
    model = create_model(ModelSpec("tiny_cnn", 1.0, 3, (1, 12, 12))).eval()
    x = torch.randn(8, 1, 12, 12)
    graph = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    prepared = quantize_pt2e.prepare_pt2e(graph, keep_float_quantizer(_quantizer("xnnpack", qat=False), ("features.0.0",)))
    prepared(x)
    expected = {"features.0.0": "float", "features.2.0": "int8", "head.1": "int8", "head.3": "int8"}
    assert _conv_weights(quantize_pt2e.convert_pt2e(prepared)) == expected
    qat = QATModel(model, (1, 12, 12), keep_float=("features.0",))  # the whole block: conv, BatchNorm, ReLU
    assert _conv_weights(qat.converted()) == expected


def test_a_layer_the_graph_does_not_record_is_an_error_not_left_int8():
    """A module called through a second attribute records that name in the graph: keeping it float by its first name cannot work."""
    from kdedge.models.qat import _quantizer, _torchao

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)
            self.alias = self.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.alias(x.flatten(1))

    _, quantize_pt2e = _torchao()
    model = Aliased().eval()
    assert check_float_layers(model, ["fc"]) == ("fc",)  # named_modules() lists it as fc
    graph = torch.export.export(model, (torch.randn(2, *SHAPE),)).module()
    with pytest.raises(ExportError, match="--keep-float fc: no operation of the captured graph records this module"):
        quantize_pt2e.prepare_pt2e(graph, keep_float_quantizer(_quantizer("xnnpack", qat=False), ("fc",)))


def test_sensitivity_command(tmp_path, capsys):
    """`kdedge sensitivity CKPT`: the table of every layer and the JSON, scored on the held-out 10 % of the training images."""
    import json

    import kdedge
    from conftest import make_idx_dir
    from kdedge.cli import main
    from kdedge.models import create_model, save_checkpoint

    data = kdedge.load_dataset(str(make_idx_dir(tmp_path / "data", n_train=200, n_test=20, size=12, classes=3)))
    spec = ModelSpec("tiny_cnn", 1.0, 3, (1, 12, 12))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.safetensors", create_model(spec), spec, data.spec)
    assert main(["sensitivity", str(tmp_path / "m.safetensors"), "--calibration-samples", "1", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "tiny_cnn on 20 held-out training images" in out and "only it INT8" in out
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["model"] == "tiny_cnn" and sorted(r["layer"] for r in record["layers"]) == ["features.0.0", "features.2.0", "head.1", "head.3"]
