"""FitNets and attention transfer: golden values, hooks by module name, and a real distillation."""

from __future__ import annotations

import json

import pytest
import torch

from kdedge.cli import main
from kdedge.data import load_dataset
from kdedge.distill.features import AttentionTransfer, FeatureHooks, FitNetsHint, attention_map
from kdedge.errors import ConfigError
from kdedge.models import ModelSpec, create_model, save_checkpoint

from conftest import make_idx_dir


def test_attention_map_golden():
    # Two channels on a 1x2 map: |A|^2 averaged over channels = [(1+9)/2, (4+0)/2] = [5, 2]; normalized by sqrt(29).
    a = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    q = attention_map(a)
    assert torch.allclose(q, torch.tensor([[5.0, 2.0]]) / 29**0.5)
    at = AttentionTransfer()
    same = torch.tensor([[[[2.0, 4.0]], [[6.0, 0.0]]]])  # 2x the activations: the same normalized attention
    assert at(a, same).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.tensor([[[[0.0, 1.0]]]])  # all attention on the second position
    expected = ((5 / 29**0.5 - 0.0) ** 2 + (2 / 29**0.5 - 1.0) ** 2) / 2
    assert at(a, other).item() == pytest.approx(expected, rel=1e-6)


def test_fitnets_regressor_maps_channels_and_space():
    hint = FitNetsHint()
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    hint.build(s.shape, t.shape)
    assert hint.adapter.weight.shape == (6, 4, 1, 1)
    with torch.no_grad():
        hint.adapter.weight.zero_()
    assert hint(s, t).item() == pytest.approx(t.pow(2).mean().item(), rel=1e-6)  # zero regressor: MSE = mean(t²)
    with pytest.raises(ConfigError, match=r"needs 4-D feature maps .* student \(2, 10\)"):
        FitNetsHint().build(torch.Size([2, 10]), t.shape)


def test_hooks_name_unknown_layers():
    model = create_model(ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)))
    with pytest.raises(ConfigError, match=r"no layer named 'features.9' in TinyCNN; layers: features, features.0, features.0.0, features.0.1"):
        FeatureHooks(model, ["features.9"])
    hooks = FeatureHooks(model, ["features.3"])
    model(torch.zeros(2, 1, 28, 28))
    assert hooks.outputs["features.3"].shape == (2, 32, 7, 7)
    hooks.remove()


@pytest.mark.parametrize("loss", ["fitnets", "at"])
def test_distill_with_feature_loss(tmp_path, capsys, loss):
    data_dir = make_idx_dir(tmp_path / "data", n_train=120, n_test=40, size=8)
    spec = load_dataset(str(data_dir)).spec
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_checkpoint(teacher, create_model(ModelSpec("tiny_cnn", 1.0, 3, (1, 8, 8))), ModelSpec("tiny_cnn", 1.0, 3, (1, 8, 8)), spec)
    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(teacher), "--student", "tiny_cnn@0.5", "--data", str(data_dir), "--loss", loss,
                 "--student-layer", "features.3", "--teacher-layer", "features.1", "--epochs", "2", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(0 < row["train_feature_loss"] < float("inf") for row in metrics["history"])
    assert "teacher_cache" not in metrics  # features need the teacher on every batch: no logit cache
    from kdedge.metrics import evaluate
    from kdedge.models import load_checkpoint

    # The saved student is the trained one: it reproduces the recorded accuracy.
    assert evaluate(load_checkpoint(out).model, load_dataset(str(data_dir)).test).accuracy == metrics["test"]["accuracy"]


def test_python_api_gives_the_models_back_as_they_came(tmp_path):
    """Hooks removed, and the contiguous layout: training runs channels-last, and safetensors refuses a channels-last state_dict."""
    import kdedge
    from safetensors.torch import save_file

    data = load_dataset(str(make_idx_dir(tmp_path / "data", n_train=60, n_test=20, size=8)))
    torch.manual_seed(0)
    teacher, student = create_model(ModelSpec("tiny_cnn", 1.0, 3, (1, 8, 8))), create_model(ModelSpec("tiny_cnn", 0.5, 3, (1, 8, 8)))
    config = kdedge.DistillConfig(loss="at", student_layer="features.3", teacher_layer="features.3", epochs=1, cache="off")
    result = kdedge.distill(student, teacher, data.train, data.test, config=config, progress=False)
    assert "train_feature_loss" in result.history[0]
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))
    assert config.channels_last
    for name, model in (("student", student), ("teacher", teacher)):
        assert all(p.is_contiguous() for p in model.state_dict().values()), name
        save_file(model.state_dict(), str(tmp_path / f"{name}.safetensors"))


def test_feature_loss_bad_layers_are_one_line(tmp_path, capsys):
    data_dir = make_idx_dir(tmp_path / "data", n_train=60, n_test=20, size=8)
    spec = load_dataset(str(data_dir)).spec
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, create_model(ModelSpec("tiny_cnn", 1.0, 3, (1, 8, 8))), ModelSpec("tiny_cnn", 1.0, 3, (1, 8, 8)), spec)
    base = ["distill", "--teacher", str(teacher), "--student", "tiny_cnn@0.5", "--data", str(data_dir), "--loss", "fitnets", "--epochs", "1", "--quiet"]
    cases = [
        (["--student-layer", "features.3"], "needs student_layer and teacher_layer"),
        (["--student-layer", "nope", "--teacher-layer", "features.1"], "no layer named 'nope' in TinyCNN; layers: features, features.0"),
        (["--student-layer", "head.1", "--teacher-layer", "features.1"], "needs 4-D feature maps"),
    ]
    for extra, message in cases:
        code = main(base + extra + ["--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
        assert not (tmp_path / "x").exists()
