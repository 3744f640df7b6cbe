"""Hostile input: arbitrary bytes and structures into the IDX and NPZ readers and the YAML config
loader. Only kdedge's own errors may come out — never another exception, a crash or a hang."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdedge.config import CompressConfig, DistillConfig, load_config
from kdedge.data import load_dataset, parse_idx, write_idx
from kdedge.data.sources import load_npz
from kdedge.errors import ConfigError, DataError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- IDX ------------------------------------------------------------------------------------------

IDX_CODES = [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]


@st.composite
def idx_like(draw) -> bytes:
    """Bytes that often get past the magic number: a plausible header, then anything."""
    code = draw(st.sampled_from(IDX_CODES + [0x00, 0x0A, 0xFF]))
    ndim = draw(st.integers(0, 9))
    dims = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 40), min_size=ndim, max_size=ndim))
    body = draw(st.binary(max_size=2048))
    raw = bytes([0, 0, code, ndim]) + struct.pack(f">{ndim}I", *dims) + body
    if draw(st.booleans()):
        raw = gzip.compress(raw, mtime=0)
        if draw(st.booleans()):  # a truncated or bit-flipped stream
            cut = draw(st.integers(0, len(raw)))
            raw = raw[:cut] + bytes(draw(st.binary(max_size=8)))
    return raw


@FUZZ
@given(st.binary(max_size=4096) | idx_like())
def test_parse_idx_raises_only_data_error(data):
    try:
        array = parse_idx(data)
    except DataError:
        return
    assert isinstance(array, np.ndarray)


def test_empty_shape_with_huge_sides_is_refused():
    # Found by hypothesis in CI: 0 elements, but sides numpy cannot represent.
    data = bytes.fromhex("00000806000000000000000000000000000000063506000067000000")
    with pytest.raises(DataError, match="implausibly large"):
        parse_idx(data)


def test_gzip_bomb_is_not_inflated_past_the_header_size():
    # 64 MiB of zeros compress to ~64 KiB; the header claims 4 bytes of body.
    bomb = gzip.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 4) + bytes(64 << 20), mtime=0)
    with pytest.raises(DataError, match="trailing bytes"):
        parse_idx(bomb)


@st.composite
def idx_arrays(draw):
    images = draw(hnp.arrays(st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
                             hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))
    labels = draw(hnp.arrays(st.sampled_from([np.uint8, np.int8, np.int32, np.float32]), hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=8)))
    return images, labels


@FUZZ
@given(idx_arrays(), idx_arrays())
def test_idx_directory_loads_or_raises_data_error(tmp_path_factory, train, test):
    root = tmp_path_factory.mktemp("idx")
    for (images, labels), (img_name, lbl_name) in ((train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                                    (test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        write_idx(root / img_name, images)
        write_idx(root / lbl_name, labels)
    try:
        splits = load_dataset(str(root))
    except DataError:
        return
    # What loads is usable: finite normalized inputs of the declared shape, labels within the classes.
    x = splits.train.inputs()
    assert tuple(x.shape[1:]) == splits.spec.input_shape
    assert bool(np.isfinite(x.numpy()).all())
    assert int(splits.train.labels.max()) < splits.spec.num_classes


# -- NPZ ------------------------------------------------------------------------------------------

def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


ANY_DTYPE = st.sampled_from([np.uint8, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64, "U3", "S2", "M8[s]"])


@st.composite
def npz_archives(draw) -> bytes:
    keys = draw(st.lists(st.sampled_from(["x", "y", "x_train", "y_train", "x_test", "y_test", "labels", "other"]), unique=True, max_size=6))
    arrays = {k: draw(hnp.arrays(ANY_DTYPE, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))) for k in keys}
    raw = _npz_bytes(arrays)
    if draw(st.booleans()):  # damage: truncate or overwrite a slice
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(max_size=64)) + raw[i + draw(st.integers(0, 64)):]
    return raw


@FUZZ
@given(st.binary(max_size=2048) | npz_archives())
def test_load_npz_raises_only_data_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("npz") / "data.npz"
    path.write_bytes(raw)
    try:
        splits = load_npz(path)
    except DataError:
        return
    assert bool(np.isfinite(splits.train.inputs().numpy()).all())


def test_npz_with_a_pickled_object_array_is_refused_not_loaded(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(path)


def test_npz_zip_bomb_member_is_refused(tmp_path):
    # A zip whose member is not an .npy at all (the reader must not trust member names).
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\x93NUMPY" + bytes(100))
        z.writestr("y.npy", b"not numpy")
    with pytest.raises(DataError):
        load_npz(path)


# -- YAML config ----------------------------------------------------------------------------------

yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
field_names = st.sampled_from(sorted(CompressConfig.__dataclass_fields__) + ["unknown_key", "epochs-", ""])


@FUZZ
@given(st.text(max_size=400))
def test_config_from_arbitrary_text_raises_only_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        load_config(DistillConfig, path)
    except ConfigError:
        pass


@FUZZ
@given(st.dictionaries(field_names, yaml_values, max_size=6))
def test_config_from_arbitrary_mappings_raises_only_config_error(tmp_path_factory, mapping):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(mapping))
    try:
        load_config(CompressConfig, path)
    except ConfigError:
        pass


def test_config_from_binary_garbage_is_one_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError):
        load_config(DistillConfig, path)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    # "Billion laughs": 9 levels of 9 aliases; expanding it (e.g. to print it) would take forever.
    levels = ['&a0 ["lol"]'] + [f"&a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text(f"data: [{', '.join(levels)}]\n")  # one known key, so the value itself is judged
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError):
        load_config(DistillConfig, path)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system ['true']", "epochs: !!python/name:os.system"])
def test_yaml_python_tags_are_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DistillConfig, path)


def test_idx_with_nonfinite_floats_is_refused(tmp_path):
    from conftest import make_idx_dir

    root = make_idx_dir(tmp_path / "d", compress=False)
    images = np.zeros((60, 8, 8), np.float32)
    images[3, 2, 2] = np.nan
    write_idx(root / "train-images-idx3-ubyte", images)
    with pytest.raises(DataError, match="not finite"):
        load_dataset(str(root))
