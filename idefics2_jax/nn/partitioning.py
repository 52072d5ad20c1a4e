"""Logical-axis partitioning (imports only jax): one rules table maps logical axis names to mesh axes (MaxText's
`logical_axis_rules`).

Every parameter (see the weight table in `ckpt/table.py`), activation and KV-cache tensor is described by *logical* axis
names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `batch`, `length`, ...). A rules table maps each name to mesh
axes of a `jax.sharding.Mesh` with axes named

  "data"   batch (data parallelism: replicas of the model, each with its own sequences),
  "fsdp"   parameters sharded along their embed dimension and gathered where used (and the batch split too),
  "model"  tensor parallelism over attention heads, KV heads, MLP hidden units and the vocabulary.

A mesh may use any subset of these names (a missing axis is ignored). A different parallelism strategy is a
different table, never different model code. `jax.jit` (which absorbed `pjit`) does the rest: parameters carry
their `NamedSharding`, and `constrain(x, names)` calls in the model pin the activations, so the in/out shardings of
every jitted step follow from the table.

Dimensions that a mesh axis does not divide (8 KV heads on a 16-way "model" axis, the 32003-token vocabulary, a
batch of 3 on 2 data shards) are *replicated* along that mesh axis instead of padded: padding would change the
param tree's shapes (the checkpoint, converter and exporter all rely on them) and the model's outputs (padded vocab
logits, padded batch rows), for savings that are small here. For parameters only, the dropped mesh axis is then
moved to another named dimension of the same tensor if it divides that one (`reassign`): the embedding and lm_head
([32003, 4096] each, 262 MB in bf16) are then split along `embed` instead of being replicated on every device,
at the cost of one all-reduce of the logits. See docs/SHARDING.md.

This module holds the axis names, the rules tables and `constrain`, which the layers call; placing params and
caches on a mesh (which needs the weight table and the model's shapes) is `idefics2_jax.ckpt.placement`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# logical name -> mesh axis, tuple of mesh axes (tried in order; each kept only if it divides the dimension), or None
# (replicated). Names missing from a table are replicated.
DEFAULT_RULES: dict[str, Any] = {
    # Parameters (the weight table's names).
    "embed": "fsdp",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    # The vision tower runs data-parallel over images (vLLM's mm_encoder_tp_mode="data"): its 0.4 B parameters are
    # replicated over "model" (only FSDP splits them), and its activations are split over images on every axis.
    "vision_embed": "fsdp",
    "vision_heads": None,
    "vision_mlp": None,
    # Activations and the KV cache.
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,  # the residual stream is replicated over "fsdp" and "model" (FSDP gathers weights instead)
    "head_dim": None,
    "cache_length": None,
    "images": ("data", "fsdp", "model"),  # vision tower: one image's patches never leave their device
    "patches": None,
}

# An example of a different strategy: the vision tower tensor-parallel like the decoder (less memory per device,
# more communication per image).
VISION_TENSOR_PARALLEL_RULES: dict[str, Any] = {
    **DEFAULT_RULES,
    "vision_heads": "model",
    "vision_mlp": "model",
    "images": ("data", "fsdp"),
}

# Logical axes of the activations the model constrains, and of the KV cache (`text.init_cache`'s layout).
HIDDEN_AXES = ("batch", "length", "act_embed")
LOGITS_AXES = ("batch", "length", "vocab")
CACHE_KV_AXES = ("batch", "cache_length", "kv_heads", "head_dim")
CACHE_VALID_AXES = ("batch", "cache_length")
CACHE_POS_AXES = ("cache_length",)
# Model inputs (the processor's layout).
INPUT_AXES = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "position_ids": ("batch", "length"),
    "labels": ("batch", "length"),
    "pixel_values": ("batch", None, None, None, None),
    "pixel_attention_mask": ("batch", None, None, None),
}

_RULES: contextvars.ContextVar[Mapping | None] = contextvars.ContextVar("idefics2_sharding_rules", default=None)


# ----------------------------------------------------------------------------------------------------- meshes
def make_mesh(data: int | None = None, fsdp: int = 1, model: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp", "model") mesh over `devices` (default: all devices of all hosts).

    data=None takes the devices left over by fsdp x model. "model" is the innermost (fastest-varying) axis so
    tensor-parallel collectives stay on the closest devices (`jax.make_mesh` follows the TPU topology).
    """
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        if len(devices) % (fsdp * model):
            raise ValueError(f"fsdp x model = {fsdp} x {model} does not divide the {len(devices)} devices")
        data = len(devices) // (fsdp * model)
    if data * fsdp * model != len(devices):
        raise ValueError(f"mesh data x fsdp x model = {data} x {fsdp} x {model} = {data * fsdp * model} needs that "
                         f"many devices, got {len(devices)}")
    return jax.make_mesh((data, fsdp, model), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _auto(mesh: Mesh) -> Mesh:
    """The same mesh with Auto axes: `with_sharding_constraint` and GSPMD propagation need them (an Explicit
    mesh, `jax.make_mesh`'s default, turns sharding into part of the types)."""
    if isinstance(mesh, Mesh) and any(t != AxisType.Auto for t in mesh.axis_types):
        return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return mesh


def mesh_of(tree) -> Mesh | None:
    """The mesh of the first leaf placed with a multi-device `NamedSharding` (None if none is)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


# ------------------------------------------------------------------------------------------------------ rules
def current_rules() -> Mapping:
    """The rules set by the innermost `use_mesh` / `use_rules`, else DEFAULT_RULES."""
    rules = _RULES.get()
    return DEFAULT_RULES if rules is None else rules


@contextlib.contextmanager
def use_rules(rules: Mapping | None):
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping | None = None):
    """Run (and trace) the model sharded on `mesh`: `constrain` calls become sharding constraints.

    The mesh is entered with `jax.set_mesh`, so it is part of every jit cache key (a function traced without a mesh
    is retraced inside). The rules are read at trace time: a jitted function keeps the table it was traced with.
    """
    with jax.set_mesh(_auto(mesh)), use_rules(rules):
        yield


def mesh_context(params, rules: Mapping | None = None):
    """For library entry points such as `generate`: `use_mesh(mesh_of(params), rules)` when the params live on a
    multi-device mesh and no mesh is active yet; otherwise a no-op (an active `use_mesh` keeps its rules)."""
    mesh = mesh_of(params)
    if mesh is None or not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    return use_mesh(mesh, rules)


def _mesh_axes(target) -> tuple:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(axes: Sequence[str | None], mesh, rules: Mapping | None = None, shape: Sequence[int] | None = None,
                    *, reassign: bool = False) -> PartitionSpec:
    """Logical axis names (one per dim) -> PartitionSpec for `mesh` (a Mesh or AbstractMesh).

    A mesh axis is left out of a dimension when the mesh lacks it, when it has size 1, when an earlier dimension
    already uses it, or when it does not divide the dimension (`shape`), which is then replicated along it.
    reassign: move each mesh axis dropped for divisibility to another *named* dimension of the tensor that it does
    divide (the one with the most elements per shard); used for parameters, so a [vocab, embed] table is split along
    embed when vocab is not divisible.
    """
    rules = current_rules() if rules is None else rules
    sizes = dict(mesh.shape)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set = set()
    dims: list[list[str]] = []
    dropped: list[str] = []
    for i, name in enumerate(axes):
        kept: list[str] = []
        for ax in _mesh_axes(None if name is None else rules.get(name)):
            if ax not in sizes or sizes[ax] == 1 or ax in used:
                continue
            if shape is not None and shape[i] % (math.prod(sizes[a] for a in kept) * sizes[ax]):
                dropped.append(ax)
                continue
            kept.append(ax)
            used.add(ax)
        dims.append(kept)
    if reassign and shape is not None:
        for ax in dropped:
            if ax in used:
                continue
            best, best_size = None, 0
            for i, name in enumerate(axes):
                per_shard = shape[i] // math.prod(sizes[a] for a in dims[i])
                if name is not None and per_shard % sizes[ax] == 0 and per_shard > best_size:
                    best, best_size = i, per_shard
            if best is not None:
                dims[best].append(ax)
                used.add(ax)
    return PartitionSpec(*[None if not d else d[0] if len(d) == 1 else tuple(d) for d in dims])


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh) -> tuple:
    """The per-device block of a `shape` array sharded by `spec` on `mesh` (works for an AbstractMesh too)."""
    sizes = dict(mesh.shape)
    out = []
    for i, n in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        k = math.prod(sizes[a] for a in _mesh_axes(entry))
        out.append(-(-n // k))
    return tuple(out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int], rules: Mapping | None = None,
                   *, reassign: bool = False) -> NamedSharding:
    mesh = _auto(mesh)
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape, reassign=reassign))


# ------------------------------------------------------------------------------------------------- activations
def constrain(x, axes: Sequence[str | None]):
    """`jax.lax.with_sharding_constraint` of `x` by logical names; a no-op unless a mesh is active (`use_mesh`).

    Meshes with non-Auto axes (explicit sharding, inside shard_map) are left alone.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != AxisType.Auto for t in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh, None, x.shape))


def constrain_cache(cache: dict) -> dict:
    """`constrain` every array of a KV cache (split over batch and KV heads), so each decode step returns the cache
    in the sharding it received (no recompilation, and donation can reuse the buffers)."""
    return {
        **cache,
        "pos": constrain(cache["pos"], CACHE_POS_AXES),
        "valid": constrain(cache["valid"], CACHE_VALID_AXES),
        "layers": [{k: constrain(v, CACHE_KV_AXES) for k, v in layer.items()} for layer in cache["layers"]],
    }


# ------------------------------------------------------------------------------------------------- cache, inputs
def cache_shardings(cache, mesh: Mesh, rules: Mapping | None = None):
    """Shardings matching a KV cache (`text.init_cache`, or its `jax.eval_shape`): batch and KV heads split."""
    mesh = _auto(mesh)
    return {
        "pos": named_sharding(mesh, CACHE_POS_AXES, cache["pos"].shape, rules),
        "valid": named_sharding(mesh, CACHE_VALID_AXES, cache["valid"].shape, rules),
        "layers": [{k: named_sharding(mesh, CACHE_KV_AXES, v.shape, rules) for k, v in layer.items()}
                   for layer in cache["layers"]],
    }


def data_sharding(mesh: Mesh, shape: Sequence[int], axes: Sequence[str | None] | None = None,
                  rules: Mapping | None = None) -> NamedSharding:
    """The sharding of a model input of `shape`: split over the batch (dim 0), replicated otherwise."""
    axes = ("batch",) + (None,) * (len(shape) - 1) if axes is None else axes
    return named_sharding(mesh, axes, shape, rules)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Mapping | None = None) -> dict:
    """device_put each model input (`input_ids`, `pixel_values`, ...) with its `data_sharding`; None stays None."""
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
            continue
        shape = np.shape(value)
        axes = INPUT_AXES.get(key) if key in INPUT_AXES and len(INPUT_AXES[key]) == len(shape) else None
        out[key] = jax.device_put(value, data_sharding(mesh, shape, axes, rules))
    return out
