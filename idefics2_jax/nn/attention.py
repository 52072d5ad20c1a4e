"""The one attention function (vision, perceiver and decoder all call it) and the small named mask builders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# jax.nn.dot_product_attention's fill for masked logits: finite, so a fully masked row averages instead of NaN.
MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)
# When the whole [batch, heads, q_len, kv_len] float32 logits would exceed BLOCKED_LOGITS_BYTES (the vision tower: up
# to 4900 x 4900 per image and head), queries are processed in equal blocks of Q_BLOCK_MIN..Q_BLOCK_MAX rows, each
# block's logits under that size: same math, bounded memory, and faster on CPU, where a block stays in cache
# (2-core Xeon, fp32, 3 heads: 4 x 784 patches 26 ms at 8 MiB vs 38 at 16 MiB and 46 unblocked; 1 x 4900 patches
# 235 ms vs 850 unblocked; 8 MiB was the best budget of 4..64 MiB on every vision shape measured).
Q_BLOCK_MIN = 128
Q_BLOCK_MAX = 512
BLOCKED_LOGITS_BYTES = 8 << 20


def dot_product_attention(q, k, v, mask=None, *, scale: float, implementation: str | None = None):
    """Scaled dot-product attention with grouped-query heads.

    Args:
      q: [batch, q_len, num_heads, head_dim]
      k, v: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0. Query head n reads KV head
        n // (num_heads // num_kv_heads), as the reference's `repeat_kv` (no repeated K/V is materialised: query
        heads are grouped per KV head).
      mask: bool, broadcastable to [batch, q_len, kv_len]; True = may attend.
      scale: logit scale (head_dim ** -0.5 everywhere in Idefics2).
      implementation: None / "xla": plain XLA ops with jax.nn's conventions (`_attend`), query-blocked for long
        sequences, and a fused multiply-reduce for a single query (a decode step); anything else ("cudnn") goes
        straight to `jax.nn.dot_product_attention`.

    Returns: [batch, q_len, num_heads, head_dim]. Logits and softmax are computed in float32 as the reference.
    A query row whose keys are all masked gets a finite average (never NaN); only padding rows can be like that.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)
    if implementation not in (None, "xla"):
        if mask is not None:
            mask = jnp.broadcast_to(mask, (b, t, s))[:, None, :, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
    if t == 1:
        return _single_query_attention(q, k, v, mask, scale)
    if t > Q_BLOCK_MIN and b * n * t * s * 4 > BLOCKED_LOGITS_BYTES:
        return _blocked_attention(q, k, v, mask, scale)
    return _attention(q, k, v, mask, scale)


def _attention(q, k, v, mask, scale):
    """q [B, T, N, H], k / v [B, S, K, H], mask [B|1, T|1, S] or None: `_attend` in the head-major layout."""
    b, t, n, h = q.shape
    qh, kh, vh = _head_major(q, k, v)
    return _attend(qh, kh, vh, mask, scale).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _head_major(q, k, v):
    """q [B, T, N, H] -> [B, K, G, T, H] (query heads grouped per KV head: no repeated K/V); k / v -> [B, K, S, H]."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qh = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _attend(qh, kh, vh, mask, scale):
    """qh [B, K, G, T, H], kh / vh [B, K, S, H], mask [B|1, T|1, S] or None -> [B, K, G, T, H].

    Logits and softmax in float32; the softmax is normalised after the value product (divide [T, H] by the row
    sums instead of [T, S] by them), which saves a pass over the logits: the same math as jax.nn's XLA attention,
    1.5-2x faster on CPU (`python benchmarks/bench_attention.py`).
    """
    logits = jnp.einsum("bkgth,bksh->bkgts", qh, kh, preferred_element_type=jnp.float32) * jnp.float32(scale)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, MASKED_LOGIT)
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits)
    total = jnp.sum(weights, axis=-1)  # >= 1: the row maximum contributes exp(0)
    out = jnp.einsum("bkgts,bksh->bkgth", weights.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
    return (out / total[..., None]).astype(vh.dtype)


def _blocked_attention(q, k, v, mask, scale):
    """`_attend` over equal blocks of queries (a `lax.map`), each small enough that its logits stay under
    BLOCKED_LOGITS_BYTES: every block sees every key, so the softmax is exact, and only one block's logits exist
    at a time. K/V are put head-major once, outside the loop. Blocks are equal (ceil(T / blocks), a multiple of
    8), so at most 7 queries per block are padding."""
    b, t, n, h = q.shape
    row_bytes = b * n * k.shape[1] * 4
    rows = max(Q_BLOCK_MIN, min(Q_BLOCK_MAX, BLOCKED_LOGITS_BYTES // row_bytes))
    blocks = -(-t // rows)
    size = -(-t // blocks)
    size = -(-size // 8) * 8
    pad = blocks * size - t
    qh, kh, vh = _head_major(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))), k, v)
    qb = jnp.moveaxis(qh.reshape(*qh.shape[:3], blocks, size, h), 3, 0)  # [blocks, B, K, G, size, H]
    if mask is None or mask.shape[1] == 1:
        out = jax.lax.map(lambda qi: _attend(qi, kh, vh, mask, scale), qb)
    else:
        mb = jnp.broadcast_to(mask, (mask.shape[0], t, mask.shape[2]))
        mb = jnp.pad(mb, ((0, 0), (0, pad), (0, 0)), constant_values=True)
        mb = mb.reshape(mb.shape[0], blocks, size, mb.shape[2]).swapaxes(0, 1)
        out = jax.lax.map(lambda a: _attend(a[0], kh, vh, a[1], scale), (qb, mb))
    # [blocks, B, K, G, size, H] -> [B, blocks * size, K * G, H]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, blocks * size, n, h)
    return out[:, :t]


def _single_query_attention(q, k, v, mask, scale):
    """One query per sequence (a decode step): logits and output as fused multiply-reduce loops that read the
    KV cache once in its stored [B, S, K, H] layout (a dot would first copy it into a batch-major layout)."""
    b, _, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, 1, kv_heads, n // kv_heads, h).astype(jnp.float32)  # [B, 1, K, G, H]
    logits = jnp.sum(qg * k.astype(jnp.float32)[:, :, :, None, :], axis=-1) * jnp.float32(scale)  # [B, S, K, G]
    if mask is not None:
        logits = jnp.where(mask[:, 0, :, None, None], logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=1).astype(v.dtype)
    out = jnp.sum(probs[..., None].astype(jnp.float32) * v.astype(jnp.float32)[:, :, :, None, :], axis=1)
    return out.astype(v.dtype).reshape(b, 1, n, h)


def key_padding_mask(valid):
    """valid [batch, kv_len] bool -> [batch, 1, kv_len]: every query may see exactly the valid keys."""
    return jnp.asarray(valid, bool)[:, None, :]


def patch_mask(pixel_attention_mask, patch_size: int):
    """Pixel mask [..., H, W] -> patch mask [..., H // P, W // P] (numpy in, numpy out; otherwise jax).

    A patch is valid iff all P*P of its pixels are (the reference's rule since 4.45: `sum == P*P`; the older `> 0`
    rule made answers depend on batch padding). Pixels past (H // P) * P are ignored, as the valid conv does.
    """
    xp = np if isinstance(pixel_attention_mask, np.ndarray) else jnp
    *lead, h, w = pixel_attention_mask.shape
    hp, wp = h // patch_size, w // patch_size
    m = xp.asarray(pixel_attention_mask)[..., : hp * patch_size, : wp * patch_size].astype(bool)
    return m.reshape(*lead, hp, patch_size, wp, patch_size).all(axis=(-3, -1))


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
