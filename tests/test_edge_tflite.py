"""LiteRT (``.tflite``): the shipped teacher converted from PyTorch, run on 1,000 real test images.

The reference is onnxruntime on the teacher's FP32 ONNX export. Tolerances: FP32 max |Δ| <= 1e-3
and 100 % argmax agreement, run by ``ai_edge_litert``'s interpreter alone; kdedge's session equals
that interpreter to 1e-6; INT8 >= 97 % argmax agreement with FP32 and accuracy within 1.5 pt of it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kdedge.errors import ExportError
from kdedge.exporters.edge import edge_predict, export_edge, load_edge, sidecar_path
from kdedge.exporters.tflite import Session, read_metadata

pytestmark = pytest.mark.edge("litert")  # skipped without the runtime, unless KDEDGE_REQUIRE_EDGE=1 (tests/conftest.py)

N = 1000


@pytest.fixture(scope="module")
def teacher_tflite(tmp_path_factory, edge_teacher):
    """The teacher as FP32 and INT8 LiteRT models, its ONNX export, and onnxruntime's FP32 logits on 1,000 test images."""
    t = edge_teacher
    root = tmp_path_factory.mktemp("litert")
    art = {}
    for precision in ("fp32", "int8"):
        path = root / f"model.{precision}.tflite"
        details = export_edge("litert", out=path, precision=precision, model=t.model, input_shape=(1, 28, 28),
                              calibration=t.calibration, metadata=t.meta, max_batch=256)
        print(f"\n{path.name}: converted in {details['seconds']:.1f} s, batch {details['batch']}")
        art[precision] = {"path": path, "details": details}
    return art, t.meta, t.x, t.labels, t.reference, root


def _interpreter(path, **kwargs):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), **kwargs)


def _raw_logits(path, x, *, batch=250):
    """The LiteRT interpreter alone, as a deployment outside kdedge would call it: resize, allocate, set, invoke."""
    interpreter = _interpreter(path)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    logits = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        interpreter.resize_tensor_input(inp["index"], list(chunk.shape), strict=True)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        logits.append(interpreter.get_tensor(out["index"]).copy())
    return np.concatenate(logits)


def _weight_types(path):
    """The element types of the weights of the model's convolutions and fully connected layers."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model = fb.read_model(str(path))
    graph = model.subgraphs[0]
    weighted = {schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D, schema.BuiltinOperator.FULLY_CONNECTED}
    return {fb.type_to_name(graph.tensors[op.inputs[1]].type) for op in graph.operators
            if fb.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex]) in weighted}


def test_fp32_model_alone_matches_onnxruntime_on_1000_images(teacher_tflite):
    art, _, x, _, reference, _ = teacher_tflite
    path = art["fp32"]["path"]
    logits = _raw_logits(path, x)
    diff = float(np.abs(logits - reference).max())
    print(f"\nLiteRT FP32 vs onnxruntime FP32 on {N} images: max |Δ| = {diff:.2e}")
    assert diff <= 1e-3
    assert (logits.argmax(1) == reference.argmax(1)).mean() == 1.0
    assert art["fp32"]["details"]["batch"] == {"min": 1, "max": 256}
    # The batch is free in the model itself; left alone, the interpreter runs batch 1 (the deployment case).
    interpreter = _interpreter(path)
    (inp,) = interpreter.get_input_details()
    assert list(inp["shape_signature"]) == [-1, 1, 28, 28] and list(inp["shape"]) == [1, 1, 28, 28]
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x[:1])
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), logits[:1], rtol=0, atol=1e-5)


def test_session_matches_raw_runtime_at_batch_1_and_32_with_one_thread(teacher_tflite):
    art, _, x, _, _, _ = teacher_tflite
    path = art["fp32"]["path"]
    session = load_edge("litert", path, threads=1)
    assert isinstance(session, Session)
    assert session.threads == 1 and session.fixed_batch is None and session.max_batch == 256
    assert session.runtime.startswith("ai-edge-litert ") and session.runtime.endswith(" XNNPACK")
    raw = _raw_logits(path, x[:32], batch=32)
    np.testing.assert_allclose(session.run(x[:32]), raw, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([session.run(x[i : i + 1]) for i in range(4)]), _raw_logits(path, x[:4], batch=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(edge_predict(session, x[:300], batch_size=256), _raw_logits(path, x[:300], batch=256), rtol=0, atol=1e-6)
    infer = session.prepare(x[:1])
    infer()
    infer()  # the timed call computes the same logits, call after call
    np.testing.assert_allclose(session._interpreter.get_tensor(session._output), raw[:1], rtol=0, atol=1e-6)


def test_int8_model_keeps_accuracy_on_1000_images(teacher_tflite):
    art, _, x, labels, reference, _ = teacher_tflite
    details = art["int8"]["details"]
    assert details["quantization"]["quantizer"].endswith("(static)") and details["quantization"]["io"] == "int8"
    assert _weight_types(art["int8"]["path"]) == {"INT8"} and _weight_types(art["fp32"]["path"]) == {"FLOAT32"}  # every conv and FC weight int8
    assert details["batch"] == {"min": 1, "max": 256}
    assert art["int8"]["path"].stat().st_size < 0.35 * art["fp32"]["path"].stat().st_size  # int8 weights in the model
    session = load_edge("litert", art["int8"]["path"])
    logits = edge_predict(session, x)
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    accuracy, fp32_accuracy = float((logits.argmax(1) == labels).mean()), float((reference.argmax(1) == labels).mean())
    print(f"\nLiteRT INT8: {agreement:.1%} argmax agreement with FP32, accuracy {accuracy:.1%} (FP32 {fp32_accuracy:.1%})")
    assert agreement >= 0.97
    assert accuracy >= fp32_accuracy - 0.015
    np.testing.assert_allclose(np.concatenate([session.run(x[i : i + 1]) for i in range(8)]), logits[:8], rtol=0, atol=1e-6)  # any batch


def test_metadata_round_trips_through_sidecar_and_flatbuffer(teacher_tflite, tmp_path):
    art, meta, _, _, _, root = teacher_tflite
    for precision, a in art.items():
        expected = meta | {"kdedge.precision": precision}
        assert read_metadata(a["path"]) == expected
        doc = json.loads(sidecar_path(a["path"]).read_text())
        assert doc["format"] == "litert" and doc["batch"] == {"min": 1, "max": 256}
        alone = tmp_path / f"{precision}.tflite"  # without its sidecar: the copy embedded in the flatbuffer
        alone.write_bytes(a["path"].read_bytes())
        assert read_metadata(alone) == expected
    assert sorted(p.name for p in root.iterdir() if "tflite" in p.name) == ["model.fp32.tflite", "model.fp32.tflite.json", "model.int8.tflite",
                                                                            "model.int8.tflite.json"]  # no leftovers


@pytest.mark.parametrize("damage", ["truncated", "onnx renamed"])
def test_bad_model_is_one_line_export_error(teacher_tflite, edge_teacher, tmp_path, damage):
    art, _, _, _, _, _ = teacher_tflite
    data = art["fp32"]["path"].read_bytes()
    bad = tmp_path / "model.tflite"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else edge_teacher.onnx.read_bytes())
    with pytest.raises(ExportError) as info:
        Session(bad)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(bad) in message and "not a loadable LiteRT model" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no runtime traceback behind it
    with pytest.raises(ExportError, match="not a readable LiteRT model"):
        read_metadata(bad)


def test_model_that_folds_the_batch_falls_back_to_fixed_batch_1(tmp_path):
    class Folds(nn.Module):
        """Reshapes the batch into another dimension: the converted RESHAPE keeps it, so the batch cannot be freed."""

        def __init__(self):
            super().__init__()
            self.rows, self.head = nn.Linear(28, 28), nn.Linear(784, 10)

        def forward(self, x):
            b = x.shape[0]
            return self.head(self.rows(x.reshape(b * 28, 28)).reshape(b, 784))

    torch.manual_seed(0)
    model = Folds().eval()
    path = tmp_path / "folds.tflite"
    details = export_edge("litert", out=path, precision="fp32", model=model, input_shape=(1, 28, 28), metadata={}, max_batch=256)
    session = load_edge("litert", path)
    assert details["batch"] == {"fixed": 1} and details["resize"] is None
    assert session.fixed_batch == 1 and session.max_batch == 1
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(edge_predict(session, x.numpy()), model(x).numpy(), rtol=0, atol=1e-5)


def test_untraceable_model_is_one_line_export_error(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x):  # data-dependent control flow: torch.export cannot trace it
            return x.flatten(1)[:, :10] if x.sum() > 0 else -x.flatten(1)[:, :10]

    with pytest.raises(ExportError) as info:
        export_edge("litert", out=tmp_path / "m.tflite", precision="fp32", model=Branchy(), input_shape=(1, 4, 4), metadata={})
    assert len(str(info.value).splitlines()) == 1 and "cannot convert Branchy to LiteRT" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_importing_the_backend_loads_no_runtime():
    code = ("import sys, kdedge.exporters.tflite; "
            "print(sorted({'litert_torch', 'ai_edge_litert', 'torchao', 'jax', 'tensorflow'} & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
