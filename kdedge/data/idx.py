"""Reader and writer for the IDX format (MNIST, Fashion-MNIST, KMNIST).

An IDX file is ``00 00 <dtype> <ndim>`` followed by ``ndim`` big-endian uint32 dimensions and
the array in C order, big-endian. Files may be gzip-compressed. The reader checks every byte it
is given: a wrong magic number, a truncated body or trailing garbage is a :class:`DataError`,
never a silently short array.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from kdedge.errors import DataError

__all__ = ["read_idx", "parse_idx", "write_idx"]

# IDX type code -> numpy dtype (big-endian, as stored).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
# An IDX header cannot describe more than this many elements without being corrupt for our
# purposes (it guards against allocating from a garbage header before the size check).
_MAX_ELEMENTS = 1 << 34


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped or raw.

    Args:
        path: The file to read.

    Returns:
        The array in native byte order.

    Raises:
        DataError: The file is missing, not IDX, truncated or has trailing bytes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected an IDX file (gzipped or raw)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_idx(raw, source=str(path))


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (gzipped or raw) into a native-endian array.

    Args:
        data: The file's bytes.
        source: A name for error messages.
    """
    if data[:2] == _GZIP_MAGIC:
        data = _gunzip(data, source)
    if len(data) < 4:
        raise DataError(f"{source}: file is {len(data)} bytes, too short for an IDX header")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _DTYPES or not 1 <= ndim <= 8:
        raise DataError(
            f"{source}: bad magic number 0x{data[:4].hex()}; expected 0x0000TTNN "
            "(TT an IDX type code 08/09/0b/0c/0d/0e, NN the number of dimensions 1..8) "
            "— is this an IDX file?"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{source}: truncated header: {ndim} dimensions need {header_len} bytes, file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _DTYPES[code]
    count = math.prod(dims)
    extent = math.prod(max(d, 1) for d in dims)  # an empty array with a 2**32 side is still not a shape numpy can hold
    if count > _MAX_ELEMENTS or extent > _MAX_ELEMENTS:
        raise DataError(f"{source}: header claims shape {dims}, which is implausibly large; the file is corrupt")
    expected = header_len + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{source}: {what}: header says shape {tuple(dims)} ({expected} bytes), "
            f"file has {len(data)} bytes; re-download the file"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _gunzip(data: bytes, source: str) -> bytes:
    """Decompress no more than the header declares (+1 byte to detect trailing data).

    A gzip bomb — a small file inflating to gigabytes — is refused after reading its header's
    worth of bytes rather than exhausting memory.
    """
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 else 0
            head += f.read(4 * ndim) if 1 <= ndim <= 8 else b""
            body = 0
            if len(head) == 4 + 4 * ndim and head[2] in _DTYPES and 1 <= ndim <= 8:
                count = math.prod(struct.unpack(f">{ndim}I", head[4:]))
                body = min(count, _MAX_ELEMENTS) * _DTYPES[head[2]].itemsize
            chunks, want = [head], body + 1
            while want > 0:  # in chunks: a header may claim far more than the stream holds
                chunk = f.read(min(want, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                want -= len(chunk)
            return b"".join(chunks)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: corrupt or truncated gzip stream ({exc}); re-download the file") from None


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (used by tests and to export slices)."""
    native = np.asarray(array)
    native = native.astype(native.dtype.newbyteorder("="), copy=False)
    try:
        code = _CODES[native.dtype]
    except KeyError:
        raise DataError(f"IDX cannot store dtype {native.dtype}; use one of {sorted(map(str, _CODES))}") from None
    header = bytes([0, 0, code, native.ndim]) + struct.pack(f">{native.ndim}I", *native.shape)
    body = header + np.ascontiguousarray(native, dtype=_DTYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(body, mtime=0) if compress else body)
