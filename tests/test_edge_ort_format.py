"""ORT format: the shipped teacher's FP32 and INT8 ONNX artifacts converted to ``.ort``, run on 1,000 real test images.

The reference is onnxruntime on the ONNX artifact the ``.ort`` file was converted from (itself
parity-checked against PyTorch by the export). Tolerances: FP32 max |Δ| <= 1e-3 and 100 % argmax
agreement; INT8 >= 97 % argmax agreement with the INT8 ONNX and accuracy within 1.5 pt of FP32.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime
import pytest

from kdedge.errors import ExportError
from kdedge.exporters import read_metadata as onnx_read_metadata
from kdedge.exporters.edge import edge_predict, export_edge, load_edge
from kdedge.exporters.ort_format import config_path, read_metadata

N = 1000


@pytest.fixture(scope="module")
def teacher_ort(tmp_path_factory, edge_teacher):
    """The teacher as ONNX FP32 / INT8 (the export's artifacts), their ORT files, and onnxruntime's logits on 1,000 test images."""
    t = edge_teacher
    out = tmp_path_factory.mktemp("ort-format") / "ort"
    out.mkdir()
    handlers = list(logging.getLogger().handlers)
    art = {}
    for precision, onnx, reference in (("fp32", t.onnx, t.reference), ("int8", t.onnx_int8, t.int8_reference)):
        name = onnx.stem
        m = {k: v for k, v in onnx_read_metadata(onnx).items() if k.startswith("kdedge.")}
        details = export_edge("ort", out=out / f"{name}.ort", precision=precision, onnx=onnx, input_shape=(1, 28, 28), metadata=m)
        print(f"\n{name}.ort: converted in {details['seconds']['convert']:.3f} s")
        art[precision] = {"path": out / f"{name}.ort", "details": details, "metadata": m, "ort": reference}
    assert logging.getLogger().handlers == handlers  # the converter's logging.basicConfig does not leak into the caller
    return art, t.x, t.labels, out


def _raw_session(path):
    """onnxruntime alone, as a deployment outside kdedge opens the file."""
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_fp32_ort_file_alone_matches_onnx_on_1000_images(teacher_ort):
    art, x, _, _ = teacher_ort
    fp32 = art["fp32"]
    logits = _raw_session(fp32["path"]).run(None, {"input": x})[0]
    diff = float(np.abs(logits - fp32["ort"]).max())
    print(f"\nORT format FP32 vs ONNX FP32 (onnxruntime {onnxruntime.__version__}) on {N} images: max |Δ| = {diff:.2e}")
    assert diff <= 1e-3
    assert (logits.argmax(1) == fp32["ort"].argmax(1)).mean() == 1.0


def test_session_matches_raw_runtime_at_batch_1_and_32_with_one_thread(teacher_ort):
    art, x, _, _ = teacher_ort
    raw = _raw_session(art["fp32"]["path"]).run(None, {"input": x[:100]})[0]
    session = load_edge("ort", art["fp32"]["path"], threads=1)
    assert session.threads == 1 and session.fixed_batch is None and session.max_batch is None
    assert session.runtime == f"onnxruntime {onnxruntime.__version__} ORT format"
    np.testing.assert_allclose(session.run(x[:32]), raw[:32], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([session.run(x[i : i + 1]) for i in range(4)]), raw[:4], rtol=0, atol=1e-5)
    infer = session.prepare(x[:1])
    infer()
    np.testing.assert_allclose(infer()[0], raw[:1], rtol=0, atol=1e-5)  # the timed call computes the same logits
    np.testing.assert_allclose(edge_predict(session, x[:100], batch_size=32), raw, rtol=0, atol=1e-5)


def test_int8_ort_file_keeps_accuracy(teacher_ort):
    art, x, labels, _ = teacher_ort
    int8, fp32 = art["int8"], art["fp32"]
    logits = _raw_session(int8["path"]).run(None, {"input": x})[0]
    agreement = float((logits.argmax(1) == int8["ort"].argmax(1)).mean())
    accuracy, fp32_accuracy = float((logits.argmax(1) == labels).mean()), float((fp32["ort"].argmax(1) == labels).mean())
    print(f"\nORT format INT8: {agreement:.1%} argmax agreement with ONNX INT8, accuracy {accuracy:.1%} (FP32 {fp32_accuracy:.1%})")
    assert agreement >= 0.97
    assert accuracy >= fp32_accuracy - 0.015
    assert "QLinearConv" in int8["details"]["operators"]["com.microsoft"]  # the Q/DQ pairs are fused into INT8 kernels in the file


def test_metadata_and_required_operators_config(teacher_ort, edge_teacher):
    art, _, _, out = teacher_ort
    for a in art.values():
        assert read_metadata(a["path"]) == a["metadata"]
        assert {k: v for k, v in _raw_session(a["path"]).get_modelmeta().custom_metadata_map.items() if k.startswith("kdedge.")} == a["metadata"]
        config = config_path(a["path"])
        assert config.name == a["details"]["required_operators"] == a["path"].stem + ".required_operators.config"
        lines = config.read_text().splitlines()
        temp_dirs = (str(out.parent), str(edge_teacher.onnx.parent))  # where the output and the source ONNX lie
        assert f"# - {a['path'].name}" in lines and not any(d in line for d in temp_dirs for line in lines)  # names the artifact, not a temp path
        listed = {(d, op) for line in lines if line and not line.startswith("#") for d, _, ops in [line.split(";")] for op in ops.split(",")}
        assert listed == {(d, op) for d, ops in a["details"]["operators"].items() for op in ops}
    assert ("ai.onnx", "Conv") in {(d, op) for d, ops in art["fp32"]["details"]["operators"].items() for op in ops}
    assert read_metadata(art["int8"]["path"])["kdedge.precision"] == "int8"
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.ort", "model.int8.required_operators.config", "model.ort",
                                                     "model.required_operators.config"]  # no sidecar, no leftovers


def test_truncated_artifact_is_one_line_export_error(teacher_ort, tmp_path):
    art, _, _, _ = teacher_ort
    data = art["fp32"]["path"].read_bytes()
    bad = tmp_path / "model.ort"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError) as info:
        load_edge("ort", bad)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(bad) in message and "ORT format" in message


def test_converter_failure_is_one_line_export_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # Valid ONNX that onnxruntime cannot load: an operator no execution provider implements.
    graph = helper.make_graph([helper.make_node("Mystery", ["input"], ["logits"], domain="example.custom")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("example.custom", 1)])
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    with pytest.raises(ExportError) as info:
        export_edge("ort", out=tmp_path / "model.ort", precision="fp32", onnx=tmp_path / "model.onnx", input_shape=(1, 28, 28), metadata={})
    message = str(info.value)
    print(f"\n{message}")
    assert len(message.splitlines()) == 1 and "cannot convert model.onnx" in message and "Mystery" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # nothing half-written
