"""Reader for the IDX file format of MNIST and Fashion-MNIST (plain or gzip-compressed).

Layout: a 4-byte magic number ``0x00 0x00 <dtype code> <number of dimensions>``, then one
big-endian uint32 per dimension, then the data in C order (big-endian for multi-byte types).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError, reason

__all__ = ["read_idx", "IDX_DTYPES"]

#: IDX type code → numpy dtype (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` is decompressed) into a numpy array.

    Args:
        path: the file.
        expect_ndim: when given, the number of dimensions the header must declare
            (3 for image files, 1 for label files).

    Raises:
        DataError (a ValueError): bad magic number, unexpected dimensionality, a size mismatch
            between the header and the payload, or a ``.gz`` file that is truncated or not gzip.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a cut-off download, or not gzip at all
        raise DataError(f"{path}: corrupt or truncated gzip file ({reason(exc)}); download it again") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({reason(exc)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x}")
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(f"{path}: expected an IDX file with {expect_ndim} dimensions, header says {ndim}")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataError(
            f"{path}: IDX payload has {len(raw) - header_end} bytes, header {shape} needs {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)
