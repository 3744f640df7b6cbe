"""TensorRT: everything around the builder is tested on the CPU; the build itself needs TensorRT + GPU."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from kdedge.errors import BackendUnavailable, ExportError
from kdedge.exporters.tensorrt import (
    ONNX_FOR_PRECISION,
    EngineProfile,
    _network_flags,
    engine_compatibility,
    engine_metadata,
    plan_engine,
)


@pytest.fixture
def onnx_dir(tmp_path):
    for name in ONNX_FOR_PRECISION.values():
        (tmp_path / name).write_bytes(b"onnx")
    return tmp_path


def test_profile_shapes_and_validation():
    profile = EngineProfile(1, 32, 256)
    assert profile.shapes((1, 28, 28)) == ((1, 1, 28, 28), (32, 1, 28, 28), (256, 1, 28, 28))
    assert profile.allows(1) and profile.allows(256) and not profile.allows(257)
    for bad in ((0, 1, 2), (4, 2, 8), (1, 9, 8)):
        with pytest.raises(ExportError, match="1 <= min <= opt <= max"):
            EngineProfile(*bad)


@pytest.mark.parametrize("version", ["10.0.1", "10.13.3.9", "11.0.0", "11.4.1.post1"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_is_strongly_typed_with_precision_from_the_graph(onnx_dir, version, precision):
    plan = plan_engine(version, precision, onnx_dir=onnx_dir, input_name="input", sample_shape=(1, 28, 28), profile=EngineProfile(1, 8, 64), workspace_mib=256)
    # No FP16/INT8 builder flags: TensorRT 11 removed them; the ONNX of each precision carries the types.
    assert plan.builder_flags == ()
    assert plan.network_flags == ("STRONGLY_TYPED",)
    assert plan.onnx == str(onnx_dir / ONNX_FOR_PRECISION[precision])
    assert plan.workspace_bytes == 256 * 2**20


def test_plan_rejects_old_tensorrt_missing_onnx_and_bad_precision(onnx_dir, tmp_path_factory):
    kw = dict(input_name="input", sample_shape=(1, 28, 28), profile=EngineProfile(1, 1, 1))
    with pytest.raises(BackendUnavailable, match="TensorRT 8.6.1 is too old"):
        plan_engine("8.6.1", "fp16", onnx_dir=onnx_dir, **kw)
    with pytest.raises(ExportError, match="built from model.int8-trt.onnx, which is missing"):
        plan_engine("10.9.0", "int8", onnx_dir=tmp_path_factory.mktemp("empty"), **kw)
    with pytest.raises(ExportError, match="precision must be one of fp32, fp16, int8"):
        plan_engine("10.9.0", "bf16", onnx_dir=onnx_dir, **kw)


def test_network_flags_follow_what_the_module_offers():
    trt10 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))
    assert _network_flags(trt10, ("STRONGLY_TYPED",)) == 1 << 1
    later = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace())  # a release without the ignored flag
    assert _network_flags(later, ("STRONGLY_TYPED",)) == 0


def test_engine_metadata_records_gpu_and_version_and_checks_compatibility(onnx_dir):
    plan = plan_engine("10.13.0", "fp16", onnx_dir=onnx_dir, input_name="input", sample_shape=(1, 28, 28), profile=EngineProfile(1, 32, 256))
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    meta = engine_metadata(plan, trt_version="10.13.0", gpu=gpu, engine_bytes=b"engine", onnx_sha256="ab" * 32, build_seconds=1.5)
    assert meta["tensorrt_version"] == "10.13.0" and meta["gpu"]["compute_capability"] == "9.0"
    assert meta["profile"]["shapes"] == [[1, 1, 28, 28], [32, 1, 28, 28], [256, 1, 28, 28]]
    assert meta["sha256"] == hashlib.sha256(b"engine").hexdigest() and meta["bytes"] == 6
    assert meta["source_onnx"] == "model.fp16.onnx" and meta["builder_flags"] == []
    assert engine_compatibility(meta, trt_version="10.13.0", gpu=gpu) == []
    problems = engine_compatibility(meta, trt_version="11.0.0", gpu={"name": "NVIDIA L4", "compute_capability": "8.9"})
    assert len(problems) == 2 and "TensorRT 10.13.0" in problems[0] and "sm 8.9" in problems[1]


@pytest.mark.tensorrt
def test_build_and_run_engine(tmp_path, fmnist):
    """A real build on a GPU with TensorRT: FP16 engine parity against PyTorch."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'kdedge-distill[tensorrt]')")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none is visible")
    from kdedge.config import ExportConfig
    from kdedge.exporters import export_model
    from kdedge.models.zoo import load_checkpoint, pretrained_path

    teacher = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model
    config = ExportConfig(formats=("onnx", "tensorrt"), trt_precision="fp16", parity_samples=256)
    result = export_model(teacher, tmp_path / "out", data=fmnist.limit(train=1024, test=1000), config=config)
    engine = result.artifact("model.fp16.plan")
    assert engine.parity["passed"] and engine.accuracy["accuracy"] > 0.9
