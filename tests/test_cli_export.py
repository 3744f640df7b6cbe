"""`kdedge export`: artifacts on success; one line, exit 2 and no partial output on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from kdedge.cli import main
from kdedge.data import load_dataset
from kdedge.models.zoo import ModelSpec, create_model, save_checkpoint


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdedge: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    spec = load_dataset("fashion-mnist").spec
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "student.safetensors"
    save_checkpoint(path, create_model(ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28))), ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)), spec)
    return path


def test_export_writes_parity_checked_artifacts(capsys, tmp_path, student_ckpt):
    out = tmp_path / "exp"
    code, stdout, err = _run(capsys, "export", student_ckpt, "--format", "onnx,onnx-int8", "--parity-samples", 200, "--calibration-samples", 128,
                             "--calibration-method", "percentile", "--no-evaluate", "--out", out)
    assert code == 0, err
    assert "model.onnx" in stdout and "model.int8.onnx" in stdout and f"wrote {out}" in stdout
    manifest = json.loads((out / "export.json").read_text())
    assert [a["path"] for a in manifest["artifacts"]] == ["model.onnx", "model.int8.onnx"]
    assert manifest["artifacts"][0]["parity"]["samples"] == 200 and manifest["artifacts"][0]["parity"]["passed"]
    assert manifest["artifacts"][1]["details"]["quantization"]["method"] == "percentile"
    assert manifest["config"]["evaluate"] is False and manifest["artifacts"][0]["accuracy"] is None
    assert manifest["data"]["name"] == "fashion-mnist"


def test_export_tensorrt_without_tensorrt_exits_2_but_keeps_onnx(capsys, tmp_path, student_ckpt):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "exp"
    code, stdout, err = _run(capsys, "export", student_ckpt, "--format", "onnx", "--format", "tensorrt", "--parity-samples", 32, "--no-evaluate", "--out", out)
    assert code == 2
    line = _one_line_error(err)
    assert "tensorrt not built: TensorRT is not installed" in line and str(out) in line
    assert (out / "model.onnx").is_file() and (out / "export.json").is_file()


def test_export_bad_inputs_are_one_line_and_leave_nothing(capsys, tmp_path, student_ckpt):
    out = tmp_path / "exp"
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(student_ckpt.read_bytes()[:500])
    wrong_arch = tmp_path / "wrong.safetensors"
    spec = load_dataset("fashion-mnist").spec
    save_checkpoint(wrong_arch, create_model(ModelSpec("mlp", 1.0, 10, (1, 28, 28))), ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)), spec)
    cases = [
        ((truncated,), "not a readable safetensors file"),
        ((wrong_arch,), "weights do not fit"),
        ((tmp_path / "missing.safetensors",), "no such run directory or checkpoint"),
        ((student_ckpt, "--format", "onnx,zip"), "formats must be one or more of onnx, onnx-int8, onnx-fp16, tensorrt, executorch, executorch-int8, "
                                                "litert, litert-int8, openvino, openvino-int8, ort, ort-int8, got onnx, zip"),
        ((student_ckpt, "--trt-batch", "8,4,16"), "trt_batch must be MIN,OPT,MAX"),
        ((student_ckpt, "--opset", 9), "opset must be in 18..23"),
        ((student_ckpt, "--data", "mnist-like-nothing"), "mnist-like-nothing"),
    ]
    for args, message in cases:
        code, _, err = _run(capsys, "export", *args, "--out", out)
        assert code == 2, (args, err)
        assert message in _one_line_error(err), (args, err)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors", "wrong.safetensors"]


def test_export_refuses_existing_out(capsys, tmp_path, student_ckpt):
    (tmp_path / "exp").mkdir()
    code, _, err = _run(capsys, "export", student_ckpt, "--out", tmp_path / "exp")
    assert code == 2 and "already exists" in _one_line_error(err)


def test_export_data_that_does_not_fit(capsys, tmp_path, student_ckpt):
    from conftest import make_idx_dir

    small = make_idx_dir(tmp_path / "small", size=8, classes=3)
    code, _, err = _run(capsys, "export", student_ckpt, "--data", small, "--out", tmp_path / "exp")
    assert code == 2 and "pass the dataset the model was trained on with --data" in _one_line_error(err)
    assert not (tmp_path / "exp").exists()
