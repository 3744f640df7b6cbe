"""``--log-dir``: TensorBoard event files of a run, read back with TensorBoard's own reader."""

from __future__ import annotations

import sys

import pytest

from conftest import make_idx_dir
from kdedge.cli import main


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_distill_log_dir_writes_every_epoch_and_the_summary(tmp_path):
    data = make_idx_dir(tmp_path / "data", n_train=200, n_test=40, size=12, classes=3)
    log_dir = tmp_path / "tb"
    assert main(["train", "--data", str(data), "--model", "mlp", "--epochs", "1", "--quiet", "--out", str(tmp_path / "t")]) == 0
    assert main(["distill", "--data", str(data), "--student", "tiny_cnn", "--teacher", str(tmp_path / "t"), "--epochs", "2", "--val-split", "0.2",
                 "--quiet", "--log-dir", str(log_dir), "--out", str(tmp_path / "r")]) == 0
    acc = _events(log_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/train_loss", "loss/train_task_loss", "loss/train_kd_loss", "accuracy/train_accuracy", "accuracy/val_accuracy",
            "accuracy/val_macro_f1", "agreement/val_teacher_agreement", "lr/lr", "time/seconds", "final/test_accuracy",
            "final/val_accuracy"} <= scalars, scalars
    import json

    history = json.loads((tmp_path / "r" / "metrics.json").read_text())["history"]
    for tag, key in (("loss/train_loss", "train_loss"), ("accuracy/val_accuracy", "val_accuracy"), ("lr/lr", "lr"),
                     ("agreement/val_teacher_agreement", "val_teacher_agreement")):
        points = acc.Scalars(tag)
        assert [p.step for p in points] == [1, 2]
        assert [p.value for p in points] == pytest.approx([row[key] for row in history], rel=1e-6)  # the run's own numbers
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert acc.Scalars("final/test_accuracy")[0].value == pytest.approx(metrics["test"]["accuracy"], rel=1e-6)
    text = acc.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| test |" in text and "| val |" in text


def test_log_dir_without_tensorboard_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    data = make_idx_dir(tmp_path / "data", n_train=60, n_test=20, size=8, classes=3)
    assert main(["train", "--data", str(data), "--epochs", "1", "--quiet", "--log-dir", str(tmp_path / "tb"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'kdedge-distill[tensorboard]'" in err[0], err
    assert not (tmp_path / "r").exists() and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("bad, message", [("", "log_dir is empty"), ("r/tb", "is inside out"), ("file", "cannot create it")])
def test_a_log_dir_that_cannot_work_is_one_line_before_training(tmp_path, capsys, monkeypatch, bad, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    bad = "file/tb" if bad == "file" else bad
    data = make_idx_dir(tmp_path / "data", n_train=60, n_test=20, size=8, classes=3)
    assert main(["train", "--data", str(data), "--epochs", "1", "--quiet", "--log-dir", bad, "--out", "r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()
