"""Image folders, arrays in any layout, memory-mapped .npy and validation splits (issue 13)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kdedge.data import ArrayDataset, FolderDataset, load_dataset, load_folder
from kdedge.data.folders import resize_and_crop, write_image_folder
from kdedge.data.spec import DatasetSpec
from kdedge.distill.teacher import FrozenTeacher, logit_cache_key, teacher_logits
from kdedge.errors import DataError
from tests.conftest import TinyNet

CLASSES = ("a_shirt", "b_trouser", "c_bag")


def _fmnist_subset(fmnist, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real Fashion-MNIST images of classes 0, 1 and 8 (relabelled 0..2), uint8 (N, 28, 28)."""
    keep = torch.isin(fmnist.train.labels, torch.tensor([0, 1, 8])).nonzero().squeeze(1)[offset : offset + n]
    images = fmnist.train.images[keep][:, 0].numpy()
    labels = fmnist.train.labels[keep].numpy()
    return images, np.searchsorted([0, 1, 8], labels)


@pytest.fixture(scope="module")
def png_folder(fmnist, tmp_path_factory):
    root = tmp_path_factory.mktemp("png")
    xtr, ytr = _fmnist_subset(fmnist, 90)
    xte, yte = _fmnist_subset(fmnist, 30, offset=90)
    write_image_folder(root, "train", xtr, ytr, CLASSES)
    write_image_folder(root, "test", xte, yte, CLASSES)
    return root, (xtr, ytr), (xte, yte)


def _rgb(images: np.ndarray, size: int) -> np.ndarray:
    """Tinted RGB versions of gray images, resized to ``size`` (as a user's photos would be)."""
    out = []
    for i, g in enumerate(images):
        tint = np.array([1.0, 0.6 + 0.4 * (i % 2), 0.8], dtype=np.float32)
        rgb = (g[..., None].astype(np.float32) * tint).clip(0, 255).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)))
    return np.stack(out)


def test_png_folder_reads_the_exact_pixels_and_class_order(png_folder):
    root, (xtr, ytr), _ = png_folder
    data = load_folder(root, workers=0)
    assert isinstance(data.train, FolderDataset)
    assert data.spec.input_shape == (1, 28, 28) and data.spec.color == "L" and data.spec.resize is None
    assert data.spec.labels == CLASSES  # class index = sorted folder name
    assert len(data.train) == 90 and len(data.test) == 30
    # Files were written in index order inside each class folder; the listing is sorted by class, then name.
    order = np.argsort(ytr, kind="stable")
    raw = data.train.raw(torch.arange(90))
    assert raw.dtype == torch.uint8
    np.testing.assert_array_equal(raw[:, 0].numpy(), xtr[order])
    np.testing.assert_array_equal(data.train.labels.numpy(), ytr[order])


def test_folder_inputs_equal_the_array_path_with_the_same_normalization(png_folder):
    root, (xtr, ytr), _ = png_folder
    folder = load_folder(root, workers=0, norm=((0.286,), (0.353,)))
    order = np.argsort(ytr, kind="stable")
    spec = DatasetSpec("arrays", (1, 28, 28), 3, CLASSES, (0.286,), (0.353,))
    arrays = ArrayDataset(torch.from_numpy(xtr[order][:, None]), torch.from_numpy(ytr[order]), spec)
    torch.testing.assert_close(folder.train.inputs(torch.arange(90)), arrays.inputs(), rtol=0, atol=0)


def test_worker_processes_decode_the_same_batches(png_folder):
    root, _, _ = png_folder
    serial, parallel = load_folder(root, workers=0), load_folder(root, workers=2)
    batches = [torch.tensor([5, 3, 88]), torch.tensor([0, 1]), torch.tensor([40])]
    got = list(parallel.train.batches(batches))
    want = list(serial.train.batches(batches))
    for (i1, x1, y1), (i2, x2, y2) in zip(got, want):
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(y1, y2)



def test_worker_batches_leave_the_processs_sigchld_handler_as_it_was(png_folder):
    """torch's DataLoader installs a Python SIGCHLD handler for good; with it, a process that tuned OpenVINO dies at its next child."""
    import signal

    root, _, _ = png_folder
    before = signal.getsignal(signal.SIGCHLD)
    got = list(load_folder(root, workers=2).train.batches([torch.tensor([5, 3]), torch.tensor([0])]))
    assert len(got) == 2 and signal.getsignal(signal.SIGCHLD) is before

def test_mean_std_are_measured_on_training_images_and_recorded(png_folder):
    root, (xtr, _), _ = png_folder
    spec = load_folder(root, workers=0).spec
    pixels = xtr.astype(np.float64) / 255  # all 90 < NORM_SAMPLE: the sample is the whole split
    assert spec.mean[0] == pytest.approx(pixels.mean(), abs=1e-6)
    assert spec.std[0] == pytest.approx(pixels.std(ddof=1), abs=1e-6)


def test_resize_and_crop_follows_torchvision_arithmetic():
    image = Image.fromarray(np.arange(40 * 60, dtype=np.uint32).reshape(60, 40).astype(np.uint8))  # W 40, H 60
    out = resize_and_crop(image, 32, (32, 32))
    assert out.size == (32, 32)
    resized = image.resize((32, 48), Image.Resampling.BILINEAR)  # int(32 * 60 / 40) = 48
    np.testing.assert_array_equal(np.asarray(out), np.asarray(resized)[8:40])  # round((48 - 32) / 2) = 8


def test_rgb_jpeg_folder_at_another_resolution(fmnist, tmp_path):
    xtr, ytr = _fmnist_subset(fmnist, 30)
    xte, yte = _fmnist_subset(fmnist, 9, offset=30)
    write_image_folder(tmp_path, "train", _rgb(xtr, 40), ytr, CLASSES, format="jpeg")
    write_image_folder(tmp_path, "test", _rgb(xte, 40), yte, CLASSES, format="jpeg")
    data = load_dataset(str(tmp_path), image_size=32, workers=0)
    assert data.spec.input_shape == (3, 32, 32) and data.spec.color == "RGB" and data.spec.resize == 32
    assert len(data.spec.mean) == 3 and data.spec.mean[0] > data.spec.mean[1]  # the red channel is untinted
    x = data.test.inputs(torch.arange(9))
    assert x.shape == (9, 3, 32, 32) and torch.isfinite(x).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)  # H 10, W 20 as stored
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    for split in ("train", "test"):
        for cls in ("x", "y"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(pixels).save(tmp_path / split / cls / "0.jpg", exif=exif.tobytes(), quality=100)
    data = load_folder(tmp_path, workers=0)
    assert data.spec.input_shape == (3, 20, 10)  # displayed: H 20, W 10


@pytest.mark.parametrize("problem, match", [
    ("empty_class", r"empty class folder"),
    ("non_image", r"notes\.txt: not an image file"),
    ("not_decodable", r"cannot be read as an image"),
    ("mixed_sizes", r"different sizes .* pass --image-size N"),
    ("val_extra_class", r"val: has class folder\(s\) d_extra that train/ lacks"),
    ("no_test", r"has train/ but no test/ or val/ folder"),
])
def test_bad_folders_fail_at_load_with_one_line(tmp_path, problem, match):
    img = np.full((8, 8), 100, np.uint8)
    for split in ("train", "test"):
        write_image_folder(tmp_path, split, np.stack([img] * 4), np.array([0, 0, 1, 1]), ("p", "q"))
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0")  # what file managers leave: ignored
    if problem == "empty_class":
        (tmp_path / "train" / "r").mkdir()
    elif problem == "non_image":
        (tmp_path / "train" / "p" / "notes.txt").write_text("hi")
    elif problem == "not_decodable":
        (tmp_path / "train" / "p" / "fake.png").write_bytes(b"this is not a png")
    elif problem == "mixed_sizes":
        Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "train" / "q" / "big.png")
    elif problem == "val_extra_class":
        write_image_folder(tmp_path, "val", img[None], np.array([0]), ("d_extra",))
    elif problem == "no_test":
        import shutil

        shutil.rmtree(tmp_path / "test")
    with pytest.raises(DataError, match=match) as info:
        load_folder(tmp_path, workers=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_image_fails_when_decoded_with_one_line(tmp_path, workers):
    img = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    for split in ("train", "test"):
        write_image_folder(tmp_path, split, np.stack([img] * 4), np.array([0, 0, 1, 1]), ("p", "q"))
    victim = tmp_path / "train" / "q" / "3.png"
    victim.write_bytes(victim.read_bytes()[:120])  # the header survives, the pixels do not
    data = load_folder(tmp_path, workers=workers, norm=((0.5,), (0.5,)))
    with pytest.raises(DataError, match=r"3\.png: cannot be decoded") as info:
        list(data.train.batches([torch.tensor([0, 1]), torch.tensor([2, 3])]))
    assert "\n" not in str(info.value)


def test_val_folder_next_to_test_is_the_validation_split(tmp_path):
    img = np.full((8, 8), 100, np.uint8)
    for split, n in (("train", 6), ("test", 4), ("val", 2)):
        write_image_folder(tmp_path, split, np.stack([img] * n), np.arange(n) % 2, ("p", "q"))
    data = load_dataset(str(tmp_path), workers=0)
    assert (len(data.train), len(data.test), len(data.val)) == (6, 4, 2)
    with pytest.raises(DataError, match="own val/ folder"):
        load_dataset(str(tmp_path), val_split=0.2, workers=0)


def test_val_split_holds_out_disjoint_training_rows(fmnist):
    from kdedge.data import hold_out

    small = fmnist.limit(train=1000)
    split = hold_out(small, 0.1)
    assert (len(split.train), len(split.val)) == (900, 100)
    assert split.test is small.test
    train_rows, val_rows = split.train.rows, split.val.rows  # rows of the stored images (the limit is a stratified subset of them)
    assert set(train_rows.tolist()).isdisjoint(val_rows.tolist()) and set(train_rows.tolist()) | set(val_rows.tolist()) == set(small.train.rows.tolist())
    assert torch.equal(split.val.inputs(), fmnist.train.inputs(val_rows))
    assert split.train.fingerprint() != small.train.fingerprint()
    again = hold_out(small, 0.1)  # the same on every machine
    assert torch.equal(again.val.rows, val_rows)


def test_folder_logit_cache_is_keyed_by_files_and_matches_arrays(png_folder, tmp_path):
    import os

    root, (xtr, ytr), _ = png_folder
    folder = load_folder(root, workers=1, norm=((0.286,), (0.353,)))
    order = np.argsort(ytr, kind="stable")
    spec = DatasetSpec("arrays", (1, 28, 28), 3, CLASSES, (0.286,), (0.353,))
    arrays = ArrayDataset(torch.from_numpy(xtr[order][:, None]), torch.from_numpy(ytr[order]), spec)
    torch.manual_seed(0)
    teacher = FrozenTeacher(TinyNet(num_classes=3, size=28))
    first = teacher_logits(teacher, folder.train, cache_dir=tmp_path / "c", batch_size=16)
    assert not first.hit and first.path is not None and first.path.is_file()
    torch.testing.assert_close(first.tensor(), teacher_logits(teacher, arrays).tensor())
    assert teacher_logits(teacher, folder.train, cache_dir=tmp_path / "c").hit
    f = root / os.fsdecode(folder.train.files[0])
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a touched (perhaps rewritten) file: another key
    try:
        assert logit_cache_key(teacher, load_folder(root, workers=0, norm=((0.286,), (0.353,))).train) != first.key
    finally:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_nhwc_arrays_and_n1_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (20, 6, 5, 3), dtype=np.uint8)  # (N, H, W, C)
    y = (np.arange(20) % 2).reshape(20, 1)  # Keras-style (N, 1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.spec.input_shape == (3, 6, 5)
    n = len(data.train)
    rows = data.train.rows
    np.testing.assert_array_equal(data.train.raw(torch.arange(n)).numpy(), x[rows.numpy()].transpose(0, 3, 1, 2))


def test_ambiguous_array_layout_needs_layout(tmp_path):
    x = np.zeros((10, 3, 7, 4), np.uint8)  # (N, 3, 7, 4): C = 3 first, or C = 4 last?
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2)
    with pytest.raises(DataError, match="pass --layout NCHW or --layout NHWC"):
        load_dataset(str(tmp_path / "d.npz"))
    assert load_dataset(str(tmp_path / "d.npz"), layout="NHWC").spec.input_shape == (4, 3, 7)
    assert load_dataset(str(tmp_path / "d.npz"), layout="NCHW").spec.input_shape == (3, 7, 4)


def test_npy_directory_is_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        np.save(tmp_path / f"x_{split}.npy", rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8))
        np.save(tmp_path / f"y_{split}.npy", np.arange(n) % 3)
    data = load_dataset(str(tmp_path))
    assert data.spec.input_shape == (1, 8, 8) and data.spec.num_classes == 3
    assert set(data.spec.files) == {"x_train", "y_train", "x_test", "y_test"}
    # The pixels are the file's pages, not a copy: writing through the file changes what the dataset reads.
    mapped = np.load(tmp_path / "x_train.npy", mmap_mode="r+")
    mapped[0, 0, 0, 0] = 7
    mapped.flush()
    assert int(data.train.raw(torch.tensor([0]))[0, 0, 0, 0]) == 7


def test_cli_trains_from_a_folder_and_refuses_bad_input_in_one_line(png_folder, tmp_path):
    root, _, _ = png_folder
    cmd = [sys.executable, "-m", "kdedge", "train", "--data", str(root), "--model", "tiny_cnn", "--epochs", "1", "--batch-size", "32",
           "--val-split", "0.2", "--workers", "1", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["color"] == "L" and metrics["val"]["num_samples"] == 18 and metrics["test"]["num_samples"] == 30
    assert "val_accuracy" in metrics["history"][0] and "test_accuracy" not in metrics["history"][0]
    bad = subprocess.run([sys.executable, "-m", "kdedge", "train", "--data", str(root), "--image-size", "4", "--epochs", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_decoded_cache_serves_the_same_pixels_and_is_reused(png_folder):
    from kdedge._fs import cache_dir

    root, _, _ = png_folder
    fresh = load_folder(root, workers=1)
    want = fresh.train.raw(torch.arange(len(fresh.train)))
    fresh.train.prepare()
    files = list((cache_dir() / "decoded").glob("*.u8"))
    assert len(files) == 1 and files[0].stat().st_size == 90 * 28 * 28
    assert torch.equal(fresh.train.raw(torch.arange(90)), want)
    got = list(fresh.train.batches([torch.tensor([7, 2]), torch.tensor([89])]))
    assert torch.equal(got[0][1], fresh.train.normalize(want[[7, 2]])) and torch.equal(got[1][2], fresh.train.labels[[89]])
    mtime = files[0].stat().st_mtime_ns
    again = load_folder(root, workers=0)
    again.train.prepare()  # the same listing and transform: the file is reused, not rewritten
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(again.train.raw(torch.arange(90)), want)
    off = load_folder(root, workers=0, decode_cache=False)
    off.train.prepare()
    assert off.train._decoded is None


def test_train_limit_applies_before_the_validation_split():
    data = load_dataset("fashion-mnist", train_limit=1000, test_limit=200, val_split=0.1)
    assert (len(data.train), len(data.val), len(data.test)) == (900, 100, 200)


def test_non_ascii_names_and_symlink_loops(tmp_path):
    img = np.full((8, 8), 90, np.uint8)
    for split in ("train", "test"):
        write_image_folder(tmp_path, split, np.stack([img] * 4), np.array([0, 0, 1, 1]), ("café", "日本"))
    data = load_folder(tmp_path, workers=0)
    assert data.spec.labels == ("café", "日本") and data.train.raw(torch.arange(4)).shape == (4, 1, 8, 8)
    (tmp_path / "train" / "café" / "loop").symlink_to(tmp_path / "train" / "café")
    with pytest.raises(DataError, match="symbolic link loop") as info:
        load_folder(tmp_path, workers=0)
    assert "\n" not in str(info.value)


def test_a_shard_of_a_prepared_folder_reads_the_decoded_file(png_folder):
    root, _, _ = png_folder
    data = load_folder(root, workers=0)
    want = data.train.raw(torch.arange(90))
    data.train.prepare()
    part = data.train.subset(torch.tensor([5, 80, 7])).subset(torch.tensor([2, 0]))
    assert part._decoded is data.train._decoded  # no decoding from files
    assert torch.equal(part.raw(torch.arange(2)), want[[7, 5]])


def test_resume_accepts_a_checkpoint_written_before_new_options():
    from kdedge.config import DistillConfig
    from kdedge.distill.checkpoint import config_differences

    current = DistillConfig(epochs=3).to_dict()
    saved = {k: v for k, v in current.items() if k not in ("val_split", "image_size", "layout", "workers", "decode_cache")}
    assert config_differences(saved, current, defaults=DistillConfig().to_dict()) == []
    assert config_differences(saved, current | {"val_split": 0.1}, defaults=DistillConfig().to_dict()) == ["val_split: None -> 0.1"]
    assert config_differences(current, current | {"workers": 4, "decode_cache": False}) == []  # they do not change the numbers
