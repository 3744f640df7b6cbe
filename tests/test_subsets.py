"""A limit or a sample keeps every class in its share (issue 24, item 1).

An image folder lists its files class by class, so "the first N" of it is the first classes only:
a 10-class folder with ``--train-limit 60 --test-limit 20`` used to train and test on two classes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdedge.config import ExportConfig
from kdedge.data import load_dataset, stratified_rows
from kdedge.data.folders import write_image_folder
from kdedge.exporters import export_model
from kdedge.exporters.export import _calibration
from tests.conftest import TinyNet

LABELS = tuple(f"class_{c}" for c in range(10))


@pytest.fixture(scope="module")
def ten_class_folder(fmnist, tmp_path_factory):
    """30 training and 10 test images of each Fashion-MNIST class, as tinted 12-px RGB PNGs, listed class by class."""
    root = tmp_path_factory.mktemp("ten-classes")
    for split, per_class, offset in (("train", 30, 0), ("test", 10, 30)):
        images, labels = [], []
        for c in range(10):
            rows = (fmnist.train.labels == c).nonzero().squeeze(1)[offset : offset + per_class]
            for i, gray in enumerate(fmnist.train.images[rows][:, 0].numpy()):
                tint = np.array([1.0, 0.5 + 0.05 * c, 0.8 - 0.02 * i], np.float32)
                rgb = (gray[..., None].astype(np.float32) * tint).clip(0, 255).astype(np.uint8)
                images.append(np.asarray(Image.fromarray(rgb).resize((12, 12), Image.Resampling.BILINEAR)))
                labels.append(c)
        write_image_folder(root, split, np.stack(images), np.array(labels), LABELS)
    return root


def test_folder_limits_keep_every_class(ten_class_folder):
    data = load_dataset(str(ten_class_folder), train_limit=60, test_limit=20, workers=0)
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [6] * 10  # was [30, 30, 0, ...]
    assert torch.bincount(data.test.labels, minlength=10).tolist() == [2] * 10  # was [10, 10, 0, ...]
    again = load_dataset(str(ten_class_folder), train_limit=60, test_limit=20, workers=0)
    assert torch.equal(data.train.raw(torch.arange(60)), again.train.raw(torch.arange(60)))  # seeded: the same subset every time


def test_export_parity_and_calibration_see_every_class(ten_class_folder, tmp_path):
    data = load_dataset(str(ten_class_folder), workers=0)
    torch.manual_seed(0)
    result = export_model(TinyNet(10, channels=3, size=12), tmp_path / "export", data=data,
                          config=ExportConfig(formats=("onnx",), parity_samples=20, evaluate=False))
    reference = json.loads((result.out / "export.json").read_text())["reference"]
    assert reference["parity_samples"] == 20 and reference["parity_classes"] == 10  # the first 20 files are 2 classes
    calibration = _calibration(data, 30)
    assert calibration.shape[0] == 30
    rows = stratified_rows(data.train.labels, 30)
    assert np.array_equal(calibration, data.train.inputs(rows).numpy())
    assert torch.bincount(data.train.labels[rows], minlength=10).tolist() == [3] * 10


def test_array_limits_are_stratified_too(tmp_path):
    x = np.zeros((300, 1, 8, 8), np.uint8)
    y = np.repeat(np.arange(3), 100)  # sorted by class, as an export of a labelled folder would be
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(300) % 256, np.arange(300) // 256  # each image carries its row number
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[::10].copy(), y_test=y[::10].copy())
    data = load_dataset(str(tmp_path / "d.npz"), train_limit=30, test_limit=9)
    assert torch.bincount(data.train.labels, minlength=3).tolist() == [10, 10, 10]
    assert torch.bincount(data.test.labels, minlength=3).tolist() == [3, 3, 3]
    # Each image is its own row's, with its own label (a subset, not a relabelled prefix).
    pixels = data.train.raw(torch.arange(30))[:, 0, 0].long()
    rows = pixels[:, 0] + 256 * pixels[:, 1]
    assert torch.equal(torch.from_numpy(y)[rows], data.train.labels) and len(set(rows.tolist())) == 30


def test_stratified_rows_golden():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    counts = lambda rows: torch.bincount(labels[rows], minlength=3).tolist()  # noqa: E731
    # One row per class first, then the rest in proportion to count - 1 (largest remainders): 1 + 6, 1 + 1, 1 + 0.
    assert counts(stratified_rows(labels, 10)) == [7, 2, 1]
    assert counts(stratified_rows(labels, 3)) == [1, 1, 1]
    assert counts(stratified_rows(labels, 2)) == [1, 1, 0]  # fewer rows than classes: one for each of the largest
    balanced = torch.arange(10).repeat_interleave(5)
    picked = {tuple(torch.unique(balanced[stratified_rows(balanced, 3, seed=s)]).tolist()) for s in range(6)}
    assert all(len(p) == 3 for p in picked) and len(picked) > 1  # equal classes: the seed decides which
    assert counts(stratified_rows(labels, 99)) == [89, 9, 1]  # never more rows than a class has
    rows = stratified_rows(labels, 50, seed=3)
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 50  # ascending, no repeats
    assert not torch.equal(rows, stratified_rows(labels, 50, seed=4))  # the seed picks which rows
    assert torch.equal(stratified_rows(labels, 500), torch.arange(100))
    with pytest.raises(Exception, match="positive"):
        stratified_rows(labels, 0)


def test_fashion_mnist_limit_is_balanced(fmnist):
    small = fmnist.limit(train=2000, test=500)
    assert torch.bincount(small.train.labels, minlength=10).tolist() == [200] * 10
    assert torch.bincount(small.test.labels, minlength=10).tolist() == [50] * 10
