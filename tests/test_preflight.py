"""compress-and-export checks every later stage before it trains, and takes ONNX teachers as they come."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

import kdedge.bundle
from kdedge.cli import main
from kdedge.exporters import export_onnx
from kdedge.models import load_checkpoint, pretrained_path
from kdedge.models.onnx_teacher import OnnxTeacherModule

SMALL = ["--train-limit", "600", "--test-limit", "300", "--epochs", "1", "--batch-sizes", "1", "--bench-min-s", "0.05", "--quiet",
         "--calibration-samples", "64", "--parity-samples", "100", "--min-retention", "0"]


@pytest.fixture(scope="module")
def onnx_teacher(tmp_path_factory):
    """The shipped teacher as an ONNX file, with a dynamic batch and with a fixed batch of 1."""
    model = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model.eval()
    root = tmp_path_factory.mktemp("onnx-teacher")
    export_onnx(model, root / "teacher.onnx", input_shape=(1, 28, 28))
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(root / "teacher-b1.onnx"), dynamo=True, external_data=False)  # batch fixed to 1
    return root


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if the bundle build reaches distillation: every check under test must come first."""
    def refuse(*_a, **_k):
        raise AssertionError("distillation started before the preconditions were checked")

    monkeypatch.setattr(kdedge.bundle, "distill", refuse)


def _one_line(capsys, code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expected and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.slow
def test_onnx_teacher_bundle_benches_the_file_in_onnxruntime(onnx_teacher, tmp_path):
    out = tmp_path / "bundle"
    assert main(["compress-and-export", "--teacher", str(onnx_teacher / "teacher.onnx"), "--targets", "ort-cpu", *SMALL, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    teacher_rows = [r for r in report["rows"] if r["role"] == "teacher"]
    assert [(r["variant"], r["target"]) for r in teacher_rows] == [("onnx-fp32", "ort-cpu")]  # the file itself, not a re-export
    manifest = json.loads((out / "manifest.json").read_text())
    # Scored in onnxruntime on the same 300 images, the ONNX teacher equals its accuracy measured before training.
    assert abs(teacher_rows[0]["accuracy"]["top1"] - manifest["teacher"]["test_accuracy"]) <= 1 / 300
    assert manifest["teacher"]["input_map"] is None  # its metadata declares the data's own normalization
    assert main(["verify", str(out)]) == 0


def test_fixed_batch_onnx_teacher_is_chunked(onnx_teacher, fmnist):
    data = fmnist.limit(test=10)
    fixed = OnnxTeacherModule(onnx_teacher / "teacher-b1.onnx", input_shape=(1, 28, 28), num_classes=10)
    dynamic = OnnxTeacherModule(onnx_teacher / "teacher.onnx", input_shape=(1, 28, 28), num_classes=10)
    assert fixed.fixed_batch == 1 and dynamic.fixed_batch is None
    x = data.test.inputs()
    np.testing.assert_allclose(fixed(x).numpy(), dynamic(x).numpy(), atol=1e-4, rtol=0)


def test_fixed_batch_onnx_teacher_refused_before_training(onnx_teacher, tmp_path, capsys, no_training):
    code = main(["compress-and-export", "--teacher", str(onnx_teacher / "teacher-b1.onnx"), *SMALL, "--batch-sizes", "1,32", "--out", str(tmp_path / "b")])
    err = _one_line(capsys, code)
    assert "fixed batch size of 1" in err and "--batch-sizes 1" in err
    assert not (tmp_path / "b").exists()


def test_speedup_gate_needs_an_eager_teacher(onnx_teacher, tmp_path, capsys, no_training):
    code = main(["compress-and-export", "--teacher", str(onnx_teacher / "teacher.onnx"), *SMALL, "--min-speedup", "2", "--out", str(tmp_path / "b")])
    assert "--min-speedup compares with the teacher in eager PyTorch" in _one_line(capsys, code)
    code = main(["compress-and-export", *SMALL, "--targets", "ort-cpu", "--min-speedup", "2", "--out", str(tmp_path / "b")])
    assert "add torch-cpu to --targets" in _one_line(capsys, code)


def test_missing_runtime_refused_before_training(tmp_path, capsys, no_training, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["compress-and-export", *SMALL, "--targets", "torch-cuda", "--out", str(tmp_path / "b")])
    _one_line(capsys, code)


_UNEXPORTABLE = '''
import torch
from torch import nn


class Branchy(nn.Module):
    """Trains fine in PyTorch; its data-dependent branch cannot be exported by torch.export."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(784, num_classes)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        if y.sum() > 0:
            return y
        return -y


def make(num_classes):
    return Branchy(num_classes)
'''


def test_student_that_cannot_be_exported_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "nets.py").write_text(textwrap.dedent(_UNEXPORTABLE))
    code = main(["compress-and-export", "--student", f"{tmp_path}/nets.py:make", *SMALL, "--out", str(tmp_path / "b")])
    assert "cannot export Branchy to ONNX" in _one_line(capsys, code)


def test_teacher_that_cannot_be_exported_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "nets.py").write_text(textwrap.dedent(_UNEXPORTABLE))
    code = main(["compress-and-export", "--teacher", f"{tmp_path}/nets.py:make", "--no-sanity-checks", *SMALL, "--out", str(tmp_path / "b")])
    assert "cannot export Branchy to ONNX" in _one_line(capsys, code)


@pytest.mark.slow
def test_fixed_batch_onnx_teacher_bundle_at_its_batch_size(onnx_teacher, tmp_path):
    """Accepted at its own batch size, scored through onnxruntime in chunks of it (not a crash at batch 256)."""
    out = tmp_path / "bundle"
    assert main(["compress-and-export", "--teacher", str(onnx_teacher / "teacher-b1.onnx"), "--targets", "ort-cpu", *SMALL, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    teacher = next(r for r in report["rows"] if r["role"] == "teacher")
    assert teacher["batch"] == 1 and teacher["accuracy"]["samples"] == 300


def test_unwritable_output_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "a-file").write_text("not a directory")  # its "subdirectory" cannot be created, even by root
    code = main(["compress-and-export", *SMALL, "--out", str(tmp_path / "a-file" / "bundle")])
    err = _one_line(capsys, code)
    assert "for the bundle" in err and "pass an --out in a writable place" in err
