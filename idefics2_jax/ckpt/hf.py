"""Loading a Hugging Face safetensors checkpoint directory into a Flax param tree, checked against the weight table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from ..config import Idefics2Config
from .dtypes import checkpoint_dtype, resolve_dtype
from .safetensors import SafetensorsReader
from .shapes import param_shapes
from .table import _TO_FLAX, Entry, checkpoint_entries, flax_shape, hf_shape, to_flax

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
            flat[entry.path] = jnp.asarray(to_flax(reader.get(key), entry.transform), dtype=dtype)
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
