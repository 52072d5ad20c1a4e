"""Building blocks shared by the vision tower, connector and decoder."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(f"activation {name!r} is not implemented (known: {sorted(ACTIVATIONS)})") from None


def dense(features: int, name: str, dtype: Dtype, use_bias: bool = False) -> nn.Dense:
    """A Linear layer; kernel [in, out] (HF stores [out, in]), compute in `dtype`, params in their stored dtype."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, name=name)


class RMSNorm(nn.Module):
    """The reference's RMSNorm: statistics in float32, cast back to the input dtype, *then* scale by the weight."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(in_dtype)


class GatedMLP(nn.Module):
    """Bias-free SwiGLU `down(act(gate x) * up x)`: the modality projection, perceiver MLP and Mistral MLP."""

    intermediate_size: int
    output_size: int
    act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        gate = dense(self.intermediate_size, "gate_proj", self.dtype)(x)
        up = dense(self.intermediate_size, "up_proj", self.dtype)(x)
        return dense(self.output_size, "down_proj", self.dtype)(activation(self.act)(gate) * up)
