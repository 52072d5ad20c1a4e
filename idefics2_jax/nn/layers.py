"""Building blocks shared by the vision tower, connector and decoder."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .quantization import quantized_matmul

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


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LoraScaling:
    """A LoRA layer's `scale` (alpha / r, or alpha / sqrt(r)) and dropout rate: static pytree data with no leaves,
    so gradients, optimizers and `jax.tree.map` see only lora_A / lora_B."""

    scale: float
    dropout: float = 0.0


def trainable_param(module: nn.Module, name: str, init, shape, dtype):
    """`module.param(...)`, or its fully trained copy when the "lora" collection holds one (PEFT's modules_to_save)."""
    value = module.param(name, init, shape, dtype)
    if module.has_variable("lora", name):
        value = module.get_variable("lora", name)
    return value


class Dense(nn.Module):
    """A Linear layer: kernel [in, out] (HF stores [out, in]), computed as flax's `nn.Dense`.

    With `{"lora": {..., "lora_A": [in, r], "lora_B": [r, out], "scaling": LoraScaling}}` for this layer it adds
    `scale * (dropout(x) A) B` (never a merged copy of the kernel); dropout applies only when a "dropout" rng is given.
    """

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        bias = trainable_param(self, "bias", nn.initializers.zeros, (self.features,), self.dtype) \
            if self.use_bias else None
        if self.has_variable("params", "kernel_q"):  # weight-only quantized (idefics2_jax.quant)
            x, bias = nn.dtypes.promote_dtype(x, bias, dtype=self.dtype)
            y = quantized_matmul(x, self.get_variable("params", "kernel_q"),
                                 self.get_variable("params", "kernel_scale"), self.dtype)
        else:
            kernel = trainable_param(self, "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                                     self.dtype)
            x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if bias is not None:
            y = y + bias
        if self.has_variable("lora", "lora_A"):
            a = self.get_variable("lora", "lora_A")
            b = self.get_variable("lora", "lora_B")
            scaling = self.get_variable("lora", "scaling")
            h = x
            if scaling.dropout > 0 and self.has_rng("dropout"):
                h = nn.Dropout(scaling.dropout, deterministic=False)(h)
            delta = (h.astype(a.dtype) @ a) @ b.astype(a.dtype)
            y = y + (scaling.scale * delta).astype(y.dtype)
        return y


# What `remat=True` keeps for the backward pass: each layer's inputs only; everything inside a layer (attention
# scores, MLP activations, norms) is recomputed. Peak activation memory then grows with one layer's internals plus
# the residual stream per layer, for about one extra forward pass of compute.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def remat_layer(cls, remat: bool, static_argnums: tuple = ()):
    """`cls`, or `cls` under `nn.remat` (REMAT_POLICY) when `remat`; parameter names and collections (params,
    lora) are unchanged. static_argnums count `self` as 0."""
    if not remat:
        return cls
    return nn.remat(cls, policy=REMAT_POLICY, static_argnums=static_argnums)


def dense(features: int, name: str, dtype: Dtype, use_bias: bool = False) -> Dense:
    """A Linear layer computing and keeping its params in `dtype` (see `Dense`)."""
    return Dense(features, use_bias=use_bias, dtype=dtype, name=name)


class RMSNorm(nn.Module):
    """The reference's RMSNorm: statistics in float32, cast back to the input dtype, *then* scale by the weight."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = trainable_param(self, "scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
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
