"""The zoo: shapes, budgets, width multipliers, checkpoints and the shipped teacher."""

import json
import os

import pytest
import torch

from kdedge.data import DatasetSpec
from kdedge.errors import ModelError
from kdedge.models import (
    MODELS,
    ModelSpec,
    count_flops,
    count_parameters,
    create_model,
    load_checkpoint,
    load_weights,
    parse_model_name,
    pretrained_path,
    save_checkpoint,
    state_dict_sha256,
)

SHAPE = (1, 28, 28)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_arch_classifies(arch):
    model = create_model(ModelSpec(arch, 1.0, 10, SHAPE)).eval()
    assert model(torch.zeros(3, *SHAPE)).shape == (3, 10)


def test_student_and_teacher_budgets():
    teacher = create_model(ModelSpec("resnet", 1.0, 10, SHAPE))
    student = create_model(ModelSpec("tiny_cnn", 1.0, 10, SHAPE))
    assert count_parameters(student) <= 120_000
    assert count_flops(teacher, SHAPE) >= 20 * count_flops(student, SHAPE)
    mlp = create_model(ModelSpec("mlp", 1.0, 10, SHAPE))
    assert count_parameters(mlp) == 784 * 256 + 256 + 256 * 10 + 10  # the tutorial's 784-256-10


def test_flops_golden_for_mlp():
    mlp = create_model(ModelSpec("mlp", 1.0, 10, SHAPE))
    assert count_flops(mlp, SHAPE) == 2 * (784 * 256 + 256 * 10)  # 1 MAC = 2 FLOPs


@pytest.mark.parametrize("arch", ["tiny_cnn", "dw_cnn", "resnet", "mlp"])
def test_width_multiplier_scales(arch):
    small = count_parameters(create_model(ModelSpec(arch, 0.5, 10, SHAPE)))
    base = count_parameters(create_model(ModelSpec(arch, 1.0, 10, SHAPE)))
    assert small < base


def test_parse_model_name():
    assert parse_model_name("tiny_cnn") == ("tiny_cnn", 1.0)
    assert parse_model_name("dw_cnn@0.5") == ("dw_cnn", 0.5)
    with pytest.raises(ModelError, match="unknown model 'vgg'.*tiny_cnn"):
        parse_model_name("vgg")
    with pytest.raises(ModelError, match="bad width"):
        parse_model_name("tiny_cnn@half")
    with pytest.raises(ModelError, match="out of range"):
        parse_model_name("tiny_cnn@0")


def test_checkpoint_roundtrip(tmp_path):
    spec = ModelSpec("tiny_cnn", 0.5, 10, SHAPE)
    data = DatasetSpec("d", SHAPE, 10, tuple("abcdefghij"), (0.5,), (0.5,))
    torch.manual_seed(1)
    model = create_model(spec)
    save_checkpoint(tmp_path / "m.safetensors", model, spec, data, extra={"note": 1})
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.spec == spec and ckpt.data == data and ckpt.extra == {"note": 1}
    assert state_dict_sha256(ckpt.model) == state_dict_sha256(model)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(ckpt.model.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_checkpoint_that_does_not_fit(tmp_path):
    spec = ModelSpec("tiny_cnn", 1.0, 10, SHAPE)
    save_checkpoint(tmp_path / "m.safetensors", create_model(spec), spec)
    other = create_model(ModelSpec("tiny_cnn", 0.5, 10, SHAPE))
    with pytest.raises(ModelError, match="do not fit.*shape mismatch"):
        load_weights(other, tmp_path / "m.safetensors")
    with pytest.raises(ModelError, match="do not fit.*missing"):
        load_weights(create_model(ModelSpec("dw_cnn", 1.0, 10, SHAPE)), tmp_path / "m.safetensors")


def test_truncated_checkpoint(tmp_path):
    spec = ModelSpec("tiny_cnn", 1.0, 10, SHAPE)
    save_checkpoint(tmp_path / "m.safetensors", create_model(spec), spec)
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_torch_weights_only(tmp_path):
    model = create_model(ModelSpec("mlp", 1.0, 10, SHAPE))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    load_weights(create_model(ModelSpec("mlp", 1.0, 10, SHAPE)), tmp_path / "w.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(ModelError, match="weights_only"):
        load_weights(model, tmp_path / "evil.pt")


def test_shipped_teacher():
    path = pretrained_path("resnet", 1.0, "fashion-mnist")
    assert path is not None and path.stat().st_size <= 10 * 1024 * 1024
    ckpt = load_checkpoint(path)
    assert ckpt.spec == ModelSpec("resnet", 1.0, 10, SHAPE)
    assert ckpt.data is not None and ckpt.data.name == "fashion-mnist"


def test_shipped_teacher_accuracy(fmnist):
    """Threshold: the shipped teacher on the first 2,000 test images (full-set figure in README)."""
    from kdedge.metrics import evaluate

    ckpt = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist"))
    ev = evaluate(ckpt.model, fmnist.test.take(2000))
    assert ev.accuracy >= 0.92
    assert json.loads(json.dumps(ev.to_dict()))["num_samples"] == 2000
