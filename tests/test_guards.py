"""Runs that cannot be right stop early, with the likely cause: a diverged optimizer, a teacher fed
the wrong inputs. And each DDP rank trains on its own GPU."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch

from kdedge.cli import main
from kdedge.distill.loop import ddp_device_ids, divergence, resolve_device
from kdedge.distributed import DistContext
from kdedge.metrics import ChanceCheck, evaluation_from_predictions

# ---------------------------------------------------------------------------------------------
# A run that diverges says so (issue 12, item 14)


def _row(loss=0.5, acc=0.5, samples=1000, epoch=1):
    return {"epoch": epoch, "train_loss": loss, "train_accuracy": acc, "train_samples": samples}


def _eval(correct_per_class: list[int], total_per_class: list[int], predicted_class: int | None = None):
    """An evaluation where class c has total_per_class[c] samples, correct_per_class[c] of them right."""
    targets, preds = [], []
    k = len(total_per_class)
    for c, (right, total) in enumerate(zip(correct_per_class, total_per_class)):
        targets += [c] * total
        wrong = predicted_class if predicted_class is not None and predicted_class != c else (c + 1) % k
        preds += [c] * right + [wrong] * (total - right)
    return evaluation_from_predictions(torch.tensor(preds), torch.tensor(targets), k)


def test_divergence_golden():
    assert divergence(_row(loss=float("nan")), None, num_classes=10) == "training diverged at epoch 1: the training loss is nan"
    assert "the training loss is inf" in divergence(_row(loss=float("inf")), None, num_classes=10)
    # 10 balanced classes, 1,000 test images, everything predicted as class 0: balanced accuracy 0.1 = chance.
    collapsed = _eval([100] + [0] * 9, [100] * 10, predicted_class=0)
    assert collapsed.accuracy == 0.1
    msg = divergence(_row(), collapsed, num_classes=10)
    assert msg == "training stalled at chance after epoch 1: balanced test accuracy 0.1000 over 10 classes (chance 0.1000), training loss 0.5"
    # Chance + 3 standard errors: sqrt(0.1 * 0.9 * 10 / 100) / 10 = 0.00949 -> 0.1285 is the edge.
    assert divergence(_row(), _eval([12] * 10, [100] * 10), num_classes=10) is not None  # 0.12: inside the band
    assert divergence(_row(), _eval([13] * 10, [100] * 10), num_classes=10) is None  # 0.13: above it
    # Imbalanced (95 % class 0): answering 0 always is 95 % accurate and chance all the same (balanced 0.5) ...
    assert divergence(_row(), _eval([950, 0], [950, 50], predicted_class=0), num_classes=2) is not None
    # ... while a model that also finds most of the rare class is not (balanced (0.95 + 0.8) / 2 = 0.875).
    assert divergence(_row(), _eval([903, 40], [950, 50]), num_classes=2) is None
    # Too few samples to tell chance from a slow start; and without a test set, 1/K on the training set.
    assert divergence(_row(), _eval([1] * 10, [5] * 10), num_classes=10) is None
    assert divergence(_row(acc=0.101, samples=60000), None, num_classes=10) is not None  # 0.1 + 3·0.0012 = 0.1037
    assert divergence(_row(acc=0.2, samples=60000), None, num_classes=10) is None


def test_chance_check_golden():
    ev = _eval([500, 100, 50], [1000, 500, 100])  # recalls 0.5, 0.2, 0.5
    check = ChanceCheck.of(ev)
    assert check.classes == 3 and check.chance == pytest.approx(1 / 3)
    assert check.balanced_accuracy == pytest.approx(0.4)
    assert check.standard_error == pytest.approx(((1 / 3) * (2 / 3) * (1 / 1000 + 1 / 500 + 1 / 100)) ** 0.5 / 3)  # 0.0179
    assert not check.at_chance()  # 0.4 > 1/3 + 3 · 0.0179 = 0.387
    assert check.at_chance(slack=0.2)  # 0.4 <= 1/3 + 0.2 · 2/3 = 0.467
    assert ChanceCheck.of(_eval([50, 10, 5], [100, 50, 10])).at_chance()  # the same rates on 10x fewer samples are within the noise


def test_diverged_run_stops_with_the_cause_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "mlp", "--lr", "50", "--train-limit", "2000", "--test-limit", "500", "--epochs", "3", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(r"training diverged at epoch 1: the training loss is (nan|inf)", err)  # nan here; inf first on another CPU is as good
    assert "lower --lr (e.g. 5)" in err and "--optimizer adamw" in err and "--warmup-epochs" in err
    assert not out.exists() and not (tmp_path / "run.partial").exists()
    # The same run with the checks off trains on to the end (and says nothing).
    assert main(["train", "--model", "mlp", "--lr", "50", "--train-limit", "2000", "--test-limit", "500", "--epochs", "1", "--quiet",
                 "--no-sanity-checks", "--out", str(out)]) == 0


# ---------------------------------------------------------------------------------------------
# A teacher's own input contract (item 12)

_FACTORY = '''
import torch
from torch import nn
from kdedge.models import load_checkpoint, pretrained_path

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


class PixelTeacher(nn.Module):
    """The shipped teacher behind another input contract: x = pixel * SCALE (no mean/std)."""

    def __init__(self, scale):
        super().__init__()
        self.inner = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model
        self.scale = scale

    def forward(self, x):
        pixels01 = x / self.scale / 255.0
        return self.inner((pixels01 - FMNIST_MEAN) / FMNIST_STD)


def over_255():  # trained on pixels / 255
    return PixelTeacher(1 / 255)


def raw_pixels():  # trained on raw 0..255 values
    return PixelTeacher(1.0)
'''

_ARGS = ["distill", "--train-limit", "1000", "--test-limit", "1000", "--epochs", "1", "--cache", "memory", "--threads", "2"]


@pytest.fixture(scope="module")
def shipped_teacher_accuracy(fmnist):
    from kdedge.models import load_checkpoint, pretrained_path

    model = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model.eval()
    test = fmnist.limit(test=1000).test
    with torch.inference_mode():
        return float((model(test.inputs()).argmax(1) == test.labels).float().mean())


def test_teacher_fed_the_wrong_normalization_stops_before_training(tmp_path, capsys, shipped_teacher_accuracy):
    """A teacher trained on pixels/255, fed kdedge's standardized inputs, is caught before training is paid for;
    declared with --teacher-mean/--teacher-std it computes exactly what the shipped teacher computes on its own inputs."""
    (tmp_path / "teachers.py").write_text(textwrap.dedent(_FACTORY))
    ref = f"{tmp_path}/teachers.py:over_255"
    assert main([*_ARGS, "--teacher", ref, "--out", str(tmp_path / "wrong")]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("teacher: test accuracy ")  # measured and printed first
    assert captured.err.count("\n") == 1 and "near chance" in captured.err and "before any training" in captured.err
    assert "--teacher-mean/--teacher-std (e.g. 0 and 1 for pixels/255)" in captured.err
    assert not (tmp_path / "wrong").exists()

    assert main([*_ARGS, "--teacher", ref, "--teacher-mean", "0", "--teacher-std", "1", "--quiet", "--out", str(tmp_path / "right")]) == 0
    metrics = json.loads((tmp_path / "right" / "metrics.json").read_text())
    assert abs(metrics["teacher"]["test"]["accuracy"] - shipped_teacher_accuracy) <= 0.002  # the same computation up to rounding
    assert metrics["teacher"]["input_map"] == {"a": [pytest.approx(0.3530)], "b": [pytest.approx(0.2860)]}


def test_teacher_on_raw_pixels_with_its_own_std(tmp_path, capsys, shipped_teacher_accuracy):
    (tmp_path / "teachers.py").write_text(textwrap.dedent(_FACTORY))
    ref = f"{tmp_path}/teachers.py:raw_pixels"
    assert main([*_ARGS, "--teacher", ref, "--quiet", "--out", str(tmp_path / "wrong")]) == 2
    assert "near chance" in capsys.readouterr().err
    assert main([*_ARGS, "--teacher", ref, "--teacher-mean", "0", "--teacher-std", str(1 / 255), "--quiet", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert abs(metrics["teacher"]["test"]["accuracy"] - shipped_teacher_accuracy) <= 0.002


def test_teacher_normalization_flags_go_together(capsys):
    assert main(["distill", "--teacher-mean", "0", "--quiet"]) == 2
    assert "teacher_mean and teacher_std go together" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Multi-GPU DDP: every rank on its own GPU (item 2)


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_each_rank_resolves_its_own_gpu(monkeypatch, local_rank):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ctx = DistContext(rank=local_rank, world_size=4, local_rank=local_rank)
    for name in ("cuda", "auto"):
        device = resolve_device(name, ctx)
        assert device == torch.device("cuda", local_rank)
        assert ddp_device_ids(device) == [local_rank]  # DDP gets the GPU the weights live on, not GPU 0
    assert resolve_device("cpu", ctx) == torch.device("cpu") and ddp_device_ids(torch.device("cpu")) is None


def test_teacher_behind_an_input_map_stays_frozen(tmp_path, fmnist, monkeypatch):
    """Evaluating or counting FLOPs through the map must not leave the teacher (BatchNorm) in train mode:
    its cached logits are its eval-mode logits and its weights and statistics never change."""
    import numpy as np

    from kdedge import DistillConfig, distill
    from kdedge.data.normalization import Normalization
    from kdedge.distill import FrozenTeacher
    from kdedge.models import ModelSpec, create_model, load_checkpoint, pretrained_path, state_dict_sha256

    monkeypatch.setenv("KDEDGE_CACHE", str(tmp_path / "cache"))
    teacher = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model.eval()
    before = state_dict_sha256(teacher)
    contract = Normalization((0.0,), (1.0,))  # feeds it pixels/255: wrong for this teacher, but a real input map
    data = fmnist.limit(train=300, test=200)
    student = create_model(ModelSpec("mlp", 0.25, 10, (1, 28, 28)))
    result = distill(student, teacher, data.train, data.test, teacher_input=contract, progress=False,
                     config=DistillConfig(epochs=1, cache="disk", sanity_checks=False, threads=1))
    assert not any(m.training for m in teacher.modules())
    assert state_dict_sha256(teacher) == before
    cached = np.load(next((tmp_path / "cache" / "logits").glob("*.npy")))
    expected = FrozenTeacher(teacher, input_map=contract.map_from(data.spec))(data.train.inputs()).numpy()
    np.testing.assert_allclose(cached, expected, atol=1e-4, rtol=0)
    assert result.metrics["teacher"]["input_map"] == {"a": [pytest.approx(0.3530)], "b": [pytest.approx(0.2860)]}
