"""Errors you can debug: one line by default; with ``--debug`` or ``KDEDGE_DEBUG=1`` the full chain
follows it, down to the line in the user's own code that raised."""

from __future__ import annotations

import textwrap

import pytest
from conftest import make_idx_dir

from kdedge.cli import main
from kdedge.data import load_dataset
from kdedge.models import ModelSpec, create_model, save_checkpoint

NETS_PY = textwrap.dedent('''
    import torch
    from torch import nn

    def teacher(num_classes, input_shape):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[1] * input_shape[2], num_classes))

    def _check_width(width):
        if width % 2:
            raise ValueError(f"width {width} must be even")  # the line a user must see

    def _build_layers(width):
        _check_width(width)
        return nn.Linear(width, width)

    def make(num_classes, input_shape):
        return _build_layers(3)

    class Branchy(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            if y.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
                return y
            return -y

    def branchy(num_classes, input_shape):
        return Branchy(num_classes)
''')


@pytest.fixture
def nets(tmp_path):
    (tmp_path / "nets.py").write_text(NETS_PY)
    return tmp_path / "nets.py", make_idx_dir(tmp_path / "data", n_train=48, n_test=16)


def _distill(nets_py, data_dir, out):
    return ["distill", "--teacher", f"{nets_py}:teacher", "--student", f"{nets_py}:make", "--data", str(data_dir),
            "--epochs", "1", "--quiet", "--out", str(out)]


def test_factory_error_is_one_line_by_default(nets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KDEDGE_DEBUG", raising=False)
    nets_py, data_dir = nets
    assert main(_distill(nets_py, data_dir, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the factory raised ValueError: width 3 must be even" in err and "Traceback" not in err, err


def _assert_full_chain(err: str, nets_py) -> None:
    lines = err.splitlines()
    assert lines[0].startswith("kdedge: error: ") and "the factory raised ValueError: width 3 must be even" in lines[0], err
    assert "Traceback (most recent call last)" in err
    # The frames inside the user's file, down to the raising line.
    assert f'File "{nets_py}", line' in err and "in _check_width" in err and "in _build_layers" in err, err
    assert 'raise ValueError(f"width {width} must be even")' in err, err
    assert lines[-1].startswith("kdedge.errors.ModelError: "), lines[-1]


def test_kdedge_debug_env_shows_the_traceback_inside_the_factory(nets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDEDGE_DEBUG", "1")
    nets_py, data_dir = nets
    assert main(_distill(nets_py, data_dir, tmp_path / "r")) == 2
    _assert_full_chain(capsys.readouterr().err, nets_py)


def test_debug_flag_shows_the_traceback_inside_the_factory(nets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KDEDGE_DEBUG", raising=False)
    nets_py, data_dir = nets
    assert main(["--debug", *_distill(nets_py, data_dir, tmp_path / "r")]) == 2
    _assert_full_chain(capsys.readouterr().err, nets_py)
    assert main(["--debug", "data", "no-such-dataset"]) == 2  # an error without a cause: the line, then where it was raised
    err = capsys.readouterr().err
    assert err.startswith("kdedge: error: unknown built-in dataset 'no-such-dataset'") and "Traceback (most recent call last)" in err, err


def test_export_failure_keeps_the_exporters_chain(nets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KDEDGE_DEBUG", raising=False)
    nets_py, data_dir = nets
    spec = ModelSpec(f"{nets_py}:branchy", 1.0, 3, (1, 8, 8))
    model = create_model(spec)  # the user names the factory here: trusted
    save_checkpoint(tmp_path / "m.safetensors", model, spec, load_dataset(str(data_dir)).spec)
    argv = ["export", str(tmp_path / "m.safetensors"), "--trust-code", "--format", "onnx", "--no-evaluate", "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot export Branchy to ONNX" in err, err
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("kdedge: error: ") and "cannot export Branchy to ONNX" in err.splitlines()[0], err
    assert "The above exception was the direct cause of the following exception" in err
    assert f'File "{nets_py}", line' in err and "in forward" in err and "if y.sum() > 0:" in err, err
    assert not (tmp_path / "e").exists()
