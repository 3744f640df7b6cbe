"""A checkpoint never runs the code it names unless the user opts in (``--trust-code``, ``trust_code=True``).

The test checkpoint names a factory file whose import writes a marker file: the marker shows
whether any of the file's code ran.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import yaml
from conftest import make_idx_dir
from torch import nn

from kdedge import save_checkpoint
from kdedge.cli import main
from kdedge.data import load_dataset
from kdedge.errors import ModelError
from kdedge.models import ModelSpec, create_model, load_checkpoint

EVIL_PY = textwrap.dedent('''
    from pathlib import Path

    from torch import nn

    Path(__file__).with_name("marker").write_text("the checkpoint's code ran")

    def make(num_classes, input_shape):
        c, h, w = input_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))
''')


@pytest.fixture
def evil(tmp_path):
    """(checkpoint, marker, data dir): a checkpoint whose architecture is ``<tmp>/evil.py:make``."""
    (tmp_path / "evil.py").write_text(EVIL_PY)
    data_dir = make_idx_dir(tmp_path / "data", n_train=48, n_test=16)
    spec = load_dataset(str(data_dir)).spec
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # what make() builds, without importing evil.py
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, model, ModelSpec(f"{tmp_path}/evil.py:make", 1.0, 3, (1, 8, 8)), spec)
    return ckpt, tmp_path / "marker", data_dir


def test_load_checkpoint_runs_no_code_without_trust_code(evil):
    ckpt, marker, _ = evil
    with pytest.raises(ModelError, match=r"its architecture comes from code, .*evil\.py:make'; .*pass --trust-code \(trust_code=True in Python\)"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    loaded = load_checkpoint(ckpt.parent, trust_code=True)  # a run directory holding model.safetensors works the same
    assert marker.exists() and loaded.spec.arch.endswith("evil.py:make") and isinstance(loaded.model[1], nn.Linear)


def _config(tmp, text):
    (tmp / "c.yaml").write_text(text)
    return str(tmp / "c.yaml")


def _zoo_teacher(tmp, data_dir):
    """A zoo checkpoint for the same data: loads without any opt-in."""
    spec = ModelSpec("mlp", 0.25, 3, (1, 8, 8))
    save_checkpoint(tmp / "teacher.safetensors", create_model(spec), spec, load_dataset(data_dir).spec)
    return str(tmp / "teacher.safetensors")


#: command name -> argv that loads the checkpoint (tmp, checkpoint, data dir)
LOADERS = {
    "train --model": lambda t, c, d: ["train", "--model", c, "--data", d, "--epochs", "1", "--quiet", "--out", f"{t}/r"],
    "distill --teacher": lambda t, c, d: ["distill", "--teacher", c, "--student", "mlp@0.25", "--data", d, "--epochs", "1", "--quiet", "--out", f"{t}/r"],
    "distill --student": lambda t, c, d: ["distill", "--teacher", _zoo_teacher(t, d), "--student", c, "--data", d, "--epochs", "1", "--quiet",
                                          "--out", f"{t}/r"],
    "export": lambda t, c, d: ["export", c, "--format", "onnx", "--parity-samples", "16", "--no-evaluate", "--data", d, "--out", f"{t}/r"],
    "bench": lambda t, c, d: ["bench", c, "--data", d, "--targets", "torch-cpu", "--batch-sizes", "1", "--warmup-iters", "1", "--min-iters", "2",
                              "--min-s", "0.01", "--no-plots", "--out", f"{t}/r"],
    "compress-and-export": lambda t, c, d: ["compress-and-export", "--teacher", c, "--data", d, "--quiet", "--out", f"{t}/r"],
    "build": lambda t, c, d: ["build", "--config", _config(t, f"teacher: {c}\ndata: {d}\n"), "--quiet", "--out", f"{t}/r"],
}


@pytest.mark.parametrize("command", list(LOADERS))
def test_every_command_refuses_a_code_checkpoint_in_one_line(command, evil, tmp_path, capsys):
    ckpt, marker, data_dir = evil
    argv = LOADERS[command](tmp_path, str(ckpt), str(data_dir))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "its architecture comes from code" in lines[0] and "evil.py:make" in lines[0] and "--trust-code" in lines[0], err
    assert not marker.exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["distill --teacher", "export", "bench"])
def test_trust_code_loads_the_checkpoint(command, evil, tmp_path, capsys):
    ckpt, marker, data_dir = evil
    argv = LOADERS[command](tmp_path, str(ckpt), str(data_dir)) + ["--trust-code"]
    code = main(argv)
    assert code == 0, capsys.readouterr().err
    assert marker.exists() and (tmp_path / "r").is_dir()
    if command.startswith("distill"):
        # Not recorded: a run's config.yaml cannot grant trust to whoever reruns it.
        assert "trust_code" not in yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())


def test_trust_code_is_not_a_config_key(evil, tmp_path, capsys):
    ckpt, marker, data_dir = evil
    config = _config(tmp_path, f"teacher: {ckpt}\ntrust_code: true\n")
    assert main(["distill", "--config", config, "--data", str(data_dir), "--out", str(tmp_path / "r")]) == 2
    assert "unknown key(s) trust_code" in capsys.readouterr().err
    assert not marker.exists()


def test_a_factory_named_in_a_config_file_needs_trust_code(tmp_path, capsys):
    """A YAML file may come from anyone: a factory it names is code, like one a checkpoint names."""
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n\ndef make():\n    raise AssertionError('never called')\n")
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(f"student: {tmp_path}/evil.py:make\nepochs: 1\n")
    for argv in (["distill", "--config", str(cfg), "--quiet"], ["build", "--config", str(cfg), "--quiet"]):
        assert main(argv + ["--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "names code to import and run (student: " in err and "--trust-code" in err
        assert not marker.exists() and not (tmp_path / "out").exists()
