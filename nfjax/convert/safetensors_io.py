"""Reads and writes the safetensors format with NumPy alone (no torch, no extra package).

The format: an 8-byte little-endian header length n, n bytes of JSON ``{name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}``, then the raw little-endian tensor bytes, each tensor at [begin, end) of that
buffer. Every way a file can be damaged (short, bad JSON, offsets outside the buffer, sizes that disagree with
the shape) is a ConversionError that names the file and the problem.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import numpy as np

from nfjax.convert.errors import ConversionError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str) -> tuple[dict, int]:
    """(header JSON, byte offset of the data buffer); ConversionError when the file is not safetensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path} is not a safetensors file: it is {size} bytes long")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ConversionError(
                f"{path} is not a complete safetensors file: its header claims {n} bytes but the file has "
                f"{size}; the file is probably truncated (download it again)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is not a safetensors file: its header is not a JSON object")
    return header, 8 + n


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays (bfloat16 is widened to float32)."""
    header, start = read_header(path)
    header.pop("__metadata__", None)
    buffer_size = os.path.getsize(path) - start
    out = {}
    with open(path, "rb") as f:
        for name, entry in header.items():
            try:
                code, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: the header entry of {name!r} is malformed: {entry!r}") from None
            dtype = np.dtype(np.uint16) if code == "BF16" else DTYPES.get(code)
            if dtype is None:
                raise ConversionError(f"{path}: tensor {name!r} has dtype {code}, which nfjax cannot read")
            dtype = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            if not 0 <= begin <= end <= buffer_size:
                raise ConversionError(
                    f"{path}: tensor {name!r} lies at bytes {begin}-{end} but the data is {buffer_size} bytes "
                    "long; the file is probably truncated (download it again)"
                )
            if end - begin != count * dtype.itemsize:
                raise ConversionError(
                    f"{path}: tensor {name!r} has {end - begin} bytes, not the {count * dtype.itemsize} its "
                    f"shape {shape} and dtype {code} need"
                )
            f.seek(start + begin)
            array = np.frombuffer(f.read(end - begin), dtype.newbyteorder("<")).reshape(shape)
            out[name] = _bfloat16_to_float32(array) if code == "BF16" else array.astype(dtype)
    return out


def read_metadata(path: str) -> dict[str, str]:
    """The file's ``__metadata__`` strings ({} when it has none)."""
    return dict(read_header(path)[0].get("__metadata__") or {})


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes ``tensors`` (name -> array) in safetensors layout, names sorted, atomically (temp file + rename)."""
    header: dict = {}
    offset, arrays = 0, []
    for name in sorted(tensors):
        array = np.asarray(tensors[name])  # tobytes() below writes C order; 0-d arrays stay 0-d
        if array.dtype not in _CODES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store here")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = dict(
            dtype=_CODES[array.dtype], shape=list(array.shape), data_offsets=[offset, offset + array.nbytes]
        )
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data buffer starts 8-byte aligned
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)
