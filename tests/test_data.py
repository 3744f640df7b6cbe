"""IDX and NPZ readers, built-in dataset lookup, and every corrupt-file case."""

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from kdedge.data import ArrayDataset, DatasetSpec, load_dataset, load_idx_dir, load_npz, parse_idx, read_idx, write_idx
from kdedge.data.sources import BuiltinDataset, fetch_builtin
from kdedge.errors import DataError

from conftest import make_idx_dir


def test_parse_golden_bytes():
    # 00 00 08 02 | 2 | 3 | six bytes: a 2x3 uint8 matrix, exactly as the MNIST spec lays it out.
    raw = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255])
    arr = parse_idx(raw)
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, [[1, 2, 3], [4, 5, 255]])


def test_parse_big_endian_int32():
    raw = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + struct.pack(">2i", -7, 1 << 20)
    np.testing.assert_array_equal(parse_idx(raw), [-7, 1 << 20])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_roundtrip(tmp_path, dtype, compress):
    arr = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "a.idx"
    write_idx(path, arr, compress=compress)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def _valid() -> bytes:
    return bytes([0, 0, 0x08, 1, 0, 0, 0, 4, 9, 8, 7, 6])


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "too short"),
        (b"\x00\x00", "too short"),
        (bytes([1, 2, 3, 4]) + b"\x00" * 8, "bad magic"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]), "bad magic"),  # unknown type code
        (bytes([0, 0, 0x08, 0]), "bad magic"),  # zero dimensions
        (bytes([0, 0, 0x08, 3, 0, 0, 0, 1]), "truncated header"),
        (_valid()[:-1], "truncated"),
        (_valid() + b"\x00", "trailing bytes"),
        (gzip.compress(_valid(), mtime=0)[:-6], "gzip"),
    ],
)
def test_corrupt_bytes(raw, message):
    with pytest.raises(DataError, match=message):
        parse_idx(raw, source="x.idx")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "nope.idx")


def test_idx_dir_loads_and_normalizes(tmp_path):
    splits = load_idx_dir(make_idx_dir(tmp_path / "d"))
    assert len(splits.train) == 60 and len(splits.test) == 20
    assert splits.spec.input_shape == (1, 8, 8) and splits.spec.num_classes == 3
    x = splits.train.inputs()
    # Normalization comes from the training set, so the training inputs are standardized.
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    assert set(splits.spec.files) == {"train_images", "train_labels", "test_images", "test_labels"}


def test_idx_dir_raw_files(tmp_path):
    splits = load_idx_dir(make_idx_dir(tmp_path / "d", compress=False))
    assert len(splits.train) == 60


def test_idx_dir_count_mismatch(tmp_path):
    d = make_idx_dir(tmp_path / "d")
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(59, np.uint8), compress=True)
    with pytest.raises(DataError, match="count mismatch.*60 images, 59 labels"):
        load_idx_dir(d)


def test_idx_dir_missing_file(tmp_path):
    d = make_idx_dir(tmp_path / "d")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no IDX file for test_labels"):
        load_idx_dir(d)


def test_idx_dir_truncated_file(tmp_path):
    d = make_idx_dir(tmp_path / "d", compress=False)
    f = d / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(str(d))


def test_npz_xy_split_is_fixed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (70, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 4, 70)
    np.savez(tmp_path / "d.npz", x=x, y=y, labels=np.array(["a", "b", "c", "d"]))
    a, b = load_npz(tmp_path / "d.npz"), load_npz(tmp_path / "d.npz")
    assert len(a.train) == 60 and len(a.test) == 10
    assert torch.equal(a.test.images, b.test.images)
    assert a.spec.labels == ("a", "b", "c", "d")


def test_npz_named_splits(tmp_path):
    x = np.zeros((5, 1, 4, 4), np.float32)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(5) % 2, x_test=x[:2], y_test=np.array([0, 1]))
    s = load_dataset(str(tmp_path / "d.npz"))
    assert s.spec.input_shape == (1, 4, 4) and len(s.test) == 2


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"a": np.zeros(3)}, "expected x and y"),
        ({"x": np.zeros((4, 3, 3)), "y": np.zeros(3, int)}, "count mismatch"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, int)}, "images must be"),
        ({"x": np.zeros((4, 3, 3)), "y": np.zeros(4)}, "integer"),
    ],
)
def test_npz_bad_contents(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "d.npz")


def test_npz_refuses_pickle(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([object()], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DataError):
        load_npz(tmp_path / "d.npz")


def test_npz_not_a_zip(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(tmp_path / "d.npz")


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'cifar-11'.*fashion-mnist"):
        load_dataset("cifar-11")


def test_builtin_found_in_kdedge_data(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "mnist")
    monkeypatch.setenv("KDEDGE_DATA", str(tmp_path))
    s = load_dataset("mnist")
    assert s.spec.name == "mnist" and s.spec.mean == (0.1307,) and s.spec.labels[3] == "3"


def test_builtin_missing_offline_names_the_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("KDEDGE_DATA", str(tmp_path))
    monkeypatch.setenv("KDEDGE_OFFLINE", "1")
    import kdedge.data.sources as sources

    monkeypatch.setattr(sources, "_search_dirs", lambda name: [tmp_path / name])
    with pytest.raises(DataError, match=r"not found.*KDEDGE_DATA.*--data DIR"):
        load_dataset("mnist")


def test_fetch_checks_sha256(tmp_path):
    src = make_idx_dir(tmp_path / "mirror")
    files = {}
    for role, name in (("train_images", "train-images-idx3-ubyte.gz"), ("train_labels", "train-labels-idx1-ubyte.gz"),
                       ("test_images", "t10k-images-idx3-ubyte.gz"), ("test_labels", "t10k-labels-idx1-ubyte.gz")):
        files[role] = (name, hashlib.sha256((src / name).read_bytes()).hexdigest())
    good = BuiltinDataset("toy", ("a", "b", "c"), (0.5,), (0.5,), files, (src.as_uri() + "/",))
    fetch_builtin(good, tmp_path / "dest")
    assert len(list((tmp_path / "dest").glob("*.gz"))) == 4
    assert not list((tmp_path / "dest").glob(".*part"))  # no temporary files left behind

    files["train_images"] = (files["train_images"][0], "0" * 64)
    bad = BuiltinDataset("toy", ("a", "b", "c"), (0.5,), (0.5,), files, (src.as_uri() + "/",))
    with pytest.raises(DataError, match="sha256"):
        fetch_builtin(bad, tmp_path / "dest2")
    assert not (tmp_path / "dest2" / "train-images-idx3-ubyte.gz").exists()


def test_spec_roundtrip_and_validation():
    spec = DatasetSpec("x", (1, 4, 4), 2, ("a", "b"), (0.5,), (0.25,))
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(DataError, match="labels"):
        DatasetSpec("x", (1, 4, 4), 3, ("a", "b"), (0.5,), (0.25,))


def test_array_dataset_normalizes_and_fingerprints():
    spec = DatasetSpec("x", (1, 2, 2), 2, ("a", "b"), (0.5,), (0.25,))
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    ds = ArrayDataset(images, torch.tensor([1]), spec)
    # (p/255 − 0.5) / 0.25
    torch.testing.assert_close(ds[0][0], torch.tensor([[[-2.0, 2.0], [-1.2, -0.4]]]), atol=1e-6, rtol=0)
    other = ArrayDataset(images.clone(), torch.tensor([0]), spec)
    assert ds.fingerprint() != other.fingerprint()
    with pytest.raises(DataError, match="labels must lie"):
        ArrayDataset(images, torch.tensor([2]), spec)


def test_fashion_mnist_is_the_real_thing(fmnist):
    assert len(fmnist.train) == 60000 and len(fmnist.test) == 10000
    assert fmnist.spec.labels[9] == "Ankle boot"
    # The official set is balanced: 6,000 training images per class.
    assert torch.bincount(fmnist.train.labels).tolist() == [6000] * 10
