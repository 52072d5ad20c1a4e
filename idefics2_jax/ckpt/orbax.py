"""Converted checkpoints: a self-contained directory whose weights are an Orbax checkpoint in Flax layout.

Layout (written by `python -m convert --from hf`)::

    DST/config.json, generation_config.json, tokenizer and processor files   (copied from the source)
    DST/params/                      Orbax PyTree checkpoint (OCDBT), keyed by Flax param path, Flax layouts
    DST/idefics2_checkpoint.json     manifest: format, dtype, tensor count, source

The manifest is written last and the converter publishes the directory with one rename, so a directory that has a
manifest is complete; `is_orbax_dir` looks for it and nothing else counts as a converted checkpoint.

Writing streams: `save_params_streaming` takes `LazyLeaf`s (shape, dtype and a loader of row slabs) and an Orbax
type handler writes them strictly one after another, each as a sequence of storage chunks: load one slab of rows,
await its TensorStore write, drop it, load the next. Host memory therefore holds one chunk-sized slab (plus its
cast/transposed copy and TensorStore's encoding buffer) however large the model and its largest tensor are. On disk
the result is an ordinary Orbax PyTree checkpoint (zarr arrays in OCDBT) that `ocp.StandardCheckpointer` can read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flax.traverse_util import flatten_dict, unflatten_dict

from ..config import Idefics2Config
from ..nn.quantization import parse_scheme, quantizable, scale_shape, scale_sharding
from .dtypes import resolve_dtype
from .shapes import abstract_params

PARAMS_DIR = "params"
MANIFEST = "idefics2_checkpoint.json"
FORMAT = "idefics2-jax/orbax"
FORMAT_VERSION = 1

# Storage chunks (= write slabs) of at most this many bytes. A sharded restore reads and decompresses only the
# chunks that overlap its shard, and conversion memory is a few slabs, not a few tensors.
CHUNK_BYTES = 32 * 1024 * 1024


# Host bytes a restore may have read but not yet placed on devices.
RESTORE_IN_FLIGHT_GB = 2


# How long an interrupted save waits for the writer thread to finish its current slab.
_CANCEL_WAIT_S = 120


class SaveCancelled(Exception):
    """The `cancel` event was set while a streaming save was in progress."""


@dataclasses.dataclass(frozen=True, eq=False)
class LazyLeaf:
    """A param that is not in memory: `load(start, stop)` returns its rows [start, stop) along `axis` as a
    C-contiguous array of `dtype` (shape = `shape` with `shape[axis]` replaced by stop - start; a 0-d leaf is
    loaded once, as `load(0, 1)`, and returns the 0-d array).

    `axis` should be the one whose slabs are cheap to produce (for a transposed HF tensor: the HF leading axis, so a
    slab is one contiguous byte range of the source file). name: what progress reports call it; order: leaves are
    written in increasing order (source file order, so the source is read front to back); source_nbytes: the bytes
    progress counts (what is read), defaulting to the written size.
    """

    shape: tuple
    dtype: np.dtype
    load: Callable[[int, int], np.ndarray]
    axis: int = 0
    name: str = ""
    order: int = 0
    source_nbytes: int | None = None

    @property
    def nbytes(self) -> int:  # also what Orbax's memory accounting reads
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @classmethod
    def from_array(cls, array: np.ndarray, name: str = "") -> "LazyLeaf":
        """A leaf over an array already in memory (e.g. tests, small trees)."""
        array = np.asarray(array)

        def load(start: int, stop: int) -> np.ndarray:
            return np.ascontiguousarray(array[start:stop]) if array.ndim else array.copy()

        return cls(tuple(array.shape), array.dtype, load, 0, name)


def slab_rows(shape: tuple, axis: int, dtype, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk along `axis`: as many as fit in `chunk_bytes` (at least one)."""
    row = math.prod(shape[:axis] + shape[axis + 1:]) * np.dtype(dtype).itemsize
    return max(1, min(shape[axis], chunk_bytes // max(row, 1)))


def _streaming_handler_cls():
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamingLeafHandler(ocp.type_handlers.NumpyHandler):
        """Writes `LazyLeaf`s one slab at a time; on disk each is an ordinary array (`np.ndarray` in the metadata)."""

        def __init__(self, on_leaf=None, cancel: threading.Event | None = None, chunk_bytes: int = CHUNK_BYTES):
            super().__init__()
            self._on_leaf = on_leaf
            self._cancel = cancel or threading.Event()
            self._chunk_bytes = chunk_bytes
            self.idle = threading.Event()
            self.idle.set()

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            self.idle.clear()  # before returning, so a caller interrupted right after sees a writer at work
            return [ocp.future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args),
                                                                     name="idefics2_streaming_write")]

        async def _write_all(self, values, infos, args):
            try:
                for leaf, info, arg in sorted(zip(values, infos, args), key=lambda t: t[0].order):
                    await self._write_leaf(leaf, info, arg)
                    if self._on_leaf is not None:
                        self._on_leaf(leaf)
            finally:
                self.idle.set()

        async def _write_leaf(self, leaf: LazyLeaf, info, arg):
            await info.await_path_creation()
            shape, dtype, axis = tuple(leaf.shape), np.dtype(leaf.dtype), leaf.axis
            tspec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=shape, local_shape=shape, dtype=dtype,
                process_index=jax.process_index() if info.is_ocdbt_checkpoint else None, arg=arg)
            if not shape:
                rows, n = 1, 1
            else:
                # Our own chunk grid (Orbax picks divisors of each dim: for a 32003-row embedding that is the whole
                # tensor): slabs along `axis`, each exactly one chunk, so every write is a whole-chunk write.
                rows, n = slab_rows(shape, axis, dtype, self._chunk_bytes), shape[axis]
                if "chunks" not in tspec.get("metadata", {}):
                    raise RuntimeError(f"unexpected TensorStore spec from Orbax (no zarr 'chunks'): {tspec}")
                tspec["metadata"]["chunks"] = [max(1, d) for d in shape[:axis] + (rows,) + shape[axis + 1:]]
            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)
            for start in range(0, n, rows):
                if self._cancel.is_set():
                    raise SaveCancelled("streaming save cancelled")
                stop = min(n, start + rows)
                slab = leaf.load(start, stop)
                want = shape[:axis] + (stop - start,) + shape[axis + 1:] if shape else ()
                if slab.shape != want or slab.dtype != dtype:
                    raise AssertionError(f"{leaf.name}: loader returned {slab.shape} {slab.dtype} for rows "
                                         f"[{start}, {stop}), expected {want} {dtype}")
                target = store[(slice(None),) * axis + (slice(start, stop),)] if shape else store
                await target.write(slab)
                del slab

    return StreamingLeafHandler


def save_params_streaming(directory, leaves: Mapping[tuple, LazyLeaf], *, on_leaf=None,
                          cancel: threading.Event | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write an Orbax param checkpoint at `directory` (must not exist) from {param path tuple: LazyLeaf}.

    on_leaf(leaf) is called (from Orbax's writer thread) after each leaf is on disk. Setting `cancel` stops the
    writer before its next slab. On any exception, KeyboardInterrupt included, the writer thread is stopped and
    waited for before the exception propagates, so the caller may delete the directory's parent safely; the
    partial directory itself is left to the caller (Orbax writes into a temporary name and only renames it to
    `directory` once complete).
    """
    import orbax.checkpoint as ocp

    cancel = cancel or threading.Event()
    handler = _streaming_handler_cls()(on_leaf=on_leaf, cancel=cancel, chunk_bytes=chunk_bytes)
    registry = ocp.type_handlers.create_type_handler_registry(
        (LazyLeaf, handler), (jax.Array, ocp.type_handlers.ArrayHandler()))
    tree = unflatten_dict(dict(leaves))
    # OCDBT + zarr v2 spelled out: the handler edits the zarr v2 chunk grid of the spec Orbax builds.
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
        type_handler_registry=registry, use_ocdbt=True, use_zarr3=False))
    try:
        checkpointer.save(os.path.abspath(os.fspath(directory)), args=ocp.args.PyTreeSave(tree))
    except BaseException:
        cancel.set()
        handler.idle.wait(timeout=_CANCEL_WAIT_S)
        raise
    finally:
        checkpointer.close()


# ------------------------------------------------------------------------------------------------------ manifest
def write_manifest(directory, info: Mapping) -> None:
    data = {"format": FORMAT, "version": FORMAT_VERSION, "params": PARAMS_DIR, **info}
    path = os.path.join(directory, MANIFEST)
    with open(path + ".part", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


def read_manifest(path) -> dict:
    file = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a converted checkpoint (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{file}: format {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file}: format version {data['version']} is newer than this idefics2-jax reads "
                         f"({FORMAT_VERSION}); upgrade idefics2-jax")
    return data


def is_orbax_dir(path) -> bool:
    """True for a complete converted directory (manifest + params); False for HF directories and anything else."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, MANIFEST)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


# ------------------------------------------------------------------------------------------------------- restore
def restore_params(path, config: Idefics2Config, dtype=None, shardings: Mapping | None = None):
    """Restore the param tree of a converted directory; returns (params, dtype).

    dtype: None keeps the stored dtype; otherwise TensorStore casts while reading, so no copy in the stored dtype
    is ever materialised. shardings: optional {param path tuple: jax.sharding.Sharding}; each array is then read
    straight into its shards (each device reads only the chunks overlapping its slice). Params without an entry go
    to the default device.
    """
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    manifest = read_manifest(path)
    dtype = resolve_dtype(dtype) or jnp.dtype(manifest["dtype"])
    params_dir = os.path.abspath(os.path.join(path, manifest.get("params", PARAMS_DIR)))
    expected = flatten_dict(abstract_params(config, dtype))
    quantize = manifest.get("quantize")
    bits = None
    if quantize is not None:  # written by `convert --quantize`: kernel_q (int8 on disk) + kernel_scale leaves
        bits, group = parse_scheme(quantize)
        shardings = dict(shardings or {})
        for key in [k for k in expected if quantizable(k)]:
            want = expected.pop(key)
            base = key[:-1]
            expected[base + ("kernel_q",)] = jax.ShapeDtypeStruct(want.shape, jnp.int8)
            expected[base + ("kernel_scale",)] = jax.ShapeDtypeStruct(scale_shape(want.shape, bits, group), dtype)
            if key in shardings:
                shardings[base + ("kernel_q",)] = shardings[key]
                shardings[base + ("kernel_scale",)] = scale_sharding(shardings[key], 1 if bits == 8 else 2)
    # Bound the bytes read but not yet placed: on an accelerator host this is all the host memory a restore uses
    # (Orbax's default, 96 GB, would let every leaf be in flight at once). It must exceed the largest leaf.
    largest = max(math.prod(v.shape) * max(jnp.dtype(dtype).itemsize, 4) for v in expected.values())
    in_flight_gb = max(RESTORE_IN_FLIGHT_GB, math.ceil(2 * largest / 1e9))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=in_flight_gb))
    try:
        _check_stored_tree(params_dir, checkpointer.metadata(params_dir), expected)
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = shardings or {}
        restore_args = {
            k: ocp.ArrayRestoreArgs(sharding=shardings.get(k, default), dtype=v.dtype, global_shape=tuple(v.shape))
            for k, v in expected.items()}
        item = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=restore_args[k].sharding)
                for k, v in expected.items()}
        params = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=unflatten_dict(item), restore_args=unflatten_dict(restore_args)))
    finally:
        checkpointer.close()
    if bits == 4:  # stored in int8 containers
        flat = flatten_dict(params)
        params = unflatten_dict({k: v.astype(jnp.int4) if k[-1] == "kernel_q" else v for k, v in flat.items()})
    return params, dtype


@contextlib.contextmanager
def lazy_params(path, config: Idefics2Config, dtype=None):
    """{param path: LazyLeaf} of a converted directory, each read only when it is loaded (an Orbax partial restore
    of that one array), for writers that hold one tensor at a time (`export_hf`). A context manager: the reader
    is closed on exit."""
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    manifest = read_manifest(path)
    if manifest.get("quantize"):
        raise ValueError(f"{path} holds {manifest['quantize']} weights; HF checkpoints of Idefics2 are float: "
                         "export the float checkpoint it was converted from")
    dtype = resolve_dtype(dtype) or jnp.dtype(manifest["dtype"])
    params_dir = os.path.abspath(os.path.join(path, manifest.get("params", PARAMS_DIR)))
    expected = flatten_dict(abstract_params(config, dtype))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        _check_stored_tree(params_dir, checkpointer.metadata(params_dir), expected)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def loader(key, shape):
            def load(start, stop):
                item = unflatten_dict({key: jax.ShapeDtypeStruct(shape, dtype, sharding=device)})
                args = unflatten_dict({key: ocp.ArrayRestoreArgs(sharding=device, dtype=dtype, global_shape=shape)})
                out = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=args, partial_restore=True))
                array = np.asarray(flatten_dict(out)[key])
                return np.ascontiguousarray(array[start:stop]) if array.ndim else array
            return load

        yield {k: LazyLeaf(tuple(v.shape), np.dtype(dtype), loader(k, tuple(v.shape)), 0, "/".join(k))
               for k, v in expected.items()}
    finally:
        checkpointer.close()


def _check_stored_tree(params_dir: str, metadata, expected: Mapping[tuple, jax.ShapeDtypeStruct]) -> None:
    """Raise a ValueError naming the first param that is missing, unexpected or wrongly shaped."""

    tree = getattr(metadata, "item_metadata", metadata)  # Checkpointer.metadata -> StepMetadata -> TreeMetadata
    tree = getattr(tree, "tree", tree)
    stored = flatten_dict(tree) if isinstance(tree, Mapping) else {}
    for key, want in expected.items():
        if key not in stored:
            raise ValueError(f"{params_dir}: missing param {'/'.join(key)!r} for this config.json")
        shape = getattr(stored[key], "shape", None)
        if shape is not None and tuple(shape) != tuple(want.shape):
            raise ValueError(f"{params_dir}: param {'/'.join(key)!r} has shape {tuple(shape)}, expected "
                             f"{tuple(want.shape)} for this config.json")
    for key in stored:
        if key not in expected:
            raise ValueError(f"{params_dir}: unexpected param {'/'.join(map(str, key))!r} for this config.json")
