"""Weight-only quantization math (imports only jax / numpy): the schemes, which kernels are quantized, one kernel's
quantization, and the product. `idefics2_jax.quant` applies it to param trees; the converter to checkpoint slabs.

  int8  symmetric per output channel: scale [out] = max_i |W[i, o]| / 127, q = round(W / scale) in [-127, 127];
  int4  symmetric per group of `group` input rows: scale [in / group, out] = max |W[group, o]| / 7, q in [-7, 7].
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

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


def check_group(shape, group: int | None, name: str) -> None:
    if group is not None and shape[0] % group:
        raise ValueError(f"int4 group size {group} does not divide the input size {shape[0]} of {name}; "
                         "use a group that divides it (e.g. quantize='int4:64')")


def scale_shape(shape, bits: int, group: int | None) -> tuple:
    return (shape[1],) if bits == 8 else (shape[0] // group, shape[1])


def quantize_kernel(w, bits: int, group: int | None, scale_dtype, name: str = "kernel") -> dict:
    """{"kernel_q", "kernel_scale"} of one [in, out] kernel (or a slab of its output columns), in float32."""
    w = jnp.asarray(w, jnp.float32)
    d_in, d_out = w.shape
    if bits == 8:
        scale = jnp.max(jnp.abs(w), axis=0) / 127.0
        q = jnp.clip(jnp.round(w / jnp.where(scale == 0, 1.0, scale)), -127, 127).astype(jnp.int8)
        return {"kernel_q": q, "kernel_scale": scale.astype(scale_dtype)}
    check_group(w.shape, group, name)
    wg = w.reshape(d_in // group, group, d_out)
    scale = jnp.max(jnp.abs(wg), axis=1) / 7.0  # [groups, out]
    q = jnp.clip(jnp.round(wg / jnp.where(scale == 0, 1.0, scale)[:, None, :]), -7, 7)
    return {"kernel_q": q.reshape(d_in, d_out).astype(jnp.int4), "kernel_scale": scale.astype(scale_dtype)}


def quantized_matmul(x, q, scale, dtype):
    """x [..., in] times a quantized kernel: int8 q [in, out] with scale [out] -> (x q) * scale; int4 q [in, out]
    with scale [groups, out] -> the sum over groups of (x_g q_g) * s_g. The integer kernel is cast inside the
    product (never stored in full precision)."""
    if scale.ndim == 1:
        return jax.lax.dot_general(x, q.astype(dtype), (((x.ndim - 1,), (0,)), ((), ()))) * scale.astype(dtype)
    groups = scale.shape[0]
    xg = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    qg = q.reshape(groups, q.shape[0] // groups, q.shape[1]).astype(dtype)
    y = jnp.einsum("...gi,gio->...go", xg, qg)
    return jnp.einsum("...go,go->...o", y, scale.astype(dtype))


def scale_sharding(kernel_sharding, scale_ndim: int):
    """A scale's sharding from its kernel's: the output-channel part of it (None if the kernel has none)."""
    from jax.sharding import NamedSharding, PartitionSpec

    if not isinstance(kernel_sharding, NamedSharding):
        return kernel_sharding
    spec = tuple(kernel_sharding.spec) + (None,) * (2 - len(kernel_sharding.spec))
    out = PartitionSpec(spec[1]) if scale_ndim == 1 else PartitionSpec(None, spec[1])
    return NamedSharding(kernel_sharding.mesh, out)
