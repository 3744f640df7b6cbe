"""The declared preprocessing is the applied one: a consumer following only the metadata gets kdedge's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdedge
from kdedge.data import DatasetSpec, load_dataset, write_idx
from kdedge.data.spec import ArrayDataset
from kdedge.errors import DataError
from kdedge.exporters.export import onnx_metadata


def _float_npz(path, *, n_train=300, n_test=300, size=8, classes=3, seed=0):
    """Float32 pixels in [0, 1] (not 0..255): class c lights band c; 10 % of test labels are flipped.

    The flipped labels keep the accuracy well below 100 % (about 90 %), so equal accuracies mean
    equal predictions rather than two perfect scores.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        x = rng.uniform(0.0, 0.3, (n, 1, size, size)).astype(np.float32)
        band = size // classes
        for i, c in enumerate(y):
            x[i, 0, c * band:(c + 1) * band] += 0.6
        if split == "test":
            flip = rng.random(n) < 0.1
            y = np.where(flip, (y + 1) % classes, y)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int64)
    np.savez(path, **arrays)
    return arrays


def _apply_declared(pre: dict, raw: np.ndarray) -> np.ndarray:
    """Only the declared formula: ``x = (pixel * scale - mean[c]) / std[c]`` on raw ``(N, C, H, W)`` pixels."""
    mean = np.asarray(pre["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(1, -1, 1, 1)
    return ((raw.astype(np.float32) * np.float32(pre["scale"]) - mean) / std).astype(np.float32)


def test_float_npz_export_metadata_reproduces_measured_accuracy(tmp_path):
    import onnx
    import onnxruntime as ort

    raw = _float_npz(tmp_path / "float.npz")
    data = load_dataset(str(tmp_path / "float.npz"))
    torch.manual_seed(0)
    model = kdedge.create_model(kdedge.ModelSpec("mlp", 0.25, 3, (1, 8, 8)))
    kdedge.train(model, data.train, data.test, config=kdedge.TrainConfig(epochs=4, batch_size=32, optimizer="adamw", lr=1e-2, device="cpu"),
                 progress=False)
    result = kdedge.export_model(model, tmp_path / "export", data=data, config=kdedge.ExportConfig(formats=("onnx",), parity_samples=64))
    measured = result.artifact("model.onnx").accuracy
    n = len(raw["y_test"])
    assert measured["samples"] == n and measured["accuracy"] > 0.6  # learned (~0.9 with the flipped labels); chance is 1/3

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "export" / "model.onnx")).metadata_props}
    pre = json.loads(meta["kdedge.preprocessing"])
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["preprocessing"] == pre

    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {json.loads(meta["kdedge.input"])["name"]: _apply_declared(pre, raw["x_test"])})[0]
    correct = int((logits.argmax(1) == raw["y_test"]).sum())
    top2 = np.sort(logits, axis=1)[:, -2:]
    near_ties = int((top2[:, 1] - top2[:, 0] < 1e-4).sum())
    assert abs(correct - round(measured["accuracy"] * n)) <= near_ties, (correct, measured, near_ties)
    assert pre["scale"] == data.spec.scale == 1.0  # float storage is used as stored


@pytest.mark.parametrize("dtype, expected", [(np.uint8, 1 / 255), (np.float32, 1.0), (np.float64, 1.0), (np.int16, 1.0)])
def test_declared_formula_on_raw_pixels_gives_kdedges_inputs(tmp_path, dtype, expected):
    rng = np.random.default_rng(1)
    top = 255 if dtype == np.uint8 else (3000 if dtype == np.int16 else 1)
    x = (rng.random((40, 2, 5, 5)) * top).astype(dtype)
    y = np.arange(40) % 3
    np.savez(tmp_path / "d.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.spec.scale == expected
    pre = json.loads(onnx_metadata(data.spec, model_name="m", source_sha256=None)["kdedge.preprocessing"])
    assert pre["scale"] == expected
    np.testing.assert_allclose(_apply_declared(pre, x[30:]), data.test.inputs().numpy(), rtol=1e-5, atol=1e-5)


def test_idx_int16_pixels_are_used_as_stored(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 20), ("test", 10)):
        write_idx(tmp_path / f"{split if split == 'train' else 't10k'}-images-idx3-ubyte", rng.integers(0, 4096, (n, 4, 4)).astype(np.int16))
        write_idx(tmp_path / f"{split if split == 'train' else 't10k'}-labels-idx1-ubyte", (np.arange(n) % 2).astype(np.uint8))
    data = load_dataset(str(tmp_path))
    assert data.spec.scale == 1.0 and data.spec.mean[0] > 100  # 12-bit pixels, not squeezed by 1/255


def test_spec_scale_roundtrip_and_legacy_specs():
    spec = DatasetSpec("x.npz", (1, 4, 4), 2, ("a", "b"), (0.5,), (0.25,), scale=1.0)
    assert DatasetSpec.from_dict(spec.to_dict()) == spec and DatasetSpec.from_dict(spec.to_dict()).scale == 1.0
    legacy = {k: v for k, v in spec.to_dict().items() if k != "scale"}  # written before the field existed
    assert DatasetSpec.from_dict(legacy).scale is None  # float or uint8: that file cannot tell
    assert DatasetSpec.from_dict(legacy | {"name": "fashion-mnist"}).scale == 1 / 255  # built-ins are uint8 IDX
    with pytest.raises(DataError, match="records no pixel scale"):
        onnx_metadata(DatasetSpec.from_dict(legacy), model_name="m", source_sha256=None)
    with pytest.raises(DataError, match="scale must be a positive number"):
        DatasetSpec("x", (1, 4, 4), 2, ("a", "b"), (0.5,), (0.25,), scale=0.0)


def test_array_dataset_refuses_a_scale_its_images_do_not_have():
    uint8_spec = DatasetSpec("x", (1, 2, 2), 2, ("a", "b"), (0.5,), (0.25,))
    floats = torch.rand(3, 1, 2, 2)
    with pytest.raises(DataError, match="images stored as float32 take pixel scale 1, but spec 'x' declares scale 0.0039"):
        ArrayDataset(floats, torch.tensor([0, 1, 0]), uint8_spec)
    float_spec = DatasetSpec("x", (1, 2, 2), 2, ("a", "b"), (0.5,), (0.25,), scale=1.0)
    ds = ArrayDataset(floats, torch.tensor([0, 1, 0]), float_spec)
    torch.testing.assert_close(ds.inputs(), (floats - 0.5) / 0.25)
    with pytest.raises(DataError, match="take pixel scale 0.00392157"):
        ArrayDataset(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.tensor([0]), float_spec)


def test_smoke_inputs_follow_the_declared_range():
    from kdedge.bundle import _smoke_inputs

    manifest = {"input": {"shape": ["batch", 2, 6, 6]}, "preprocessing": {"scale": 1.0, "mean": [100.0, -3.0], "std": [5.0, 0.5]}}
    x = _smoke_inputs(manifest)
    assert x.shape == (2, 2, 6, 6) and x.dtype == np.float32
    assert np.abs(x).max() <= 2.0 + 1e-5 and x.std() > 0.5  # mean ± 2 std of the data, not 0..255
    manifest["preprocessing"] = {"scale": 1 / 255, "mean": [0.25, 0.5], "std": [0.5, 0.25]}
    x = _smoke_inputs(manifest).astype(np.float64)
    pixels = (x * np.array([0.5, 0.25]).reshape(1, -1, 1, 1) + np.array([0.25, 0.5]).reshape(1, -1, 1, 1)) * 255
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)  # whole uint8 pixels
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3 and pixels.max() - pixels.min() > 200


def test_splits_stored_as_different_dtypes_are_refused(tmp_path):
    """One spec has one scale: uint8 training pixels and float test pixels cannot share it."""
    x = np.zeros((6, 1, 4, 4), np.uint8)
    np.savez(tmp_path / "mixed.npz", x_train=x, y_train=np.arange(6) % 2, x_test=x[:2].astype(np.float32), y_test=np.array([0, 1]))
    with pytest.raises(DataError, match="train images are stored as uint8 but test images as float32"):
        load_dataset(str(tmp_path / "mixed.npz"))
