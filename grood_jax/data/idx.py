"""Reader for the IDX format of (Fashion-)MNIST: a magic number, big-endian dimensions, raw data.

Header: two zero bytes, one type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), one byte with the number of dimensions, then one big-endian uint32
per dimension. Files may be gzip-compressed (detected from their first bytes, not the name).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from grood_jax.data.base import DataError

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_WRITE_CODES = {np.dtype(t): code for code, t in (
    (0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32),
    (0x0E, np.float64))}


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"cannot read IDX file {path}: {e.strerror}") from e
  if raw[:2] != _GZIP_MAGIC:
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: corrupt or truncated gzip data ({e}); delete it and fetch it "
                    "again") from e


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
  """Decode IDX bytes (already decompressed) into a native-endian numpy array."""
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DataError(f"{source}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
                    "expected 0x0000TTNN")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise DataError(f"{source}: unknown IDX data type 0x{type_code:02x}")
  if ndim == 0:
    raise DataError(f"{source}: IDX header declares 0 dimensions")
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise DataError(f"{source}: truncated IDX header ({len(data)} bytes, need {header_len})")
  dims = struct.unpack(f">{ndim}I", data[4:header_len])
  dtype = _IDX_DTYPES[type_code]
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  got = len(data) - header_len
  if got != expected:
    kind = "truncated" if got < expected else "has trailing bytes"
    raise DataError(f"{source}: IDX file {kind}: {got} data bytes for dims {dims} "
                    f"(expected {expected}); delete it and fetch it again")
  array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
  return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Read an IDX file (plain or gzip) -> numpy array; DataError naming the file if it is bad."""
  path = os.fspath(path)
  return parse_idx(_read_bytes(path), path)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
  """Write `array` as IDX (gzip if `compress`, default: when the name ends in .gz)."""
  path = os.fspath(path)
  array = np.asarray(array)
  code = _WRITE_CODES.get(array.dtype.newbyteorder("="))
  if code is None:
    raise DataError(f"cannot write dtype {array.dtype} as IDX; use uint8/int8/int16/int32/"
                    "float32/float64")
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  payload = header + array.astype(_IDX_DTYPES[code], copy=False).tobytes()
  if compress is None:
    compress = path.endswith(".gz")
  with open(path, "wb") as f:
    f.write(gzip.compress(payload, mtime=0) if compress else payload)
