"""The CLI: one line and exit 2 for bad input, no half-written runs, and a real distillation."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import kdedge.rundir
from kdedge.cli import main
from kdedge.config import DistillConfig
from kdedge.models import load_checkpoint

from conftest import make_idx_dir


def _run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kdedge: error: ") and "Traceback" not in err
    return lines[0]


def test_bad_data_name(capsys, tmp_path):
    code, _, err = _run(capsys, "distill", "--data", "imagenet-9", "--out", str(tmp_path / "r"))
    assert code == 2
    assert "unknown dataset 'imagenet-9'" in _one_line_error(err)
    assert not (tmp_path / "r").exists()


def test_unknown_model(capsys, tmp_path):
    d = make_idx_dir(tmp_path / "d")
    code, _, err = _run(capsys, "train", "--data", str(d), "--model", "vgg16", "--out", str(tmp_path / "r"))
    assert code == 2 and "unknown model 'vgg16'" in _one_line_error(err)


def test_corrupt_data_file(capsys, tmp_path):
    d = make_idx_dir(tmp_path / "d", compress=False)
    (d / "train-labels-idx1-ubyte").write_bytes(b"\x08\x03\x00\x00" * 4)
    code, _, err = _run(capsys, "train", "--data", str(d), "--out", str(tmp_path / "r"))
    assert code == 2 and "bad magic number" in _one_line_error(err)


def test_bad_flag_value_and_unknown_flag(capsys):
    code, _, err = _run(capsys, "distill", "--epochs", "many")
    assert code == 2 and "'many' is not a valid integer" in _one_line_error(err)
    code, _, err = _run(capsys, "distill", "--alpah", "0.5")
    assert code == 2 and "No such option" in _one_line_error(err)


def test_invalid_value_from_config_file(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("alpha: 3\nsurprise: 1\n")
    code, _, err = _run(capsys, "distill", "--config", str(tmp_path / "c.yaml"))
    assert code == 2 and "unknown key(s) surprise" in _one_line_error(err)


def test_existing_out_dir_is_refused(capsys, tmp_path):
    (tmp_path / "r").mkdir()
    code, _, err = _run(capsys, "distill", "--out", str(tmp_path / "r"))
    assert code == 2 and "already exists" in _one_line_error(err)


def test_teacher_class_mismatch(capsys, tmp_path):
    """A 3-class teacher cannot teach a 10-class student: refused before anything is written."""
    d = make_idx_dir(tmp_path / "d", classes=3, size=28)
    code, _, _ = _run(capsys, "train", "--data", str(d), "--model", "mlp", "--epochs", "1", "--out", str(tmp_path / "t"), "--quiet")
    assert code == 0
    code, _, err = _run(capsys, "distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "r"), "--train-limit", "100")
    assert code == 2
    assert "teacher" in _one_line_error(err) and "3 classes" in err and "10 classes" in err
    assert not (tmp_path / "r").exists()


def test_no_shipped_teacher_for_other_data(capsys, tmp_path):
    d = make_idx_dir(tmp_path / "d")
    code, _, err = _run(capsys, "distill", "--data", str(d), "--out", str(tmp_path / "r"))
    assert code == 2 and "ships no resnet weights" in _one_line_error(err) and "kdedge train" in err


def test_failure_while_writing_leaves_nothing(capsys, tmp_path, monkeypatch):
    d = make_idx_dir(tmp_path / "d")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(kdedge.rundir, "save_checkpoint", boom)
    with pytest.raises(OSError):
        main(["train", "--data", str(d), "--epochs", "1", "--out", str(tmp_path / "runs" / "r"), "--quiet"])
    # Neither the run nor its temporary directory; only the last epoch's checkpoint, to --resume from.
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r.partial"]
    assert [p.name for p in (tmp_path / "runs" / "r.partial").iterdir()] == ["checkpoint.pt"]


def test_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdedge", "train", "--data", str(tmp_path / "missing.npz")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "no such file" in proc.stderr


def test_import_is_lean():
    runtimes = ('onnxruntime', 'tensorrt', 'onnx', 'executorch', 'torchao', 'litert_torch', 'ai_edge_litert', 'jax', 'tensorflow', 'openvino')
    code = f"import sys, kdedge, kdedge.exporters, kdedge.bench; bad = [m for m in sys.modules if m.split('.')[0] in {runtimes!r}]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_writes_a_complete_run(capsys, tmp_path):
    d = make_idx_dir(tmp_path / "d", n_train=90, classes=3)
    code, out, _ = _run(capsys, "train", "--data", str(d), "--model", "mlp", "--epochs", "3", "--lr", "0.05",
                        "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "wrote" in out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9  # the toy classes are separable
    assert len(metrics["history"]) == 3 and metrics["model"]["params"] > 0
    assert len(metrics["test"]["confusion"]) == 3
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["epochs"] == 3 and config["model"] == "mlp" and config["out"] == str(tmp_path / "r")
    assert load_checkpoint(tmp_path / "r").spec.arch == "mlp"


def test_same_seed_same_weights(tmp_path):
    """Seeded and deterministic on the CPU: two distillations give bit-identical students."""
    d = make_idx_dir(tmp_path / "d", classes=3)
    # The toy teacher: a 3-class model trained on the same data.
    assert main(["train", "--data", str(d), "--model", "tiny_cnn@0.25", "--epochs", "1", "--out", str(tmp_path / "t"), "--quiet"]) == 0
    for name in ("a", "b"):
        assert main(["distill", "--data", str(d), "--teacher", str(tmp_path / "t"), "--student", "mlp@0.25", "--epochs", "2",
                     "--augment", "--seed", "3", "--out", str(tmp_path / name), "--quiet"]) == 0
    a, b = load_checkpoint(tmp_path / "a").model.state_dict(), load_checkpoint(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_distill_real_data_end_to_end(capsys, tmp_path):
    """The shipped teacher teaches tiny_cnn on a slice of real Fashion-MNIST, through the CLI."""
    code, out, err = _run(capsys, "distill", "--train-limit", "6000", "--test-limit", "2000", "--epochs", "3",
                          "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.80  # chance is 0.10
    assert metrics["teacher"]["test"]["accuracy"] >= 0.90
    assert metrics["teacher_cache"]["hit"] is False and metrics["history"][0]["train_kd_loss"] > 0
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert DistillConfig(**cfg).train_limit == 6000
