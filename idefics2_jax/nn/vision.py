"""Vision tower: SigLIP encoder over NaViT native-resolution patches (reference: `Idefics2VisionTransformer`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .attention import dot_product_attention, key_padding_mask
from ..config import VisionConfig
from .layers import activation, dense, remat_layer
from .partitioning import constrain

Dtype = Any


def bucket_boundaries(num_patches_per_side: int) -> np.ndarray:
    """`torch.arange(1/n, 1.0, 1/n)` in float32.

    Parity trap: a float32 arange differs from torch's by up to 6e-8 and moves 24 buckets at n = 70; computing in
    float64 and casting matches torch for the real grid (n = 70) and 4, 16, 32, 64 (tests check 70 against torch).
    """
    n = num_patches_per_side
    return np.arange(1.0 / n, 1.0, 1.0 / n, dtype=np.float64).astype(np.float32)


def position_ids(patch_valid, num_patches_per_side: int):
    """NaViT position ids: [n_images, hp, wp] bool patch mask -> [n_images, hp * wp] int32 ids into the n*n table.

    Each image's valid patch rows/cols are spread over the full n x n grid by fractional-coordinate bucketing
    (`searchsorted(..., side="right")` == torch.bucketize(right=True)); padded patches get id 0.
    """
    n = num_patches_per_side
    boundaries = jnp.asarray(bucket_boundaries(n))
    nb_h = patch_valid[:, :, 0].sum(axis=1)  # valid rows, counted in the first column as the reference
    nb_w = patch_valid[:, 0, :].sum(axis=1)
    # Guard 1/0 for all-padding slots (the reference drops those images; here they are computed and discarded).
    step_h = 1.0 / jnp.maximum(nb_h, 1).astype(jnp.float32)
    step_w = 1.0 / jnp.maximum(nb_w, 1).astype(jnp.float32)
    hp, wp = patch_valid.shape[1:]
    coords_h = jnp.minimum(jnp.arange(hp, dtype=jnp.float32)[None, :] * step_h[:, None], jnp.float32(1.0 - 1e-6))
    coords_w = jnp.minimum(jnp.arange(wp, dtype=jnp.float32)[None, :] * step_w[:, None], jnp.float32(1.0 - 1e-6))
    bucket_h = jnp.searchsorted(boundaries, coords_h, side="right")
    bucket_w = jnp.searchsorted(boundaries, coords_w, side="right")
    ids = bucket_h[:, :, None] * n + bucket_w[:, None, :]
    return jnp.where(patch_valid, ids, 0).reshape(patch_valid.shape[0], -1).astype(jnp.int32)


class PatchEmbedding(nn.Module):
    """Conv2d(C, D, kernel=P, stride=P, valid) with bias; kernel stored [P, P, C, D] (HF: [D, C, P, P])."""

    patch_size: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        """pixels [n, H, W, C] -> [n, H // P, W // P, D]."""
        p = self.patch_size
        n, h, w, c = pixels.shape
        hp, wp = h // p, w // p
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        # A stride-P valid conv is a matmul over non-overlapping patches in row-major (h, w) order.
        patches = pixels[:, : hp * p, : wp * p].astype(self.dtype).reshape(n, hp, p, wp, p, c)
        return jnp.einsum("nhpwqc,pqcd->nhwd", patches, kernel) + bias


class VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels, patch_valid):
        """pixels [n, H, W, C] (channels last), patch_valid [n, hp, wp] -> [n, hp * wp, D]."""
        cfg = self.config
        p = cfg.patch_size
        n, h, w, c = pixels.shape
        hp, wp = h // p, w // p
        x = PatchEmbedding(p, cfg.hidden_size, self.dtype, name="patch_embedding")(pixels)
        x = x.reshape(n, hp * wp, cfg.hidden_size)
        table = nn.Embed(cfg.num_patches_per_side**2, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         name="position_embedding")
        return x + table(position_ids(patch_valid, cfg.num_patches_per_side))


class VisionAttention(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, valid):
        cfg = self.config
        n, length, _ = x.shape
        heads = (n, length, cfg.num_attention_heads, cfg.head_dim)
        q = dense(cfg.hidden_size, "q_proj", self.dtype, use_bias=True)(x).reshape(heads)
        k = dense(cfg.hidden_size, "k_proj", self.dtype, use_bias=True)(x).reshape(heads)
        v = dense(cfg.hidden_size, "v_proj", self.dtype, use_bias=True)(x).reshape(heads)
        out = dot_product_attention(q, k, v, key_padding_mask(valid), scale=cfg.head_dim**-0.5,
                                    implementation=self.attention_impl)
        return dense(cfg.hidden_size, "out_proj", self.dtype, use_bias=True)(out.reshape(n, length, -1))


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = dense(cfg.intermediate_size, "fc1", self.dtype, use_bias=True)(x)
        return dense(cfg.hidden_size, "fc2", self.dtype, use_bias=True)(activation(cfg.hidden_act)(x))


def _layer_norm(cfg: VisionConfig, name: str, dtype) -> nn.LayerNorm:
    # Two-pass variance like torch's layer_norm (flax's default E[x^2]-E[x]^2 loses precision on large activations).
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=dtype, use_fast_variance=False, name=name)


class EncoderLayer(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, valid):
        cfg = self.config
        x = x + VisionAttention(cfg, self.dtype, self.attention_impl, name="self_attn")(
            _layer_norm(cfg, "layer_norm1", self.dtype)(x), valid)
        return x + VisionMLP(cfg, self.dtype, name="mlp")(_layer_norm(cfg, "layer_norm2", self.dtype)(x))


class Encoder(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, x, valid):
        layer = remat_layer(EncoderLayer, self.remat)
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, self.dtype, self.attention_impl, name=f"layers_{i}")(x, valid)
            x = constrain(x, ("images", "patches", "act_embed"))
        return x


class VisionTransformer(nn.Module):
    """pixels [n, H, W, C] + patch mask [n, hp, wp] -> patch features [n, hp * wp, D] (post-LayerNorm)."""

    config: VisionConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, pixels, patch_valid):
        x = VisionEmbeddings(self.config, self.dtype, name="embeddings")(pixels, patch_valid)
        valid = patch_valid.reshape(patch_valid.shape[0], -1)
        x = Encoder(self.config, self.dtype, self.attention_impl, self.remat, name="encoder")(x, valid)
        return _layer_norm(self.config, "post_layernorm", self.dtype)(x)
