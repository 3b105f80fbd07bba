"""Compact, pickle-free byte format for a record of named numpy arrays.

The durable feature store and the Redis cache hold the SAME bytes, so a cache miss is filled
without re-encoding and a value read from either can be decoded by the other side.

Layout (all integers little-endian):

    b"CSA1"                      magic + format version (4 bytes)
    u8   array count N
    N x  array:
        u8   name length n, then n bytes of UTF-8 name
        u8   dtype code: 0 float16, 1 float32, 2 float64, 3 int32, 4 int64, 5 uint8
        u8   ndim k, then k x u32 dimensions
        raw  C-order little-endian data (prod(shape) * itemsize bytes)

A 49x1280 float16 region record plus its float32 boxes is 125,440 + 784 bytes of data and
~40 bytes of header. Decoding is zero-copy: the arrays are read-only views into the bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import numpy as np

from index.errors import InvalidRecordError

MAGIC = b"CSA1"
MAX_NAME_BYTES = 255
MAX_ARRAYS = 255

_DTYPE_BY_CODE: dict[int, np.dtype] = {
    0: np.dtype("<f2"),
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("u1"),
}


def _code_of(dtype: np.dtype) -> int | None:
    """The format's code for `dtype`, whatever its byte order; None when unsupported."""
    for code, candidate in _DTYPE_BY_CODE.items():
        if dtype.kind == candidate.kind and dtype.itemsize == candidate.itemsize:
            return code
    return None


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode named arrays (dtypes: float16/32/64, int32/64, uint8) into one bytes value."""
    if len(arrays) > MAX_ARRAYS:
        raise InvalidRecordError(f"a record holds at most {MAX_ARRAYS} arrays, got {len(arrays)}")
    parts = [MAGIC, struct.pack("<B", len(arrays))]
    for name, value in arrays.items():
        array = np.asarray(value)
        code = _code_of(array.dtype)
        if code is None:
            raise InvalidRecordError(
                f"array {name!r} has dtype {array.dtype}; supported: "
                + ", ".join(str(d) for d in _DTYPE_BY_CODE.values())
            )
        name_bytes = name.encode("utf-8")
        if not 0 < len(name_bytes) <= MAX_NAME_BYTES:
            raise InvalidRecordError(f"array name must be 1..{MAX_NAME_BYTES} bytes, got {name!r}")
        data = np.ascontiguousarray(array, dtype=_DTYPE_BY_CODE[code])
        parts.append(struct.pack("<B", len(name_bytes)))
        parts.append(name_bytes)
        parts.append(struct.pack(f"<BB{data.ndim}I", code, data.ndim, *data.shape))
        parts.append(data.tobytes())
    return b"".join(parts)


def decode_arrays(buffer: bytes | memoryview) -> dict[str, np.ndarray]:
    """Decode bytes written by `encode_arrays`; arrays are read-only views into `buffer`."""
    view = memoryview(buffer)
    if bytes(view[:4]) != MAGIC:
        raise InvalidRecordError("not a camp-search array record (bad magic)")
    try:
        (count,) = struct.unpack_from("<B", view, 4)
        offset = 5
        arrays: dict[str, np.ndarray] = {}
        for _ in range(count):
            (name_length,) = struct.unpack_from("<B", view, offset)
            offset += 1
            name = bytes(view[offset : offset + name_length]).decode("utf-8")
            offset += name_length
            code, ndim = struct.unpack_from("<BB", view, offset)
            offset += 2
            shape = struct.unpack_from(f"<{ndim}I", view, offset)
            offset += 4 * ndim
            dtype = _DTYPE_BY_CODE[code]
            size = math.prod(shape) * dtype.itemsize  # Python ints: no overflow, no numpy call
            if offset + size > len(view):
                raise InvalidRecordError(f"record truncated inside array {name!r}")
            array = np.frombuffer(view, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            arrays[name] = array.reshape(shape)
            offset += size
    except (struct.error, KeyError, UnicodeDecodeError) as error:
        raise InvalidRecordError(f"malformed array record: {error}") from error
    if offset != len(view):
        raise InvalidRecordError(f"{len(view) - offset} trailing bytes after the last array")
    return arrays
