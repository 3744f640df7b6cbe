"""CIFAR-10 binary reader: golden pixels in NHWC, archive vs extracted folder, and every corrupt case."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdedge.data import cifar
from kdedge.data.cifar import ARCHIVE, CIFAR10_LABELS, FOLDER, TEST_FILE, TRAIN_FILES, find_cifar10, read_cifar10
from kdedge.errors import DataError

TRAIN_PER_BATCH, TEST_RECORDS = 20, 10
RECORD = 3073


def pixel(batch: int, i: int, y: int, x: int, c: int) -> np.ndarray:
    """The value written for record ``i`` of batch ``batch`` (5 = test) at row y, column x, channel c."""
    return (batch * 31 + i * 7 + c * 80 + y * 3 + x) % 256


def label(batch: int, i: int) -> int:
    return (batch + i) % 10


def batch_bytes(batch: int, n: int) -> bytes:
    """n records laid out byte by byte as the CIFAR-10 page describes: label, then R, G, B planes, row-major."""
    raw = np.zeros((n, RECORD), np.uint8)
    offset = np.arange(RECORD - 1)  # byte k of the pixels is channel k // 1024, row (k % 1024) // 32, column k % 32
    c, y, x = offset // 1024, (offset % 1024) // 32, offset % 32
    for i in range(n):
        raw[i, 0] = label(batch, i)
        raw[i, 1:] = pixel(batch, i, y, x, c)
    return raw.tobytes()


def files(n_train: int = TRAIN_PER_BATCH, n_test: int = TEST_RECORDS) -> dict[str, bytes]:
    out = {name: batch_bytes(b, n_train) for b, name in enumerate(TRAIN_FILES)}
    out[TEST_FILE] = batch_bytes(5, n_test)
    return out


def make_archive(path: Path, contents: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """A .tar.gz with the real layout; ``links`` maps a member name to (tar type, target)."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(FOLDER)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in {**contents, "batches.meta.txt": "\n".join(CIFAR10_LABELS).encode()}.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return path


def make_folder(directory: Path, contents: dict[str, bytes]) -> Path:
    folder = directory / FOLDER
    folder.mkdir(parents=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return folder


def one_line_error(path: Path, match: str) -> str:
    with pytest.raises(DataError, match=match) as info:
        read_cifar10(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_archive_shapes_dtypes_and_golden_nhwc(tmp_path):
    x_train, y_train, x_test, y_test = read_cifar10(make_archive(tmp_path / ARCHIVE, files()))
    assert x_train.shape == (5 * TRAIN_PER_BATCH, 32, 32, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (TEST_RECORDS, 32, 32, 3) and x_test.dtype == np.uint8
    assert y_train.shape == (5 * TRAIN_PER_BATCH,) and y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert x_train.flags.c_contiguous and x_test.flags.c_contiguous  # NHWC in memory too, not just in shape
    # Hand-checked: record 0 of batch 0, pixel (0, 0) is R=0, G=80, B=160 (bytes 1, 1025, 2049 of the record).
    assert x_train[0, 0, 0].tolist() == [0, 80, 160]
    # Record 3 of data_batch_2 is image 23; at row 2, column 5: (31 + 21 + 6 + 5) + 80c = 63, 143, 223.
    assert x_train[23, 2, 5].tolist() == [63, 143, 223]
    assert y_train[23] == 4 and y_test[9] == 4
    # Every pixel: image i of batch b at [y, x, c] holds what was written at byte 1 + 1024c + 32y + x.
    y, x, c = np.indices((32, 32, 3))
    for b in range(6):
        images, labels, n = (x_test, y_test, TEST_RECORDS) if b == 5 else (x_train[b * 20:], y_train[b * 20:], 20)
        for i in range(n):
            np.testing.assert_array_equal(images[i], pixel(b, i, y, x, c))
            assert labels[i] == label(b, i)


def test_archive_and_extracted_folder_agree(tmp_path):
    (tmp_path / "a").mkdir()
    archive = make_archive(tmp_path / "a" / ARCHIVE, files())
    folder = make_folder(tmp_path / "b", files())
    from_archive, from_dir_with_archive = read_cifar10(archive), read_cifar10(archive.parent)
    from_parent, from_folder = read_cifar10(folder.parent), read_cifar10(folder)
    for got in (from_dir_with_archive, from_parent, from_folder):
        for a, b in zip(from_archive, got):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_find_cifar10(tmp_path):
    empty, with_archive, with_folder = (tmp_path / n for n in ("empty", "archive", "folder"))
    empty.mkdir()
    with_archive.mkdir()
    make_archive(with_archive / ARCHIVE, files())
    make_folder(with_folder, files())
    assert find_cifar10([tmp_path / "absent", empty]) is None
    assert find_cifar10([empty, with_archive, with_folder]) == with_archive / ARCHIVE
    assert find_cifar10([with_folder, with_archive]) == with_folder / FOLDER
    assert find_cifar10([with_folder / FOLDER]) == with_folder / FOLDER
    # A folder missing a batch does not count; the archive beside it does.
    make_folder(with_archive, {k: v for k, v in files().items() if k != TEST_FILE})
    assert find_cifar10([with_archive]) == with_archive / ARCHIVE


def test_truncated_archive(tmp_path):
    archive = make_archive(tmp_path / ARCHIVE, files())
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    message = one_line_error(archive, "truncated|not a readable")
    assert "download" in message


@pytest.mark.parametrize("keep", [TRAIN_PER_BATCH * RECORD - 1, 0])
def test_truncated_bin_in_archive(tmp_path, keep):
    contents = files()
    contents["data_batch_3.bin"] = contents["data_batch_3.bin"][:keep]
    message = one_line_error(make_archive(tmp_path / ARCHIVE, contents), "data_batch_3.bin: .* bytes is not 1 to 10,000 whole 3,073-byte")
    assert ARCHIVE in message


def test_bin_not_whole_records_in_folder(tmp_path):
    contents = files()
    contents[TEST_FILE] += b"\x00" * 5
    folder = make_folder(tmp_path, contents)
    one_line_error(tmp_path, f"{TEST_FILE}: 30,735 bytes is not 1 to 10,000 whole")
    one_line_error(folder, "30,735 bytes")


def test_oversized_bin_refused_before_reading(tmp_path):
    folder = make_folder(tmp_path, files())
    with (folder / "data_batch_1.bin").open("r+b") as f:
        f.truncate(10_001 * RECORD)  # sparse: costs no disk, and must not be read
    one_line_error(tmp_path, "30,733,073 bytes is not 1 to 10,000")


def test_label_out_of_range(tmp_path):
    contents = files()
    raw = bytearray(contents["data_batch_2.bin"])
    raw[4 * RECORD] = 10
    contents["data_batch_2.bin"] = bytes(raw)
    one_line_error(make_archive(tmp_path / ARCHIVE, contents), "data_batch_2.bin: record 4 has label 10, expected 0-9")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
@pytest.mark.parametrize("target", [f"{FOLDER}/{TEST_FILE}", TEST_FILE, "/etc/passwd"])
def test_link_member_is_not_followed(tmp_path, kind, target):
    contents = files()
    del contents["data_batch_5.bin"]
    archive = make_archive(tmp_path / ARCHIVE, contents, links={"data_batch_5.bin": (kind, target)})
    message = one_line_error(archive, "data_batch_5.bin is a (symbolic|hard) link, expected a regular file")
    assert "never follows links" in message
    assert not (tmp_path / FOLDER).exists()  # nothing was extracted


def test_missing_member(tmp_path):
    contents = files()
    del contents["data_batch_4.bin"]
    one_line_error(make_archive(tmp_path / ARCHIVE, contents), f"no {FOLDER}/data_batch_4.bin in the archive")


def test_not_an_archive(tmp_path):
    (tmp_path / ARCHIVE).write_bytes(b"<html>not found</html>")
    one_line_error(tmp_path / ARCHIVE, "not a readable")


def test_nothing_there(tmp_path):
    one_line_error(tmp_path, f"holds neither {ARCHIVE}")
    one_line_error(tmp_path / "absent", "no such file or directory")
    make_folder(tmp_path, {TEST_FILE: batch_bytes(5, 2)})
    one_line_error(tmp_path, "missing data_batch_1.bin")


def test_load_dataset_cifar10_downloads_from_a_mirror_and_checks_sha256(tmp_path, monkeypatch):
    """`--data cifar10`: not found locally, fetched from the (local) mirror, sha256 checked, loaded as RGB NHWC data."""
    import dataclasses
    import hashlib

    import kdedge.data.sources as sources
    from kdedge.data import load_dataset

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = make_archive(mirror / cifar.ARCHIVE, files())
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    real = sources.BUILTIN_DATASETS["cifar10"]
    monkeypatch.setitem(sources.BUILTIN_DATASETS, "cifar10", dataclasses.replace(real, files={"archive": (cifar.ARCHIVE, sha)},
                                                                                   mirrors=(mirror.as_uri() + "/",)))
    monkeypatch.setattr(sources, "_search_dirs", lambda name: [tmp_path / "cache" / name])
    monkeypatch.setattr(sources, "cache_dir", lambda: tmp_path / "cache")
    data = load_dataset("cifar10")
    assert (tmp_path / "cache" / "cifar10" / cifar.ARCHIVE).is_file()
    assert data.spec.input_shape == (3, 32, 32) and data.spec.color == "RGB" and data.spec.labels == cifar.CIFAR10_LABELS
    assert len(data.train) == 5 * TRAIN_PER_BATCH and len(data.test) == TEST_RECORDS
    x = data.train.raw(torch.tensor([0]))[0]  # NHWC stored, read as (C, H, W)
    np.testing.assert_array_equal(x.numpy(), pixel(0, 0, np.arange(32)[:, None], np.arange(32)[None, :], np.arange(3)[:, None, None]))
    monkeypatch.setitem(sources.BUILTIN_DATASETS, "cifar10", dataclasses.replace(real, files={"archive": (cifar.ARCHIVE, "0" * 64)},
                                                                                   mirrors=(mirror.as_uri() + "/",)))
    monkeypatch.setattr(sources, "_search_dirs", lambda name: [tmp_path / "cache2" / name])
    monkeypatch.setattr(sources, "cache_dir", lambda: tmp_path / "cache2")
    with pytest.raises(DataError, match="sha256"):
        load_dataset("cifar10")
