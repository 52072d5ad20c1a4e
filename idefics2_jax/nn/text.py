"""Mistral decoder: GQA, RoPE (rotate-half layout), sliding-window attention and a ring-buffer KV cache.

The KV cache is a plain dict (gemma-style):
  {"pos": [S] int32 cache position held in each slot (-1 = empty),
   "valid": [batch, S] bool (False for empty slots and for padding tokens),
   "layers": [{"k": [batch, S, kv_heads, head_dim], "v": ...}, ...]}
With a sliding window W the cache needs only S = W slots: token at cache position p lives in slot p % S, and the
mask is computed from the stored positions, so generation far past W stays exact with bounded memory.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .attention import dot_product_attention, sliding_window_mask
from ..config import TextConfig
from .layers import GatedMLP, RMSNorm, dense, remat_layer
from .partitioning import HIDDEN_AXES, constrain, constrain_cache

Dtype = Any


def init_cache(config: TextConfig, batch_size: int, max_length: int, dtype=jnp.float32) -> dict:
    """An empty cache for sequences of up to `max_length` tokens (prompt + new): min(W, max_length) slots."""
    size = max_length if config.sliding_window is None else min(config.sliding_window, max_length)
    shape = (batch_size, size, config.num_key_value_heads, config.head_dim)
    return {
        "pos": jnp.full((size,), -1, jnp.int32),
        "valid": jnp.zeros((batch_size, size), bool),
        "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                   for _ in range(config.num_hidden_layers)],
    }


def rope(x, positions, theta: float):
    """HF rotate-half RoPE: x [B, T, N, H], positions [B, T]. cos/sin in float32, cast to x's dtype as the reference."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _write(buffer, new, slots):
    """Write new [B, T, ...] into buffer [B, S, ...] at `slots` [T] (distinct slots)."""
    return buffer.at[:, slots].set(new.astype(buffer.dtype))


def ring_slots(cache: dict, cache_positions):
    """The slots [n] that tokens at `cache_positions` [T] (consecutive) are written to: only the last S tokens can
    stay in an S-slot ring, the token at position p in slot p % S."""
    size = cache["pos"].shape[0]
    return cache_positions[-min(cache_positions.shape[0], size):] % size


def update_cache_meta(cache: dict, cache_positions, token_valid) -> dict:
    """The cache's `pos` / `valid` after writing tokens at `cache_positions` [T] (consecutive)."""
    slots = ring_slots(cache, cache_positions)
    n = slots.shape[0]
    return {
        "pos": cache["pos"].at[slots].set(cache_positions[-n:].astype(jnp.int32)),
        "valid": cache["valid"].at[:, slots].set(token_valid[:, -n:]),
    }


class MistralAttention(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache=None, slots=None, mode: str = "forward"):
        """mode (`TextModel`'s): with a cache, the new tokens are written at `slots`, then attend over
        "prefill": themselves only; "decode": the ring just written; "extend": [old cache entries ; themselves]."""
        cfg = self.config
        b, t, _ = x.shape
        q = dense(cfg.num_attention_heads * cfg.head_dim, "q_proj", self.dtype)(x)
        k = dense(cfg.num_key_value_heads * cfg.head_dim, "k_proj", self.dtype)(x)
        v = dense(cfg.num_key_value_heads * cfg.head_dim, "v_proj", self.dtype)(x)
        q = rope(q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rope(k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        new_cache = None
        keys, values = k, v
        if layer_cache is not None:
            n = slots.shape[0]
            new_cache = {"k": _write(layer_cache["k"], k[:, -n:], slots),
                         "v": _write(layer_cache["v"], v[:, -n:], slots)}
            if mode == "decode":
                # A decode step attends over the ring it has just written (see TextModel): no copy of the cache.
                keys, values = new_cache["k"].astype(k.dtype), new_cache["v"].astype(v.dtype)
            elif mode == "extend":
                # Attend over [old cache entries ; new tokens]; the mask (built by the caller from stored positions)
                # hides empty slots, padding and anything outside the window, including the slot being overwritten.
                keys = jnp.concatenate([layer_cache["k"].astype(k.dtype), k], axis=1)
                values = jnp.concatenate([layer_cache["v"].astype(v.dtype), v], axis=1)
        out = dot_product_attention(q, keys, values, mask, scale=cfg.head_dim**-0.5,
                                    implementation=self.attention_impl)
        return dense(cfg.hidden_size, "o_proj", self.dtype)(out.reshape(b, t, -1)), new_cache


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache=None, slots=None, mode: str = "forward"):
        cfg = self.config
        h, new_cache = MistralAttention(cfg, self.dtype, self.attention_impl, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x), positions, mask, layer_cache, slots,
            mode)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        mlp = GatedMLP(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, self.dtype, name="mlp")
        return x + mlp(h), new_cache


class TextModel(nn.Module):
    """Mistral decoder body (embeddings are looked up by the caller so image features can be merged first)."""

    config: TextConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False  # recompute each layer in the backward pass (`layers.remat_layer`)

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        layer = remat_layer(DecoderLayer, self.remat, static_argnums=(6,))  # mode (self is argument 0)
        self.layers = [layer(cfg, self.dtype, self.attention_impl, name=f"layers_{i}")
                       for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    MODES = ("forward", "prefill", "decode", "extend")

    def __call__(self, x, positions, token_valid, cache_positions, cache=None, mode: str = "forward"):
        """x [B, T, D] embeddings; positions [B, T] RoPE positions; token_valid [B, T] bool (the attention mask);
        cache_positions [T] index of each token in the padded sequence. Returns (hidden [B, T, D], new cache).

        mode (named by the caller, never inferred from shapes):
          "forward"  no cache (the training / scoring pass);
          "prefill"  the tokens start a new sequence in `cache`: they attend among themselves only, and the
                     cache's old entries are dropped;
          "decode"   one token per row: written into its ring slot first, then attending over the ring alone;
          "extend"   any number of tokens appended after the cache's entries ([old cache ; new tokens]).
        """
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if (cache is None) != (mode == "forward"):
            raise ValueError(f"mode {mode!r} {'needs' if cache is None else 'takes no'} KV cache")
        if mode == "decode" and cache_positions.shape[0] != 1:
            raise ValueError(f"mode 'decode' takes one token per row, got {cache_positions.shape[0]}")
        window = self.config.sliding_window
        mask = sliding_window_mask(cache_positions, cache_positions, window) & token_valid[:, None, :]
        slots = None if cache is None else ring_slots(cache, cache_positions)
        # "prefill" (a prompt into an empty cache, generate's prefill) attends over the new tokens alone: `mask`.
        if mode == "decode":
            # Write the token into its ring slot first, then attend over the ring alone. Exact: the overwritten
            # slot held position p - S, which is outside the window when S = W and empty when S = max_length > p
            # (init_cache's contract). Saves concatenating [cache ; new] in every layer.
            meta = update_cache_meta(cache, cache_positions, token_valid)
            mask = sliding_window_mask(cache_positions, meta["pos"], window) & (meta["pos"] >= 0)[None, :]
            mask = mask[None] & meta["valid"][:, None, :]
        elif mode == "extend":
            old = sliding_window_mask(cache_positions, cache["pos"], window) & (cache["pos"] >= 0)[None, :]
            old = old[None] & cache["valid"][:, None, :]
            mask = jnp.concatenate([old, mask], axis=-1)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, mask, None if cache is None else cache["layers"][i], slots, mode)
            x = constrain(x, HIDDEN_AXES)
            new_layers.append(layer_cache)
        x = self.norm(x)
        if cache is None:
            return x, None
        if mode == "prefill":  # nothing from before this sequence stays visible
            cache = {**cache, "pos": jnp.full_like(cache["pos"], -1), "valid": jnp.zeros_like(cache["valid"])}
        return x, constrain_cache({**update_cache_meta(cache, cache_positions, token_valid), "layers": new_layers})
