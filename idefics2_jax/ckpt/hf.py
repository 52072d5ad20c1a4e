"""Hugging Face safetensors checkpoint directories <-> Flax param trees, both ways through the one weight table."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ..config import Idefics2Config
from .dtypes import checkpoint_dtype, resolve_dtype
from .orbax import LazyLeaf
from .safetensors import LazyTensor, SafetensorsReader, plan_shards, write_safetensors
from .shapes import param_shapes
from .table import _TO_FLAX, Entry, checkpoint_entries, flax_shape, hf_shape, to_flax, to_hf

def check_keys(config: Idefics2Config, keys, shape_of) -> dict[str, Entry]:
    """Raise a ValueError naming the first missing, unexpected or wrongly-shaped tensor."""
    entries = checkpoint_entries(config)
    expected = param_shapes(config)
    present = set(keys)
    for key in entries:
        if key not in present:
            raise ValueError(f"checkpoint is missing tensor {key!r}")
    for key in keys:
        if key not in entries:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise ValueError(f"checkpoint has unexpected tensor {key!r} (not part of Idefics2 for this config)")
        entry = entries[key]
        want = expected[entry.path]
        got = flax_shape(shape_of(key), entry.transform)
        if got != want:
            raise ValueError(f"tensor {key!r} has shape {tuple(shape_of(key))}, expected "
                             f"{hf_shape(want, entry.transform)} for this config.json")
    return entries


def load_hf_params(path: str, config: Idefics2Config, dtype=None, shardings=None):
    """Read an HF safetensors checkpoint into a Flax param tree.

    shardings: optional {param path: jax.sharding.Sharding}; each tensor is then placed directly in its sharding
    (devices read only their slices) instead of on the default device.
    """
    reader = SafetensorsReader(path)
    entries = check_keys(config, reader.keys(), reader.shape)
    dtype = resolve_dtype(dtype) or checkpoint_dtype(reader, config)
    flat = {}
    for key, entry in entries.items():
        if shardings is not None and entry.path in shardings:
            flat[entry.path] = _place_sharded(reader, entry, dtype, shardings[entry.path])
        else:
            flat[entry.path] = jnp.asarray(to_flax(reader.read(key), entry.transform), dtype=dtype)
    return unflatten_dict(flat), dtype


def _place_sharded(reader: SafetensorsReader, entry: Entry, dtype, sharding):
    shape = flax_shape(reader.shape(entry.hf_key), entry.transform)
    perm = _TO_FLAX[entry.transform]

    def read(index):
        # index is over the Flax layout; map it back to the HF layout and read only that slice.
        if perm is None:
            hf_index = index
        else:
            hf_index = tuple(index[i] for i in np.argsort(perm))
        return to_flax(reader.get_slice(entry.hf_key, hf_index), entry.transform).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, read)


# ----------------------------------------------------------------------------------------------------- save
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(size) -> int:
    """`max_shard_size` as transformers reads it: an int (bytes) or "5GB", "500MB", "2GiB"."""
    if isinstance(size, int) and size > 0:
        return size
    m = _SIZE.match(str(size))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a string such as '5GB' or '500MB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def save_hf_checkpoint(directory, config: Idefics2Config, params, *, dtype=None, max_shard_size="5GB",
                       extra_files: dict | None = None, overwrite: bool = False) -> list[str]:
    """Write `params` as an HF checkpoint directory: `model.safetensors`, or `model-0000k-of-0000n.safetensors`
    shards of at most max_shard_size with `model.safetensors.index.json`, and config.json; `extra_files` maps
    file names to JSON-able dicts (generation_config.json) or to callables writing into the directory (the
    processor). One tensor is on the host at a time. Written into a temporary sibling, then renamed: an error or an
    interrupt leaves `directory` as it was. Returns the file names written."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        if not overwrite:
            raise FileExistsError(f"{directory} exists (pass overwrite=True to replace it)")
        if not os.path.isfile(os.path.join(directory, "config.json")):
            # Never replace something that is not a checkpoint (a home directory, a folder of other files).
            raise FileExistsError(f"{directory} exists and is not a checkpoint directory (no config.json): "
                                  "not replaced")
    limit = parse_size(max_shard_size)
    dtype = resolve_dtype(dtype)
    entries = checkpoint_entries(config)
    flat = flatten_dict(params)
    missing = [e.path for e in entries.values() if e.path not in flat]
    if missing:
        raise ValueError(f"params have no {'/'.join(missing[0])!r} for this config ({len(missing)} missing)")
    expected = param_shapes(config)
    for e in entries.values():
        if tuple(flat[e.path].shape) != expected[e.path]:
            raise ValueError(f"param {'/'.join(e.path)!r} has shape {tuple(flat[e.path].shape)}, expected "
                             f"{expected[e.path]} for this config")
    # Plan the shards by size (table order, as transformers keeps the module order), then write them.
    nbytes = {key: int(np.prod(expected[e.path])) * np.dtype(dtype or flat[e.path].dtype).itemsize
              for key, e in entries.items()}
    shards = plan_shards(nbytes, limit)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.save-tmp-", dir=parent)
    try:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for name, keys in zip(names, shards):
            tensors = {}
            for key in keys:
                e = entries[key]
                value = flat[e.path]
                out_dtype = np.dtype(dtype or value.dtype)
                tensors[key] = LazyTensor(out_dtype, hf_shape(expected[e.path], e.transform),
                                          functools.partial(_hf_tensor, value, e.transform, out_dtype))
                weight_map[key] = name
            write_safetensors(os.path.join(tmp, name), tensors, {"format": "pt"})  # one tensor in memory at a time
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
            names.append("model.safetensors.index.json")
        config_dict = config.to_dict()
        config_dict["dtype"] = np.dtype(dtype or jax.tree_util.tree_leaves(params)[0].dtype).name
        _write_json(os.path.join(tmp, "config.json"), config_dict)
        names.append("config.json")
        for name, content in (extra_files or {}).items():
            if callable(content):
                content(tmp)
            else:
                _write_json(os.path.join(tmp, name), content)
        if os.path.exists(directory):
            old = directory + ".old-" + os.path.basename(tmp)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.listdir(directory))


def _hf_tensor(value, transform: str, dtype: np.dtype) -> np.ndarray:
    """One param (an array, or a `LazyLeaf` that is read now) in HF layout and `dtype`."""
    if isinstance(value, LazyLeaf):
        array = value.load(0, value.shape[value.axis]) if value.shape else value.load(0, 1)
    else:
        array = np.asarray(jax.device_get(value))
    return np.ascontiguousarray(to_hf(array if array.dtype == dtype else array.astype(dtype), transform))


def _write_json(file: str, content) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
