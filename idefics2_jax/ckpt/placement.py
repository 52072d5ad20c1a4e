"""Placing params and KV caches on a mesh by the logical-axis rules of `idefics2_jax.nn.partitioning`.

Each parameter's logical axes come from the one weight table (`ckpt/table.py`), its shape from the model's
`jax.eval_shape` (`ckpt/shapes.py`). See docs/SHARDING.md.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..nn import text
from ..nn.partitioning import _auto, cache_shardings, logical_to_spec, named_sharding
from .shapes import param_shapes
from .table import WEIGHT_TABLE, checkpoint_entries

# -------------------------------------------------------------------------------------------------- parameters
@functools.lru_cache(maxsize=1)
def _path_patterns():
    return [(re.compile("^" + re.escape(rule.path).replace(re.escape("{i}"), r"\d+") + "$"), rule.axes)
            for rule in WEIGHT_TABLE]


def param_axes(path: Sequence[str]) -> tuple | None:
    """The logical axes of the param at `path` (a tuple of names) from the weight table; None if unknown."""
    name = "/".join(map(str, path))
    for pattern, axes in _path_patterns():
        if pattern.match(name):
            return axes
    return None


def param_specs(config, mesh, rules: Mapping | None = None,
                shapes: Mapping | None = None) -> dict[tuple, PartitionSpec]:
    """{param path: PartitionSpec} for `config` on `mesh` (Mesh or AbstractMesh).

    shapes: {param path: shape} if already known (default: `ckpt.shapes.param_shapes`, from `jax.eval_shape`).
    """
    shapes = param_shapes(config) if shapes is None else shapes
    return {e.path: logical_to_spec(e.axes, mesh, rules, shapes[e.path], reassign=True)
            for e in checkpoint_entries(config).values()}


def param_shardings(config, mesh: Mesh, rules: Mapping | None = None) -> dict[tuple, NamedSharding]:
    """{param path tuple: NamedSharding} for every parameter of `config` (what `load_model(mesh=...)` uses)."""
    mesh = _auto(mesh)
    return {path: NamedSharding(mesh, spec) for path, spec in param_specs(config, mesh, rules).items()}


def shard_params(params, mesh: Mesh, rules: Mapping | None = None):
    """Place an in-memory param tree on `mesh` by the rules (params unknown to the weight table are replicated).

    For a large checkpoint use `load_model(path, mesh=mesh)` instead, which never holds the whole model anywhere.
    """
    mesh = _auto(mesh)
    out = {}
    for path, x in flatten_dict(params).items():
        axes = param_axes(path) or (None,) * np.ndim(x)
        out[path] = jax.device_put(x, named_sharding(mesh, axes, np.shape(x), rules, reassign=True))
    return unflatten_dict(out)



def init_cache(text_config, batch_size: int, max_length: int, dtype, mesh: Mesh | None = None,
               rules: Mapping | None = None):
    """`text.init_cache`, created directly in its shardings (no device ever holds the whole cache).

    mesh: default the mesh of the active `use_mesh`; with none, this is plain `text.init_cache`.
    """
    make = functools.partial(text.init_cache, text_config, batch_size, max_length, dtype)
    if mesh is None:
        mesh = jax.sharding.get_mesh()
        if mesh.empty:
            return make()
    return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh, rules))()

