"""Bring your own teacher and student from a file path; automatic students under a FLOPs budget."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from kdedge.cli import main
from kdedge.errors import ConfigError, ModelError
from kdedge.models import load_checkpoint
from kdedge.models.byo import build_from_factory, is_factory_ref
from kdedge.resolve import auto_student

from conftest import make_idx_dir

MODELS_PY = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes, channels, size, hidden):
            super().__init__()
            self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
            self.fc = nn.Linear(hidden * size * size, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    def big(num_classes, input_shape):
        return Net(num_classes, input_shape[0], input_shape[1], 8)

    def small(num_classes=3, input_shape=(1, 8, 8)):
        return Net(num_classes, input_shape[0], input_shape[1], 2)

    def broken():
        raise RuntimeError("no GPU in this factory")

    def not_a_model():
        return 42

    def wrong_classes():
        return Net(7, 1, 8, 2)
''')


@pytest.fixture
def byo(tmp_path):
    (tmp_path / "my_models.py").write_text(MODELS_PY)
    data_dir = make_idx_dir(tmp_path / "data", n_train=120, n_test=40)
    return tmp_path, data_dir


def test_factory_refs():
    assert is_factory_ref("pkg.mod:make") and is_factory_ref("models/x.py:build") and not is_factory_ref("tiny_cnn@0.5")
    assert not is_factory_ref("C:model") and not is_factory_ref("runs/dir")


def test_train_teacher_then_distill_with_byo_teacher_and_student(byo, capsys):
    tmp, data_dir = byo
    teacher_ref, student_ref = f"{tmp}/my_models.py:big", f"{tmp}/my_models.py:small"
    assert main(["train", "--model", teacher_ref, "--data", str(data_dir), "--epochs", "2", "--quiet", "--out", str(tmp / "teacher")]) == 0
    torch.save(load_checkpoint(tmp / "teacher", trust_code=True).model.state_dict(), tmp / "teacher.pt")  # weights as a plain state dict
    out = tmp / "run"
    code = main(["distill", "--teacher", teacher_ref, "--teacher-weights", str(tmp / "teacher.pt"), "--student", student_ref, "--data", str(data_dir),
                 "--epochs", "2", "--cache", "memory", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    teacher_metrics = json.loads((tmp / "teacher" / "metrics.json").read_text())
    assert metrics["teacher"]["test"]["accuracy"] == teacher_metrics["test"]["accuracy"]  # the trained weights were loaded
    ckpt = load_checkpoint(out, trust_code=True)  # rebuilt through the recorded factory reference (our own file: trusted)
    assert ckpt.spec.arch == student_ref and sum(p.numel() for p in ckpt.model.parameters()) == 2 * 9 + 2 + 2 * 64 * 3 + 3


def test_bad_byo_references_are_one_line(byo, capsys):
    tmp, data_dir = byo
    cases = [
        ("nosuchpkg.models:make", "no module named 'nosuchpkg'"),
        (f"{tmp}/missing.py:make", "no such file"),
        (f"{tmp}/my_models.py:nothing", "has no callable 'nothing'; callables defined there: Net, big, broken, not_a_model, small, wrong_classes"),
        (f"{tmp}/my_models.py:broken", "the factory raised RuntimeError: no GPU in this factory"),
        (f"{tmp}/my_models.py:not_a_model", "the factory returned int, expected a torch.nn.Module"),
        (f"{tmp}/my_models.py:wrong_classes", "returns (2, 7) for 2 samples, expected logits of shape (2, 3)"),
    ]
    for ref, message in cases:
        code = main(["distill", "--teacher", ref, "--data", str(data_dir), "--epochs", "1", "--quiet", "--out", str(tmp / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (ref, err)
    assert not (tmp / "x").exists()
    with pytest.raises(ModelError, match="returns"):
        build_from_factory(f"{tmp}/my_models.py:wrong_classes", num_classes=3, input_shape=(1, 8, 8))


def test_auto_student_picks_the_largest_under_the_budget(fmnist):
    spec = fmnist.spec
    chosen, flops = auto_student(spec, 3e6)
    assert (chosen.name, flops) == ("tiny_cnn", 2_234_112)  # dw_cnn (5.6 M) and resnet@0.25 do not fit; tiny_cnn@1.25 neither
    chosen, flops = auto_student(spec, 6e5)
    assert chosen.name == "mlp@1.25" and flops <= 6e5
    with pytest.raises(ConfigError, match="no zoo student fits 1,000 FLOPs"):
        auto_student(spec, 1e3)


def test_student_auto_needs_a_budget(capsys):
    assert main(["distill", "--student", "auto", "--out", "/tmp/never"]) == 2
    assert "student auto needs flops_budget" in capsys.readouterr().err
