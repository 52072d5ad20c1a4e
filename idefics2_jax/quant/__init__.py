"""Weight-only quantization of the text decoder and the connector ("LLM only", as AWQ on Idefics2): the vision tower,
the embeddings and lm_head stay in the compute dtype.

    params = quant.quantize_params(params, "int8")      # or "int4" (groups of 128), "int4:64"
    model.apply({"params": params}, ...)                 # nn.layers.Dense dequantizes inside the product

A quantized Dense holds `kernel_q` (int8 / int4, the kernel's [in, out] shape) and `kernel_scale` in place of
`kernel` (the schemes: `idefics2_jax.nn.quantization`). Scales are in the compute dtype. The product is
`(x q) * scale` (int8) or the per-group sum of `(x_g q_g) * s_g` (int4), so no full-precision copy of the weights is
kept (XLA may materialise one layer's dequantized kernel inside the product on backends that do not fuse it).
`python -m convert --from hf SRC DST --quantize int8` writes a quantized checkpoint that `load_model` reads as is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from ..nn.quantization import (DEFAULT_GROUP, check_group, parse_scheme, quantizable, quantize_kernel,
                               quantized_matmul, scale_sharding)

__all__ = ["DEFAULT_GROUP", "parse_scheme", "quantizable", "quantize_kernel", "quantized_matmul", "quantize_params",
           "dequantize_params", "dequantize_kernel", "is_quantized"]


def is_quantized(params) -> bool:
    return any(path[-1] == "kernel_q" for path in flatten_dict(params))


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
    for p in paths:  # every group-size problem before any work
        check_group(flat[p].shape, group, "/".join(p))
    out = {}
    for path, value in flat.items():
        if path not in paths:
            out[path] = value
            continue
        q = quantize_kernel(value, bits, group, dtype or value.dtype, "/".join(path))
        sharding = getattr(value, "sharding", None)
        if sharding is not None:
            q = {"kernel_q": jax.device_put(q["kernel_q"], sharding),
                 "kernel_scale": jax.device_put(q["kernel_scale"], scale_sharding(sharding, q["kernel_scale"].ndim))}
        out[path[:-1] + ("kernel_q",)], out[path[:-1] + ("kernel_scale",)] = q["kernel_q"], q["kernel_scale"]
    return unflatten_dict(out)


def dequantize_params(params):
    """Float params back from quantized ones (the round-to-nearest values), in each scale's dtype."""
    flat = flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if path[-1] == "kernel_scale":
            continue
        if path[-1] == "kernel_q":
            out[path[:-1] + ("kernel",)] = dequantize_kernel(value, flat[path[:-1] + ("kernel_scale",)])
        else:
            out[path] = value
    return unflatten_dict(out)


def dequantize_kernel(q, scale):
    qf = jnp.asarray(q, jnp.float32)
    s = jnp.asarray(scale, jnp.float32)
    if s.ndim == 1:
        return (qf * s).astype(scale.dtype)
    w = qf.reshape(s.shape[0], -1, qf.shape[1]) * s[:, None, :]
    return w.reshape(qf.shape).astype(scale.dtype)
