"""Connector: SwiGLU modality projection + Perceiver resampler (reference: `Idefics2Connector`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .attention import dot_product_attention, key_padding_mask
from ..config import Idefics2Config, PerceiverConfig
from .layers import GatedMLP, RMSNorm, dense, remat_layer, trainable_param
from .partitioning import constrain

Dtype = Any


class PerceiverAttention(nn.Module):
    config: PerceiverConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, latents, context, valid):
        cfg = self.config
        n, q_len, _ = latents.shape
        # Keys/values see the context *first*, then the latents (order matters only for the mask layout).
        kv_in = jnp.concatenate([context, latents], axis=1)
        q = dense(cfg.resampler_n_heads * cfg.resampler_head_dim, "q_proj", self.dtype)(latents)
        k = dense(cfg.num_key_value_heads * cfg.resampler_head_dim, "k_proj", self.dtype)(kv_in)
        v = dense(cfg.num_key_value_heads * cfg.resampler_head_dim, "v_proj", self.dtype)(kv_in)
        q = q.reshape(n, q_len, cfg.resampler_n_heads, cfg.resampler_head_dim)
        k = k.reshape(n, kv_in.shape[1], cfg.num_key_value_heads, cfg.resampler_head_dim)
        v = v.reshape(n, kv_in.shape[1], cfg.num_key_value_heads, cfg.resampler_head_dim)
        out = dot_product_attention(q, k, v, key_padding_mask(valid), scale=cfg.resampler_head_dim**-0.5,
                                    implementation=self.attention_impl)
        return dense(cfg.hidden_size, "o_proj", self.dtype)(out.reshape(n, q_len, -1))


class PerceiverLayer(nn.Module):
    config: PerceiverConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, latents, context, valid):
        cfg = self.config
        eps = cfg.rms_norm_eps  # the perceiver's own eps (5.x), not the text eps the model was trained with (4.45-)
        normed = RMSNorm(eps, self.dtype, name="input_latents_norm")(latents)
        context = RMSNorm(eps, self.dtype, name="input_context_norm")(context)
        latents = latents + PerceiverAttention(cfg, self.dtype, self.attention_impl, name="self_attn")(
            normed, context, valid)
        h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(latents)
        return latents + GatedMLP(4 * cfg.hidden_size, cfg.hidden_size, cfg.hidden_act, self.dtype, name="mlp")(h)


class PerceiverResampler(nn.Module):
    """context [n, L, D] + valid [n, L] -> [n, n_latents, D]; padded patches hidden, latents always visible."""

    config: PerceiverConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, context, valid):
        cfg = self.config
        latents = trainable_param(
            self, "latents", nn.initializers.ones, (cfg.resampler_n_latents, cfg.hidden_size), self.dtype
        )
        latents = jnp.broadcast_to(latents, (context.shape[0], *latents.shape))
        valid = jnp.concatenate([valid, jnp.ones((valid.shape[0], cfg.resampler_n_latents), bool)], axis=1)
        layer = remat_layer(PerceiverLayer, self.remat)
        for i in range(cfg.resampler_depth):
            latents = layer(cfg, self.dtype, self.attention_impl, name=f"layers_{i}")(latents, context, valid)
            latents = constrain(latents, ("batch", "length", "act_embed"))
        return RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(latents)


class Connector(nn.Module):
    """Vision features [n, L, Dv] -> image tokens [n, n_latents, D_text]."""

    config: Idefics2Config
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, features, valid):
        text = self.config.text_config
        # The connector is tensor-parallel like the decoder: its image axis is split like the text batch.
        features = constrain(features, ("batch", "patches", "act_embed"))
        # Rematerialised too: on 729 patches per image its hidden [n, 729, intermediate] is the largest activation.
        x = remat_layer(GatedMLP, self.remat)(text.intermediate_size, text.hidden_size, text.hidden_act, self.dtype,
                                              name="modality_projection")(features)
        return PerceiverResampler(self.config.perceiver_config, self.dtype, self.attention_impl, self.remat,
                                  name="perceiver_resampler")(x, valid)
