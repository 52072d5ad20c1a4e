"""Compute dtypes named by users, and the dtype a checkpoint stores."""

from __future__ import annotations

import jax.numpy as jnp

from ..config import Idefics2Config

_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def resolve_dtype(dtype) -> jnp.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                 "float16": jnp.float16, "fp16": jnp.float16}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'")
        return jnp.dtype(names[dtype])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype {d}: use float32, bfloat16 or float16")
    return d


def checkpoint_dtype(reader, config: Idefics2Config) -> jnp.dtype:
    """The dtype the checkpoint stores (its first floating tensor), falling back to config.json's."""
    for key in reader.keys():
        name = _ST_DTYPES.get(reader.dtype(key))
        if name and name != "float64":
            return jnp.dtype(name)
    return resolve_dtype(config.dtype or "float32")

