"""Distilling from a teacher the user has only as ONNX: logits from onnxruntime, cached like any teacher's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdedge.cli import main
from kdedge.data import load_dataset, read_idx, write_idx
from kdedge.models.onnx_teacher import OnnxTeacherModule
from kdedge.distill.teacher import FrozenTeacher, teacher_logits
from kdedge.errors import DataError
from kdedge.exporters import export_onnx
from kdedge.metrics import evaluate, predict_logits

from conftest import TinyNet, make_idx_dir


@pytest.fixture
def tiny(tmp_path):
    root = make_idx_dir(tmp_path / "data", n_train=120, n_test=400)
    # 10 % of the test labels flipped: the teacher then scores about 0.9, not 1.0, so an equal score
    # and confusion matrix mean equal predictions, not two perfect scores.
    labels_file = next(root.glob("t10k-labels*"))
    labels = read_idx(labels_file).copy()
    flip = np.random.default_rng(1).choice(len(labels), size=len(labels) // 10, replace=False)
    labels[flip] = (labels[flip] + 1) % 3
    write_idx(labels_file, labels, compress=labels_file.suffix == ".gz")
    data = load_dataset(str(root))
    torch.manual_seed(0)
    teacher = TinyNet(num_classes=3)
    # Trained (full batch, a few ms), so its accuracy is far from chance and an ONNX teacher that
    # computed something else could not match it by luck.
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(teacher(data.train.inputs()), data.train.labels).backward()
        optimizer.step()
    teacher.eval()
    path = tmp_path / "teacher.onnx"
    export_onnx(teacher, path, input_shape=(1, 8, 8))
    return data, teacher, path


def test_onnx_teacher_logits_match_torch_and_are_cached(tiny, tmp_path):
    data, teacher, path = tiny
    onnx_teacher = FrozenTeacher(OnnxTeacherModule(path, input_shape=(1, 8, 8), num_classes=3))
    cache = tmp_path / "cache"
    from_onnx = teacher_logits(onnx_teacher, data.train, cache_dir=cache)
    from_torch = teacher_logits(FrozenTeacher(teacher), data.train, cache_dir=cache)
    assert not from_onnx.hit and (cache / f"{from_onnx.key}.npy").is_file()
    assert from_onnx.key != from_torch.key  # the cache tells the two teachers apart
    assert torch.allclose(from_onnx.tensor(), from_torch.tensor(), atol=1e-4, rtol=0)
    again = teacher_logits(FrozenTeacher(OnnxTeacherModule(path, input_shape=(1, 8, 8), num_classes=3)), data.train, cache_dir=cache)
    assert again.hit and again.key == from_onnx.key


def test_distill_from_onnx_teacher_via_cli(tiny, tmp_path, capsys):
    data_dir = tmp_path / "data"
    _, _, path = tiny
    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(path), "--student", "mlp@0.25", "--data", str(data_dir), "--epochs", "2", "--batch-size", "32",
                 "--cache", "memory", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"]["name"] == str(path) and metrics["teacher_cache"]["hit"] is False
    # The ONNX teacher scores what the torch teacher it was exported from scores on the same test
    # images: the same confusion matrix, except where torch's top two logits nearly tie.
    data, teacher, _ = tiny
    reference = evaluate(teacher, data.test)
    logits, _ = predict_logits(teacher, data.test)
    top2 = logits.topk(2, dim=1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 1e-3).sum())
    assert 0.8 < reference.accuracy < 0.95 and reference.num_samples == 400  # trained: far from chance (1/3), yet not perfect
    onnx_test = metrics["teacher"]["test"]
    assert onnx_test["num_samples"] == 400
    assert abs(onnx_test["accuracy"] - reference.accuracy) * 400 <= near_ties
    cells_differing = sum(abs(a - b) for row_o, row_t in zip(onnx_test["confusion"], reference.confusion) for a, b in zip(row_o, row_t))
    assert cells_differing <= 2 * near_ties  # one changed prediction moves one count between two cells


def test_onnx_teacher_that_does_not_fit_the_data(tiny, tmp_path, capsys):
    _, _, path = tiny
    with pytest.raises(DataError, match=r"has shape \['batch', 1, 8, 8\], but the data's samples are \(1, 28, 28\)"):
        OnnxTeacherModule(path, input_shape=(1, 28, 28), num_classes=3)
    with pytest.raises(DataError, match=r"but the data has 10 classes; expected \(batch, 10\) logits"):
        OnnxTeacherModule(path, input_shape=(1, 8, 8), num_classes=10)
    code = main(["distill", "--teacher", str(path), "--epochs", "1", "--train-limit", "100", "--test-limit", "50", "--quiet", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "but the data's samples are (1, 28, 28)" in err[0]


def test_onnx_teacher_digest_covers_its_external_weights(tmp_path):
    """torch.onnx.export writes the weights beside the graph (NAME.onnx.data): new weights, same .onnx bytes, another cache key."""
    import onnx

    from kdedge._fs import file_sha256
    from kdedge.models.onnx_teacher import onnx_sha256

    net = TinyNet(num_classes=3).eval()
    path = tmp_path / "t.onnx"
    torch.onnx.export(net, (torch.zeros(2, 1, 8, 8),), str(path), input_names=["input"], dynamo=True, external_data=False)
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="t.onnx.data", size_threshold=100)
    graph_bytes, before = file_sha256(path), onnx_sha256(path)
    logits = OnnxTeacherModule(path, input_shape=(1, 8, 8), num_classes=3)(torch.ones(1, 1, 8, 8))
    data = bytearray((tmp_path / "t.onnx.data").read_bytes())
    data[:4] = bytes(4) if data[:4] != bytes(4) else b"\x00\x00\x80\x3f"  # one weight changed (0.0 or 1.0 in float32)
    (tmp_path / "t.onnx.data").write_bytes(bytes(data))
    teacher = OnnxTeacherModule(path, input_shape=(1, 8, 8), num_classes=3)
    assert file_sha256(path) == graph_bytes and onnx_sha256(path) != before  # the .onnx is the same file; its weights are not
    assert bytes(teacher.onnx_sha256.numpy()).hex() == onnx_sha256(path)
    assert not torch.equal(teacher(torch.ones(1, 1, 8, 8)), logits)
