"""Runs that cannot be right stop early, with the likely cause: a diverged optimizer, a teacher fed
the wrong inputs. And each DDP rank trains on its own GPU."""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest
import torch

from kdedge.cli import main
from kdedge.distill.loop import STALL_EPOCHS, STALL_MIN_STEPS, chance_check, ddp_device_ids, divergence, resolve_device
from kdedge.distributed import DistContext
from kdedge.metrics import ChanceCheck, evaluation_from_predictions
from tests.conftest import TinyNet, make_idx_dir

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


def _at(ev, times=3):
    check = ChanceCheck.of(ev)
    return [check] * times


def test_divergence_needs_evidence_golden():
    # A non-finite loss ends a run at once: nothing recovers from it.
    assert divergence(_row(loss=float("nan")), [], steps=1) == "training diverged at epoch 1: the training loss is nan"
    assert "the training loss is inf" in divergence(_row(loss=float("inf")), [], steps=1)
    # 10 balanced classes, 1,000 test images, everything predicted as class 0: balanced accuracy 0.1 = chance ...
    collapsed = _eval([100] + [0] * 9, [100] * 10, predicted_class=0)
    assert collapsed.accuracy == 0.1
    msg = divergence(_row(epoch=3), _at(collapsed), steps=1407)
    assert msg == ("training stalled at chance: balanced test accuracy 0.1000 over 10 classes (chance 0.1000) for 3 epochs in a row, "
                   "1,407 steps in all (epoch 3), training loss 0.5")
    # ... but only with evidence: STALL_EPOCHS epochs in a row, and STALL_MIN_STEPS optimizer steps.
    assert (STALL_EPOCHS, STALL_MIN_STEPS) == (3, 200)
    assert divergence(_row(epoch=2), _at(collapsed, 2), steps=1407) is None
    assert divergence(_row(epoch=3), _at(collapsed), steps=199) is None
    assert divergence(_row(epoch=3), [None] + _at(collapsed, 2), steps=1407) is None  # an epoch scored on too few samples
    # Chance + 3 standard errors: sqrt(0.1 * 0.9 * 10 / 100) / 10 = 0.00949 -> 0.1285 is the edge.
    assert divergence(_row(), _at(_eval([12] * 10, [100] * 10)), steps=500) is not None  # 0.12: inside the band
    assert divergence(_row(), _at(_eval([13] * 10, [100] * 10)), steps=500) is None  # 0.13: above it
    # A run climbing inside the band is left to climb: 0.10 -> 0.11 -> 0.12 gains more than a standard error (0.0095).
    climbing = [ChanceCheck.of(_eval([c] * 10, [100] * 10)) for c in (10, 11, 12)]
    assert all(c.at_chance() for c in climbing) and divergence(_row(), climbing, steps=500) is None
    flat = [ChanceCheck.of(_eval([c] * 10, [100] * 10)) for c in (11, 10, 11)]
    assert divergence(_row(), flat, steps=500) is not None
    # Imbalanced (95 % class 0): answering 0 always is 95 % accurate and chance all the same (balanced 0.5) ...
    assert divergence(_row(), _at(_eval([950, 0], [950, 50], predicted_class=0)), steps=500) is not None
    # ... while a model that also finds most of the rare class is not (balanced (0.95 + 0.8) / 2 = 0.875).
    assert divergence(_row(), _at(_eval([903, 40], [950, 50])), steps=500) is None
    # Too few samples to tell chance from a slow start; and without a test set, 1/K on the training set.
    assert chance_check(_row(), _eval([1] * 10, [5] * 10), num_classes=10) is None
    train_only = chance_check(_row(acc=0.101, samples=60000), None, num_classes=10)
    assert train_only.at_chance() and divergence(_row(), [train_only] * 3, steps=500, split="train").startswith(
        "training stalled at chance: training accuracy 0.1010 over 10 classes")  # 0.1 + 3·0.0012 = 0.1037
    assert not chance_check(_row(acc=0.2, samples=60000), None, num_classes=10).at_chance()


def test_a_run_that_learns_slowly_is_not_stopped(tmp_path):
    """Issue 24, item 6: 1,000 8x8 images, 3 classes, 8 steps an epoch — it was stopped after epoch 1 at balanced accuracy 0.3565."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1000, 8, 8)).astype(np.uint8)
    y = (x.mean(axis=(1, 2)) > 127).astype(np.int64) + (x[:, 0, 0] > 127)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "run"
    code = main(["train", "--model", "mlp", "--data", str(tmp_path / "d.npz"), "--epochs", "6", "--quiet", "--out", str(out)])
    assert code == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]


class _NanAfter(TinyNet):
    """TinyNet whose outputs turn NaN after ``calls`` training-mode forward passes: a run that diverges in a chosen epoch."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls, self.left = calls, calls

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.left -= 1
            if self.left < 0:
                return out * float("nan")
        return out


def test_a_diverged_run_keeps_its_last_good_checkpoint_and_resumes_with_a_lower_lr(tmp_path):
    from kdedge import TrainConfig, load_dataset, train
    from kdedge.errors import TrainingDiverged

    data = load_dataset(str(make_idx_dir(tmp_path / "d", n_train=64, n_test=24)))
    out = tmp_path / "run"
    config = TrainConfig(epochs=4, batch_size=16, lr=0.05, seed=0)
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged) as info:  # 4 steps an epoch: NaN from the 2nd step of epoch 2
        train(_NanAfter(5), data.train, data.test, config=config, out=out, progress=False)
    msg = str(info.value)
    assert "training diverged at epoch 2" in msg and f"checkpoint of epoch 1 (the last good one) is kept in {out}.partial" in msg
    assert f"--resume --out {out} --lr 0.005" in msg and "\n" not in msg
    assert not out.exists() and (tmp_path / "run.partial" / "checkpoint.pt").is_file()
    # Continuing from it with a lower --lr: epochs 2-4 run at the new peak, epoch 1 is the kept one.
    torch.manual_seed(0)
    result = train(TinyNet(), data.train, data.test, config=TrainConfig(epochs=4, batch_size=16, lr=0.005, seed=0, resume=True), out=out,
                   progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] > 0.02 and max(lrs[1:]) <= 0.005 + 1e-12
    assert (out / "model.safetensors").is_file() and not (tmp_path / "run.partial").exists()
    # Any other change is still refused on resume.
    from kdedge.distill.checkpoint import config_differences

    assert config_differences({"lr": 0.05, "epochs": 4}, {"lr": 0.005, "epochs": 5}, resumable=frozenset({"lr"})) == ["epochs: 4 -> 5"]


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
