"""Hugging Face safetensors directory -> self-contained converted directory (Orbax params + configs + tokenizer).

Three phases, so that a bad input costs nothing and an interrupted run leaves nothing:

1. plan (`plan_conversion`): parse config.json, every safetensors header and the index, and check every key and
   shape against the weight table. User errors surface here as `ConversionError`, before anything is written.
2. write: into a temporary sibling of DST (`.NAME.convert-tmp-PID-XXXX`), params streamed tensor by tensor through
   `idefics2_jax.ckpt.orbax.save_params_streaming`, then the side files, then the manifest.
3. publish: one rename of the temporary directory to DST. Any exception or signal before that removes the
   temporary directory; a run killed outright (SIGKILL) leaves one that the next conversion to the same DST removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from typing import Callable

import numpy as np

from .dtypes import checkpoint_dtype, resolve_dtype
from .hf import check_keys
from .orbax import CHUNK_BYTES, PARAMS_DIR, LazyLeaf, save_params_streaming, write_manifest
from .safetensors import SafetensorsReader
from .table import flax_shape, hf_leading_axis, to_flax
from ..config import Idefics2Config
from ..nn.quantization import check_group, parse_scheme, quantizable, quantize_kernel, scale_shape

# Everything besides the weights that `load_model` and `Idefics2Processor.from_pretrained` read.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class ConversionError(Exception):
    """A problem with the user's input or destination; the message is one line naming the file or key."""


@dataclasses.dataclass
class Plan:
    src: str
    config: Idefics2Config
    reader: SafetensorsReader
    dtype: np.dtype  # what the params are written as
    source_dtype: np.dtype
    leaves: dict  # {param path tuple: LazyLeaf}
    quantize: str | None = None  # the weight-only scheme the decoder and connector kernels are written in

    @property
    def source_bytes(self) -> int:
        return sum(leaf.source_nbytes for leaf in self.leaves.values())

    @property
    def target_bytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves.values())


@dataclasses.dataclass(frozen=True)
class Summary:
    src: str
    dst: str
    tensors: int
    source_bytes: int
    source_dtype: str
    params_bytes: int  # in the written dtype, before compression
    disk_bytes: int  # the params directory on disk
    dtype: str
    seconds: float
    has_tokenizer: bool = True

    def line(self) -> str:
        note = "" if self.has_tokenizer else " (SRC has no tokenizer.model / tokenizer.json: DST has none either)"
        return (f"converted {self.tensors} tensors, {_gb(self.source_bytes)} {self.source_dtype} -> "
                f"{_gb(self.params_bytes)} {self.dtype} ({_gb(self.disk_bytes)} on disk), {self.src} -> {self.dst} "
                f"in {self.seconds:.1f} s{note}")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# -------------------------------------------------------------------------------------------------------- plan
def plan_conversion(src: str, dtype=None, quantize: str | None = None) -> Plan:
    """Validate SRC completely and describe each param as a LazyLeaf; raise ConversionError on bad input.

    quantize: "int8" / "int4" / "int4:G": the decoder and connector kernels become `kernel_q` + `kernel_scale`
    leaves (`nn.quantization`), each slab of output channels quantized as it is read (int4 values are stored in
    int8 containers: zarr v2 has no 4-bit type; `load_model` casts them back)."""
    src = os.path.abspath(os.fspath(src))
    try:
        bits, group = parse_scheme(quantize) if quantize is not None else (None, None)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: not a directory")
    try:
        config = Idefics2Config.from_pretrained(src)
        reader = SafetensorsReader(src)
        entries = check_keys(config, reader.keys(), reader.shape)
        source_dtype = np.dtype(checkpoint_dtype(reader, config))
        target = np.dtype(resolve_dtype(dtype) or source_dtype)
    except (FileNotFoundError, ValueError) as e:  # SafetensorsFormatError is a ValueError
        raise ConversionError(_one_line(e)) from None
    except OSError as e:
        raise ConversionError(_one_line(f"{e.filename or src}: {e.strerror or e}")) from None
    leaves = {}
    for key, entry in entries.items():
        info = reader.tensors[key]
        if info.dtype not in _FLOAT_DTYPES:
            raise ConversionError(f"{info.file}: tensor {key!r} has dtype {info.dtype}, expected a float type")
        shape, axis = flax_shape(info.shape, entry.transform), hf_leading_axis(entry.transform)
        order = reader.files.index(info.file) * (1 << 48) + info.begin
        if bits is not None and quantizable(entry.path):
            try:
                check_group(shape, group, "/".join(entry.path))
            except ValueError as e:
                raise ConversionError(str(e)) from None
            leaves.update(_quantized_leaves(reader, key, entry, shape, axis, order, info.nbytes, bits, group, target))
            continue
        leaves[entry.path] = LazyLeaf(shape=shape, dtype=target, load=_loader(reader, key, entry.transform, target),
                                      axis=axis, name=key, order=order, source_nbytes=info.nbytes)
    return Plan(src, config, reader, target, source_dtype, leaves, quantize)


def _quantized_leaves(reader, key, entry, shape, axis, order, nbytes, bits, group, scale_dtype) -> dict:
    """kernel_q ([in, out] int8) and kernel_scale leaves of one Linear kernel, both sliced along the output
    channels (the HF rows: contiguous in the file); a slab of channels is quantized on its own."""
    if axis != 1:
        raise ConversionError(f"{key}: a quantized kernel must be an [out, in] Linear weight")
    load_float = _loader(reader, key, entry.transform, np.dtype(np.float32))

    def part(name, dtype):
        def load(start: int, stop: int) -> np.ndarray:
            q = quantize_kernel(load_float(start, stop), bits, group, scale_dtype, key)[name]
            return np.ascontiguousarray(np.asarray(q).astype(dtype))
        return load

    base = entry.path[:-1]
    scale = scale_shape(shape, bits, group)
    return {
        base + ("kernel_q",): LazyLeaf(shape=shape, dtype=np.dtype(np.int8), load=part("kernel_q", np.int8), axis=1,
                                       name=key, order=order, source_nbytes=nbytes),
        base + ("kernel_scale",): LazyLeaf(shape=scale, dtype=scale_dtype, load=part("kernel_scale", scale_dtype),
                                           axis=len(scale) - 1, name=f"{key} (scales)", order=order,
                                           source_nbytes=0),
    }


def _loader(reader: SafetensorsReader, key: str, transform: str, dtype: np.dtype) -> Callable[[int, int], np.ndarray]:
    def load(start: int, stop: int) -> np.ndarray:
        rows = reader.read(key, start, stop)  # HF rows = one contiguous byte range of the shard
        view = to_flax(rows, transform)
        if view is rows and rows.dtype == dtype:
            return rows
        # One pass that transposes and casts into the final buffer: the slab and its result, nothing else.
        out = np.empty(view.shape, dtype)
        out[...] = view
        return out

    return load


def _one_line(e) -> str:
    return " ".join(str(e).split())


# ------------------------------------------------------------------------------------------------------- write
def convert_hf_to_orbax(src, dst, *, dtype=None, overwrite: bool = False, on_leaf=None,
                        cancel: threading.Event | None = None, plan: Plan | None = None,
                        chunk_bytes: int = CHUNK_BYTES, quantize: str | None = None) -> Summary:
    """Convert HF checkpoint directory `src` into a converted directory `dst` (see the module docstring).

    dtype: "float32" / "bfloat16" / "float16" (None keeps the source's). on_leaf(leaf) reports progress from
    the writer thread; setting `cancel` aborts. chunk_bytes: storage chunk (and write slab) size. Raises
    ConversionError for bad input or destination; on any exception (and on KeyboardInterrupt) nothing is left at
    `dst` nor beside it.
    """
    start = time.monotonic()
    dst = os.path.abspath(os.fspath(dst))
    plan = plan or plan_conversion(src, dtype, quantize)
    _check_destination(plan.src, dst, overwrite)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, name)
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.convert-tmp-{os.getpid()}-", dir=parent)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become DST's mode
        save_params_streaming(os.path.join(tmp, PARAMS_DIR), plan.leaves, on_leaf=_trimming(on_leaf),
                              cancel=cancel, chunk_bytes=chunk_bytes)
        _copy_side_files(plan.src, tmp, plan.dtype)
        disk_bytes = _du(os.path.join(tmp, PARAMS_DIR))
        write_manifest(tmp, {
            "dtype": plan.dtype.name,
            "num_tensors": len(plan.leaves),
            "num_params": int(sum(int(np.prod(leaf.shape)) for leaf in plan.leaves.values())),
            **({"quantize": plan.quantize} if plan.quantize else {}),
            "source": {"format": "hf-safetensors", "path": plan.src, "dtype": plan.source_dtype.name,
                       "files": [os.path.basename(f) for f in plan.reader.files]},
        })
        _publish(tmp, dst, overwrite)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Summary(plan.src, dst, len(plan.leaves), plan.source_bytes, plan.source_dtype.name, plan.target_bytes,
                   disk_bytes, plan.dtype.name, time.monotonic() - start,
                   has_tokenizer=any(os.path.isfile(os.path.join(plan.src, f)) for f in TOKENIZER_FILES))


def _trimming(on_leaf):
    """Wrap the progress callback to hand freed memory back to the OS after each tensor.

    glibc keeps what TensorStore's worker threads free in per-thread arenas (and raises its mmap threshold to the
    32 MiB slabs after the first one is freed), so without this the resident set creeps up by a fraction of every
    tensor written: ~250 MiB over a 1000-tensor checkpoint. malloc_trim(0) releases those pages; elsewhere it is
    a no-op.
    """
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return on_leaf

    def callback(leaf):
        trim(0)
        if on_leaf is not None:
            on_leaf(leaf)

    return callback


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst or real_src.startswith(real_dst + os.sep) or real_dst.startswith(real_src + os.sep):
        raise ConversionError(f"{dst}: the destination must be outside the source directory {src} and not contain it")
    if os.path.lexists(dst) and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")


def _tmp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.convert-(?:tmp|old)-(\d+)-")


def _remove_stale(parent: str, name: str) -> None:
    """Remove temporary siblings of `name` left by conversions that were killed (their process is gone)."""
    pattern = _tmp_pattern(name)
    for entry in os.listdir(parent):
        m = pattern.match(entry)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid on a leftover means an earlier process with a recycled pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT / SIGTERM until the block is done (main thread only): the renames that publish DST are not
    interrupted half-way, e.g. with the old DST moved aside and the new one not yet in place."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _publish(tmp: str, dst: str, overwrite: bool) -> None:
    with _signals_deferred():
        old = _rename_into_place(tmp, dst, overwrite)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # if interrupted, the next conversion to DST removes the rest


def _rename_into_place(tmp: str, dst: str, overwrite: bool) -> str | None:
    """Rename tmp to dst; an existing dst (with overwrite) is first moved into a directory that is returned."""
    if not os.path.lexists(dst):
        try:
            os.rename(tmp, dst)  # fails if a non-empty directory appeared at dst meanwhile: never merge into it
            return None
        except OSError:
            if not os.path.lexists(dst):
                raise
    if not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")
    parent, name = os.path.split(dst)
    old = tempfile.mkdtemp(prefix=f".{name}.convert-old-{os.getpid()}-", dir=parent)
    os.rename(dst, os.path.join(old, name))
    os.rename(tmp, dst)
    return old


def _copy_side_files(src: str, dst: str, dtype: np.dtype) -> None:
    for name in SIDE_FILES:
        file = os.path.join(src, name)
        if not os.path.isfile(file):
            continue
        if name == "config.json":
            # The stored dtype changes with --dtype; everything else is kept as the source wrote it.
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
            config["dtype"] = dtype.name
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype.name
            with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        else:
            shutil.copyfile(file, os.path.join(dst, name))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total
