"""Preprocessing in the graph (``--input-format uint8-nhwc|uint8-nchw``): artifacts that take the decoded pixels.

Golden: the pixels kdedge feeds such an artifact are the stored ones, exactly, and the wrapper computes
the float model's normalization to float32 rounding. Parity: a uint8 ONNX FP32 and INT8 export of a
trained student, each checked by the export against the float model on the same 1,000 test images and
scored here by onnxruntime fed the raw pixels. The edge runtimes take a uint8-nhwc bundle in
tests/test_edge.py; the bundle's predict.py feeds one in tests/test_bundle.py; a quantization-aware
model's INT8 takes pixels in every runtime in tests/test_qat.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdedge.cli import main
from kdedge.config import ExportConfig, TrainConfig
from kdedge.data.pixels import PixelInput, input_format, recorded_input_format
from kdedge.errors import ConfigError


@pytest.fixture(scope="module")
def student(fmnist):
    """tiny_cnn after one epoch on 3,000 training images (about 80 % test accuracy)."""
    from kdedge import create_model, train
    from kdedge.models import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28))
    model = create_model(spec)
    data = fmnist.limit(train=3000, test=1000)
    train(model, data.train, config=TrainConfig(epochs=1, batch_size=64, device="cpu"), progress=False)
    return model.eval(), data


@pytest.mark.parametrize("name", ["uint8-nhwc", "uint8-nchw"])
def test_fed_pixels_are_the_stored_pixels_and_the_wrapper_is_the_float_model(fmnist, name):
    rows = torch.arange(0, 2000, 7)
    stored = fmnist.test.raw(rows)  # (B, 1, 28, 28) uint8
    fmt = input_format(name, fmnist.spec)
    fed = fmt.feed(fmnist.test.inputs(rows).numpy())
    expected = stored.numpy().transpose(0, 2, 3, 1) if name == "uint8-nhwc" else stored.numpy()
    assert fed.dtype == np.uint8 and np.array_equal(fed, expected)  # exact: round trip through the normalization loses nothing
    seen = []
    wrapped = fmt.wrap(lambda x: seen.append(x) or x.sum((1, 2, 3)))  # type: ignore[arg-type]
    assert isinstance(wrapped, PixelInput) and wrapped.input_dtype == torch.uint8
    wrapped(torch.from_numpy(fed))
    # the dataset's own x*a + b, up to float32 rounding (the dataset fuses it into one addcmul)
    assert seen[0].dtype == torch.float32 and (seen[0] - fmnist.test.inputs(rows)).abs().max() <= 1e-6


def test_an_rgb_pixel_round_trips_with_its_own_channel_statistics():
    from kdedge.data import DatasetSpec

    spec = DatasetSpec("rgb", (3, 4, 5), 2, ("a", "b"), mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.05), color="RGB")
    pixels = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 5), dtype=np.uint8)
    x = ((pixels / 255.0 - np.array(spec.mean).reshape(1, 3, 1, 1)) / np.array(spec.std).reshape(1, 3, 1, 1)).astype(np.float32)
    fmt = input_format("uint8-nhwc", spec)
    assert np.array_equal(fmt.feed(x), pixels.transpose(0, 2, 3, 1))
    contract = fmt.contract(spec.input_shape)
    assert contract["shape"] == ["batch", 4, 5, 3] and contract["dtype"] == "uint8" and contract["layout"] == "NHWC"
    again = recorded_input_format(contract, {"scale": 1 / 255, "mean": list(spec.mean), "std": list(spec.std)})
    assert again == fmt and recorded_input_format({"dtype": "float32"}, {}) is None


def test_a_malformed_pixel_contract_is_one_line_not_a_guess():
    from kdedge.errors import DataError

    contract = {"name": "input", "shape": ["batch", 28, 28, 1], "dtype": "uint8", "layout": "NHWC", "format": "uint8-nhwc"}
    good = {"scale": 1 / 255, "mean": [0.286], "std": [0.353]}
    assert recorded_input_format(contract, good).std == (0.353,)
    for bad, why in ((good | {"mean": []}, "0 mean and 1 std values for 1 channel"), (good | {"scale": 0}, "scale 0.0 is not positive"),
                     (good | {"std": [0.0]}, "a std is not positive"), ({}, "KeyError"), (good | {"scale": None}, "TypeError")):
        with pytest.raises(DataError, match=why):
            recorded_input_format(contract, bad)
    with pytest.raises(DataError, match="format is not a uint8 one"):
        recorded_input_format(contract | {"format": "float"}, good)


def test_float_stored_data_cannot_take_uint8_pixels(fmnist):
    import dataclasses

    spec = dataclasses.replace(fmnist.spec, scale=1.0)
    with pytest.raises(ConfigError, match="takes 8-bit pixels, but data 'fashion-mnist' stores pixels scaled by 1"):
        input_format("uint8-nhwc", spec)
    assert input_format("float", spec).feed(np.ones((1, 1, 2, 2), np.float32)).dtype == np.float32  # float passes through


def test_uint8_onnx_export_matches_the_float_model_on_the_same_images(student, tmp_path):
    from kdedge.exporters import export_model
    from kdedge.ort import ort_predict, ort_session

    model, data = student
    result = export_model(model, tmp_path / "x", data=data, config=ExportConfig(formats=("onnx", "onnx-int8", "onnx-fp16"), input_format="uint8-nchw"))
    m = result.manifest
    assert m["input"] | {"preprocessing": None} == {"name": "input", "shape": ["batch", 1, 28, 28], "dtype": "uint8", "layout": "NCHW",
                                                     "format": "uint8-nchw", "preprocessing": None}
    assert m["preprocessing"]["in_graph"] is True and m["preprocessing"]["dtype"] == "uint8"
    by = {a.path: a for a in result.artifacts}
    [fp32], [int8] = by["model.onnx"].parity["outputs"], by["model.int8.onnx"].parity["outputs"]
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["argmax_agreement"] == 1.0 and fp32["samples"] == 1000
    assert int8["argmax_agreement"] >= 0.95 and by["model.fp16.onnx"].parity["passed"]
    # The file alone, fed the stored pixels, scores what the float model scores on the normalized ones.
    pixels = data.test.raw(torch.arange(len(data.test))).numpy()
    with torch.inference_mode():
        reference = model(data.test.inputs()).argmax(1).numpy()
    for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx"):
        session = ort_session(tmp_path / "x" / name)
        assert session.get_inputs()[0].type == "tensor(uint8)"
        predicted = ort_predict(session, pixels).argmax(1)
        agreement = float((predicted == reference).mean())
        assert agreement >= (0.999 if name == "model.onnx" else 0.95), (name, agreement)
        assert by[name].accuracy["accuracy"] == pytest.approx(float((predicted == data.test.labels.numpy()).mean()), abs=1e-9)
    # The INT8 file takes the pixels as its first layer's quantized input: no cast, no float normalization, no QuantizeLinear before
    # the first convolution, whose DequantizeLinear reads the graph input itself with scale 1/(255 std) and zero point round(255 mean).
    import onnx
    from onnx import numpy_helper

    q = by["model.int8.onnx"].details["quantization"]
    assert q["pixel_input"].startswith("folded"), q
    graph = onnx.load(str(tmp_path / "x" / "model.int8.onnx")).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    (first,) = [n for n in graph.node if "input" in n.input]
    assert first.op_type == "DequantizeLinear" and not [n for n in graph.node if n.op_type == "Cast"]
    spec = data.spec
    assert consts[first.input[1]] == pytest.approx(1 / 255 / spec.std[0], rel=1e-5) and int(consts[first.input[2]]) == round(255 * spec.mean[0])
    # It computes nearly what the float-input INT8 file computes: the same calibration from the first layer on, the input read on
    # the pixels' own grid (its zero point rounded by at most half a pixel level) instead of the calibrated one.
    flt = export_model(model, tmp_path / "f", data=data, config=ExportConfig(formats=("onnx", "onnx-int8"), evaluate=False))
    same = ort_predict(ort_session(tmp_path / "f" / "model.int8.onnx"), data.test.inputs().numpy()).argmax(1)
    assert float((ort_predict(ort_session(tmp_path / "x" / "model.int8.onnx"), pixels).argmax(1) == same).mean()) >= 0.99
    # The layers --keep-float names are the model's, though they sit behind the wrapper.
    kept = export_model(model, tmp_path / "k", data=data, config=ExportConfig(formats=("onnx", "onnx-int8", "executorch-int8"),
                                                                              input_format="uint8-nhwc", keep_float=("features.0",), evaluate=False))
    onnx_q, pte_q = (kept.artifact(name).details["quantization"] for name in ("model.int8.onnx", "model.int8.pte"))
    assert onnx_q["float_nodes"] and onnx_q["float_layers"] == pte_q["float_layers"] == ["features.0"]  # recorded as the user named them
    assert onnx_q["pixel_input"].startswith("float preprocessing") and "float layer" in onnx_q["pixel_input"]  # its first layer is float: no fold
    # Fed what it does not take, a session refuses in one line instead of reading normalized values as pixels (or the reverse).
    with pytest.raises(ConfigError, match="takes uint8 pixels .* got float32 inputs"):
        ort_predict(ort_session(tmp_path / "x" / "model.onnx"), data.test.inputs(slice(0, 2)).numpy())
    with pytest.raises(ConfigError, match="got uint8 pixels; normalize them first"):
        ort_predict(ort_session(tmp_path / "f" / "model.onnx"), pixels[:2])


def test_bench_feeds_pixels_to_a_uint8_export(student, tmp_path, capsys):
    from kdedge.exporters import export_model

    model, data = student
    export_model(model, tmp_path / "x", data=data, config=ExportConfig(formats=("onnx",), input_format="uint8-nhwc", parity_samples=200))
    accuracy = json.loads((tmp_path / "x" / "export.json").read_text())["artifacts"][0]["accuracy"]["accuracy"]
    fast = ["--batch-sizes", "1,4", "--warmup-iters", "1", "--min-iters", "3", "--min-s", "0", "--no-plots", "--threads", "1", "--test-limit", "1000"]
    for source in (tmp_path / "x", tmp_path / "x" / "model.onnx"):  # an export directory, and the file alone (its metadata says uint8)
        out = tmp_path / f"r-{source.name}"
        assert main(["bench", str(source), "--targets", "ort-cpu", *fast, "--out", str(out)]) == 0, capsys.readouterr().err
        rows = json.loads((out / "report.json").read_text())["rows"]
        assert {r["batch"] for r in rows} == {1, 4} and all(r["accuracy"]["top1"] == pytest.approx(accuracy, abs=1e-9) for r in rows)


def test_uint8_input_is_refused_where_it_is_not_built(capsys, tmp_path):
    assert main(["export", "resnet", "--format", "onnx,tensorrt", "--input-format", "uint8-nhwc", "--out", str(tmp_path / "x")]) == 2
    assert "input_format uint8-nhwc is not built for TensorRT engines yet" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _qdq_pixel_graph(*, gain: float, bias: float, input_scale: float, square: bool = False, transposes: int = 0):
    """A hand-made uint8-input QDQ graph as onnxruntime's quantizer leaves a PixelInput export: cast, layout, x * gain + bias in
    float, QuantizeLinear/DequantizeLinear at ``input_scale``, then a convolution on the dequantized image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
             [("gain", gain, np.float32), ("bias", bias, np.float32), ("s", input_scale, np.float32), ("zp", 128, np.uint8)]]
    inits.append(numpy_helper.from_array(rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "w"))
    nodes = [helper.make_node("Cast", ["pixels"], ["c"], name="cast", to=TensorProto.FLOAT)]
    last = "c"
    for i in range(transposes):  # NHWC -> NCHW, then (a second, needless one) back and forth
        perm = [0, 3, 1, 2] if i % 2 == 0 else [0, 2, 3, 1]
        nodes.append(helper.make_node("Transpose", [last], [f"t{i}"], name=f"transpose{i}", perm=perm))
        last = f"t{i}"
    if square:
        nodes.append(helper.make_node("Mul", [last, last], ["sq"], name="square"))
        last = "sq"
    nodes += [helper.make_node("Mul", [last, "gain"], ["m"], name="mul"), helper.make_node("Add", ["m", "bias"], ["x"], name="add"),
              helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"), helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq"),
              helper.make_node("Conv", ["dq", "w"], ["y"], name="conv")]
    shape = [1, 6, 6, 1] if transposes % 2 else [1, 1, 6, 6]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_pixel_fold_computes_the_same_and_refuses_what_it_cannot_fold():
    """Folded: the convolution reads the pixels through one DequantizeLinear and computes what the float preprocessing + QDQ
    computed, to float32 rounding (255 mean is a whole pixel level here). Refused, with the graph untouched: a chain that is
    not affine, two layout changes, an input scale that is not the pixels' own."""
    import onnx
    import onnxruntime as ort

    from kdedge.exporters.quantize import fold_pixel_quantization

    std, mean = 0.35, 128 / 255
    ok = dict(gain=1 / (255 * std), bias=-mean / std, input_scale=1 / (255 * std))
    pixels = np.random.default_rng(1).integers(0, 256, size=(1, 6, 6, 1), dtype=np.uint8)

    def run(model, x):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]

    proto = _qdq_pixel_graph(**ok, transposes=1)
    before = run(proto, pixels)
    assert fold_pixel_quantization(proto).startswith("folded: the uint8 pixels are the first layer's quantized input (scale")
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node] == ["DequantizeLinear", "Transpose", "Conv"]
    np.testing.assert_allclose(run(proto, pixels), before, rtol=1e-5, atol=1e-5)
    # A bright data set (mean 0.86): the chain's float32 rounding must not read as a non-affine map
    bright = _qdq_pixel_graph(gain=1 / (255 * 0.3395), bias=-0.8632 / 0.3395, input_scale=1 / (255 * 0.3395))
    assert fold_pixel_quantization(bright).startswith("folded"), fold_pixel_quantization(bright)
    for kwargs, why in [(dict(ok, square=True), "not one affine map"), (dict(ok, transposes=2), "more than the one layout change"),
                        (dict(ok, input_scale=2 / (255 * std)), "not the pixels' own"),
                        (dict(ok, bias=1.0), "maps no pixel value to zero")]:
        proto = _qdq_pixel_graph(**kwargs)
        nodes = [n.op_type for n in proto.graph.node]
        result = fold_pixel_quantization(proto)
        assert result.startswith("float preprocessing") and why in result, (kwargs, result)
        assert [n.op_type for n in proto.graph.node] == nodes
