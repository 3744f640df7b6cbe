"""The RGB zoo models (resnet_cifar, mobilenet_v2): any input size, golden costs, ONNX parity."""

import numpy as np
import pytest
import torch

from kdedge.data import DatasetSpec
from kdedge.models import MODELS, ModelSpec, count_flops, count_parameters, create_model
from kdedge.models.zoo import TEACHERS, model_cost
from kdedge.resolve import auto_student

RGB = ("resnet_cifar", "mobilenet_v2")


@pytest.mark.parametrize("arch", RGB)
@pytest.mark.parametrize("width", [0.5, 1.0])
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64), (1, 28, 28), (3, 224, 224)])
def test_forward_shapes(arch, width, shape):
    model = create_model(ModelSpec(arch, width, 10, shape)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("arch", RGB)
@pytest.mark.parametrize("shape", [(4, 8, 8), (3, 8, 40), (3, 100, 96)])
def test_odd_channels_and_sizes(arch, shape):
    model = create_model(ModelSpec(arch, 0.5, 7, shape)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_golden_resnet_cifar():
    # ResNet-20 has 269,722 parameters with the paper's parameter-free shortcuts; the two
    # projection shortcuts (1x1 conv + BN: 16*32 + 2*32 and 32*64 + 2*64) add 2,752.
    assert model_cost("resnet_cifar", 10, (3, 32, 32)) == {"params": 272_474, "flops": 81_626_368}


def test_golden_mobilenet_v2():
    assert model_cost("mobilenet_v2@0.5", 10, (3, 32, 32)) == {"params": 700_490, "flops": 55_938_048}
    # The paper's network on ImageNet: torchvision's mobilenet_v2 has 3,504,872 parameters and
    # ~300 M multiply-adds.
    imagenet = model_cost("mobilenet_v2", 1000, (3, 224, 224))
    assert imagenet["params"] == 3_504_872
    assert imagenet["flops"] == pytest.approx(2 * 300e6, rel=0.01)


@pytest.mark.parametrize("arch", RGB)
def test_flops_grow_with_input_size_not_params(arch):
    small = create_model(ModelSpec(arch, 1.0, 10, (3, 32, 32)))
    large = create_model(ModelSpec(arch, 1.0, 10, (3, 224, 224)))
    assert count_parameters(small) == count_parameters(large)
    assert list(small.state_dict()) == list(large.state_dict())  # the same weights fit either size
    ratio = count_flops(large, (3, 224, 224)) / count_flops(small, (3, 32, 32))
    assert 2 < ratio < 5  # ImageNet-style strides at 224 px: ~3x a 32 px image, not 49x


@pytest.mark.parametrize("arch", RGB)
def test_width_multiplier(arch):
    half, full = (model_cost(f"{arch}@{w}", 10, (3, 32, 32)) for w in (0.5, 1.0))
    assert half["params"] < full["params"] and half["flops"] < full["flops"]


def test_auto_student_skips_teachers():
    assert TEACHERS <= MODELS.keys()
    data = DatasetSpec("rgb", (3, 32, 32), 10, tuple("abcdefghij"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    chosen, flops = auto_student(data, 1e12)
    assert chosen.arch not in TEACHERS
    assert chosen.name == "mobilenet_v2@2" and flops == model_cost("mobilenet_v2@2", 10, (3, 32, 32))["flops"]


@pytest.mark.slow
def test_mobilenet_v2_onnx_parity(tmp_path):
    from kdedge.exporters import export_onnx
    from kdedge.ort import ort_session

    shape = (3, 32, 32)
    torch.manual_seed(0)
    model = create_model(ModelSpec("mobilenet_v2", 0.5, 10, shape))
    for m in model.modules():  # fresh BatchNorm is the identity in eval mode; give it statistics worth exporting
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    model.eval()
    export_onnx(model, tmp_path / "m.onnx", input_shape=shape)
    x = torch.randn(3, *shape)  # batch 3: the exported batch dimension is dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort_session(tmp_path / "m.onnx")
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
