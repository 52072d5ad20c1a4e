"""The one attention function (vision, perceiver and decoder all call it) and the small named mask builders."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, mask=None, *, scale: float, implementation: str | None = None):
    """Scaled dot-product attention with grouped-query heads.

    Args:
      q: [batch, q_len, num_heads, head_dim]
      k, v: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0. Query head n reads KV head
        n // (num_heads // num_kv_heads), as the reference's `repeat_kv` (no repeated K/V is materialised).
      mask: bool, broadcastable to [batch, q_len, kv_len]; True = may attend.
      scale: logit scale (head_dim ** -0.5 everywhere in Idefics2).
      implementation: None / "xla" / "cudnn", passed to `jax.nn.dot_product_attention`.

    Returns: [batch, q_len, num_heads, head_dim]. Logits and softmax are computed in float32 as the reference.
    A query row whose keys are all masked gets a finite average (never NaN); only padding rows can be like that.
    """
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[1], k.shape[1]))[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)


def key_padding_mask(valid):
    """valid [batch, kv_len] bool -> [batch, 1, kv_len]: every query may see exactly the valid keys."""
    return jnp.asarray(valid, bool)[:, None, :]


def patch_mask(pixel_attention_mask, patch_size: int):
    """Pixel mask [n, H, W] -> patch mask [n, H // P, W // P].

    A patch is valid iff all P*P of its pixels are (the reference's rule since 4.45: `sum == P*P`; the older `> 0`
    rule made answers depend on batch padding). Pixels past (H // P) * P are ignored, as the valid conv does.
    """
    n, h, w = pixel_attention_mask.shape
    hp, wp = h // patch_size, w // patch_size
    m = jnp.asarray(pixel_attention_mask)[:, : hp * patch_size, : wp * patch_size].astype(jnp.int32)
    m = m.reshape(n, hp, patch_size, wp, patch_size)
    return m.sum(axis=(2, 4)) == patch_size * patch_size


def sliding_window_mask(q_positions, k_positions, window: int | None):
    """Causal (sliding-window) visibility by cache position: [..., q_len, kv_len] bool.

    Key k is visible to query q iff 0 <= q - k <= window - 1 (transformers 5.x
    `sliding_window_causal_mask_function`: the window holds W keys including the query itself; 4.40 allowed W + 1).
    Positions are cache positions (the index in the padded sequence), so left padding counts toward the window.
    `window=None` is plain causal attention.
    """
    diff = jnp.asarray(q_positions)[..., :, None] - jnp.asarray(k_positions)[..., None, :]
    visible = diff >= 0
    if window is not None:
        visible &= diff <= window - 1
    return visible
