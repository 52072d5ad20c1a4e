"""The one safetensors reader: validates every file up front, then reads one tensor (or slab) at a time with `pread`.

Loading, conversion and the tests all read through it. Why not the memory-mapped `safetensors.safe_open`? Pages of a
mapping that have been touched stay in the process's resident set until the file is closed, so streaming through a
33.6 GB checkpoint that way still ends with tens of GB of RSS, which is what gets a Colab or TPU-VM process killed.
Reading with `os.preadinto`-style calls into a fresh buffer keeps the resident set at one tensor; the page cache
holds the file, not the process, and is told to drop what has been read.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data; offsets are
relative to the end of the header.
"""

from __future__ import annotations

import dataclasses
from typing import Callable
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class SafetensorsFormatError(ValueError):
    """A safetensors file or index that is missing, truncated, corrupt or inconsistent (a user error)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # safetensors name: "F32", "BF16", ...
    shape: tuple
    begin: int  # absolute byte offset in `file`
    nbytes: int


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: `model.safetensors`, or the shards named by the index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SafetensorsFormatError(f"{index}: not a valid safetensors index ({e})") from None
        files = []
        for name in dict.fromkeys(weight_map.values()):
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise SafetensorsFormatError(f"{file}: shard named in model.safetensors.index.json is missing")
            files.append(file)
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_header(file: str) -> dict[str, TensorInfo]:
    """Parse and validate one file's header against its size; raise SafetensorsFormatError naming the file."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsFormatError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsFormatError(
                    f"{file}: not a readable safetensors file (corrupt or truncated: header length {n}, "
                    f"file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsFormatError(f"{file}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SafetensorsFormatError(f"{file}: corrupt safetensors header ({e})") from None
    data_start, data_len = 8 + n, size - 8 - n
    out, end_max = {}, 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{file}: corrupt safetensors header entry for {key!r}") from None
        if dtype not in _DTYPES:
            raise SafetensorsFormatError(f"{file}: tensor {key!r} has unsupported dtype {dtype!r}")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if not (0 <= begin <= end) or end - begin != nbytes:
            raise SafetensorsFormatError(f"{file}: corrupt safetensors header (offsets of {key!r} do not match "
                                         f"its shape {shape} and dtype {dtype})")
        if end > data_len:
            raise SafetensorsFormatError(f"{file}: truncated: tensor {key!r} ends at byte {data_start + end}, "
                                         f"the file has {size} bytes")
        end_max = max(end_max, end)
        out[key] = TensorInfo(file, dtype, shape, data_start + begin, nbytes)
    if end_max != data_len:
        raise SafetensorsFormatError(f"{file}: corrupt safetensors file ({data_len - end_max} bytes after the "
                                     "last tensor)")
    return out


class SafetensorsReader:
    """All tensors of an HF checkpoint directory (single file or index + shards), read one at a time.

    `keys`, `shape` and `dtype` answer from the validated headers; `read` (and `get_slice`) return a fresh,
    writable array owned by the caller. A directory without weights raises FileNotFoundError; a corrupt or missing
    file, a SafetensorsFormatError (a ValueError) naming it.
    """

    def __init__(self, path: str):
        self.files = safetensors_files(path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for key, info in read_header(file).items():
                if key in self.tensors:
                    raise SafetensorsFormatError(f"{file}: tensor {key!r} is also in {self.tensors[key].file}")
                self.tensors[key] = info
        self._check_index(path)

    def _check_index(self, path: str) -> None:
        index = os.path.join(path, "model.safetensors.index.json")
        if not os.path.exists(index):
            return
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]  # already validated by safetensors_files
        for key, name in weight_map.items():
            info = self.tensors.get(key)
            if info is None or os.path.basename(info.file) != os.path.basename(name):
                raise SafetensorsFormatError(f"{os.path.join(path, name)}: does not hold tensor {key!r} that "
                                             "model.safetensors.index.json places there")
        for key, info in self.tensors.items():
            if key not in weight_map:
                raise SafetensorsFormatError(f"{info.file}: tensor {key!r} is not listed in "
                                             "model.safetensors.index.json")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple:
        return self.tensors[key].shape

    def dtype(self, key: str) -> str:
        return self.tensors[key].dtype

    def nbytes(self, key: str) -> int:
        return self.tensors[key].nbytes

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """The tensor, or its rows [start, stop) along axis 0: one contiguous byte range of the file."""
        info = self.tensors[key]
        dtype = _DTYPES[info.dtype]
        shape, offset, nbytes = info.shape, info.begin, info.nbytes
        if shape and (start is not None or stop is not None):
            start, stop = start or 0, shape[0] if stop is None else stop
            row = math.prod(shape[1:]) * dtype.itemsize
            shape, offset, nbytes = (stop - start,) + shape[1:], info.begin + start * row, (stop - start) * row
        out = np.empty(shape, dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n == 0:
                    raise SafetensorsFormatError(f"{info.file}: truncated while reading tensor {key!r}")
                done += n
            # The bytes are ours now; let the kernel drop them from the page cache rather than evict other work.
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return out

    def get_slice(self, key: str, index: tuple) -> np.ndarray:
        """`tensor[index]` for a tuple of slices, reading only the rows that `index[0]` selects."""
        rows = index[0] if index else slice(None)
        start, stop, step = rows.indices(self.tensors[key].shape[0]) if self.tensors[key].shape else (0, 0, 1)
        if step != 1:
            raise ValueError(f"tensor {key!r}: only contiguous row slices can be read")
        return self.read(key, start, stop)[(slice(None),) + tuple(index[1:])]


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor to write that is produced only when its bytes are due: `load()` returns it (`dtype`, `shape`)."""

    dtype: np.dtype
    shape: tuple
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def write_safetensors(file: str, tensors: dict, metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (in the given key order; arrays or `LazyTensor`s) as one safetensors file, a tensor at a
    time (a LazyTensor is loaded when its bytes are written, then dropped); returns the file's size.

    The layout the safetensors library writes: the header JSON padded with spaces to a multiple of 8 bytes, then
    the data in header order.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, array in tensors.items():
        dtype = np.dtype(array.dtype)
        if dtype not in _NAMES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} cannot be written to safetensors")
        header[key] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, value in tensors.items():
            array = value.load() if isinstance(value, LazyTensor) else value
            if tuple(array.shape) != tuple(header[key]["shape"]) or np.dtype(array.dtype) != np.dtype(value.dtype):
                raise AssertionError(f"{key}: produced {array.dtype} {array.shape}, announced {value.dtype} "
                                     f"{tuple(header[key]['shape'])}")
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            del array
    return 8 + len(raw) + offset


def plan_shards(nbytes: dict[str, int], limit: int) -> list[list[str]]:
    """Split tensors (in order) into shards of at most `limit` bytes, as transformers' `max_shard_size` does (a
    tensor larger than the limit gets a shard of its own)."""
    shards, current, size = [], [], 0
    for key, n in nbytes.items():
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    return shards + [current] if current else shards
