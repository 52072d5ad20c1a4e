"""Weight-only quantization of the text decoder and the connector ("LLM only", as AWQ on Idefics2): the vision tower,
the embeddings and lm_head stay in the compute dtype.

    params = quant.quantize_params(params, "int8")      # or "int4" (groups of 128), "int4:64"
    model.apply({"params": params}, ...)                 # nn.layers.Dense dequantizes inside the product

A quantized Dense holds `kernel_q` (int8 / int4, the kernel's [in, out] shape) and `kernel_scale` in place of
`kernel`:
  int8  symmetric per output channel: scale [out] = max_i |W[i, o]| / 127, q = round(W / scale) in [-127, 127];
  int4  symmetric per group of `group` input rows: scale [in / group, out] = max |W[group, o]| / 7, q in [-7, 7].
Scales are in the compute dtype. The product is `(x q) * scale` (int8) or the per-group sum of `(x_g q_g) * s_g`
(int4), so no full-precision copy of the weights is kept (XLA may materialise one layer's dequantized kernel
inside the product on backends that do not fuse it).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec

DEFAULT_GROUP = 128
# Quantized: every Dense kernel of the decoder and the connector (attention, MLPs, modality projection, perceiver).
_QUANTIZED = re.compile(r"^(text_model/layers_\d+|connector)/.*/kernel$")


def parse_scheme(scheme: str) -> tuple[int, int | None]:
    """"int8" -> (8, None); "int4" -> (4, 128); "int4:64" -> (4, 64)."""
    if not isinstance(scheme, str):
        raise ValueError(f"quantize must be 'int8', 'int4' or 'int4:GROUP', got {scheme!r}")
    m = re.fullmatch(r"int8|int4(?::(\d+))?", scheme)
    if not m:
        raise ValueError(f"unknown quantization scheme {scheme!r}: use 'int8', 'int4' or 'int4:GROUP' (e.g. int4:64)")
    if scheme == "int8":
        return 8, None
    group = int(m.group(1)) if m.group(1) else DEFAULT_GROUP
    if group < 1:
        raise ValueError(f"int4 group size must be positive, got {group}")
    return 4, group


def quantizable(path) -> bool:
    return bool(_QUANTIZED.match("/".join(map(str, path))))


def is_quantized(params) -> bool:
    return any(path[-1] == "kernel_q" for path in flatten_dict(params))


def quantize_kernel(w, bits: int, group: int | None, scale_dtype, name: str = "kernel") -> dict:
    """{"kernel_q", "kernel_scale"} of one [in, out] kernel (computed in float32)."""
    w = jnp.asarray(w, jnp.float32)
    d_in, d_out = w.shape
    if bits == 8:
        scale = jnp.max(jnp.abs(w), axis=0) / 127.0
        q = jnp.clip(jnp.round(w / jnp.where(scale == 0, 1.0, scale)), -127, 127).astype(jnp.int8)
        return {"kernel_q": q, "kernel_scale": scale.astype(scale_dtype)}
    if d_in % group:
        raise ValueError(f"int4 group size {group} does not divide the input size {d_in} of {name}; "
                         "use a group that divides it (e.g. quantize='int4:64')")
    wg = w.reshape(d_in // group, group, d_out)
    scale = jnp.max(jnp.abs(wg), axis=1) / 7.0  # [groups, out]
    q = jnp.clip(jnp.round(wg / jnp.where(scale == 0, 1.0, scale)[:, None, :]), -7, 7)
    return {"kernel_q": q.reshape(d_in, d_out).astype(jnp.int4), "kernel_scale": scale.astype(scale_dtype)}


def quantize_params(params, scheme: str, dtype=None):
    """A params tree with the decoder and connector kernels quantized by `scheme`; the other params are the same
    arrays. dtype: the scales' dtype (default: each kernel's own). One kernel is converted at a time; the float
    kernel is dropped from the returned tree (and freed once the caller drops `params`)."""
    bits, group = parse_scheme(scheme)
    if is_quantized(params):
        raise ValueError("these params are already quantized; quantize the float checkpoint instead")
    flat = flatten_dict(params)
    paths = [p for p in flat if quantizable(p)]
    if not paths:
        raise ValueError("no decoder or connector kernel found to quantize (is this an Idefics2 params tree?)")
    if bits == 4:  # every group-size problem before any work
        for p in paths:
            if flat[p].shape[0] % group:
                raise ValueError(f"int4 group size {group} does not divide the input size {flat[p].shape[0]} of "
                                 f"{'/'.join(p)}; use a group that divides it (e.g. quantize='int4:64')")
    out = {}
    for path, value in flat.items():
        if path in paths:
            q = quantize_kernel(value, bits, group, dtype or value.dtype, "/".join(path))
            sharding = getattr(value, "sharding", None)
            for k, v in q.items():
                out[path[:-1] + (k,)] = v if sharding is None else jax.device_put(v, _like(sharding, k, v))
        else:
            out[path] = value
    return unflatten_dict(out)


def _like(sharding, name: str, value):
    """The kernel's sharding for `kernel_q`; for scales, the output-channel part of it."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    if name == "kernel_q":
        return sharding
    out_spec = PartitionSpec(spec[1]) if value.ndim == 1 else PartitionSpec(None, spec[1])
    return NamedSharding(sharding.mesh, out_spec)


def dequantize_params(params):
    """Float params back from quantized ones (the round-to-nearest values), in each scale's dtype."""
    flat = flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if path[-1] == "kernel_scale":
            continue
        if path[-1] == "kernel_q":
            scale = flat[path[:-1] + ("kernel_scale",)]
            out[path[:-1] + ("kernel",)] = dequantize_kernel(value, scale)
        else:
            out[path] = value
    return unflatten_dict(out)


def dequantize_kernel(q, scale):
    qf = jnp.asarray(q, jnp.float32)
    s = jnp.asarray(scale, jnp.float32)
    if s.ndim == 1:
        return (qf * s).astype(scale.dtype)
    groups = s.shape[0]
    w = qf.reshape(groups, -1, qf.shape[1]) * s[:, None, :]
    return w.reshape(qf.shape).astype(scale.dtype)
