"""The one attention function against torch's scaled_dot_product_attention with the reference's `repeat_kv`, on
every internal path: general, query-blocked (long sequences), single query (decode) and the jax.nn fallback."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from idefics2_jax.nn import attention
from idefics2_jax.nn.attention import dot_product_attention


def _reference(q, k, v, mask, scale):
    """transformers' sdpa path: repeat_kv, then F.scaled_dot_product_attention with a boolean mask."""
    groups = q.shape[2] // k.shape[2]
    tq, tk, tv = (torch.from_numpy(np.array(x, np.float32)).transpose(1, 2) for x in (q, k, v))
    tk, tv = tk.repeat_interleave(groups, dim=1), tv.repeat_interleave(groups, dim=1)
    m = None if mask is None else torch.from_numpy(
        np.broadcast_to(mask, (q.shape[0], q.shape[1], k.shape[1])).copy())[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=m, scale=scale)
    return out.transpose(1, 2).numpy()


def _inputs(b, t, s, n, kv, h, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h), np.float32)
    k = rng.standard_normal((b, s, kv, h), np.float32)
    v = rng.standard_normal((b, s, kv, h), np.float32)
    mask = rng.random((b, t, s)) < 0.7
    mask[..., 0] = True  # every row sees something (fully masked rows are tested separately)
    return q, k, v, mask


@pytest.mark.parametrize("t", [1, 7, 300])
@pytest.mark.parametrize("kv", [1, 2, 4])
def test_matches_reference_with_mask(t, kv):
    q, k, v, mask = _inputs(2, t, 33 if t == 1 else t, 4, kv, 8)
    out = dot_product_attention(q, k, v, mask, scale=8**-0.5)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask, 8**-0.5), atol=2e-5, rtol=1e-5)


def test_blocked_path_is_exact(monkeypatch):
    """Force query blocking (lax.map over 256-query blocks, the last one padded): same result as one block."""
    q, k, v, mask = _inputs(1, 600, 600, 4, 2, 8, seed=1)
    whole = np.asarray(dot_product_attention(q, k, v, mask, scale=0.3))
    monkeypatch.setattr(attention, "BLOCKED_LOGITS_BYTES", 0)
    called = []
    original = attention._blocked_attention
    monkeypatch.setattr(attention, "_blocked_attention", lambda *a: called.append(1) or original(*a))
    blocked = np.asarray(dot_product_attention(q, k, v, mask, scale=0.3))
    assert called, "the blocked path was not taken"
    np.testing.assert_allclose(blocked, whole, atol=1e-6)
    np.testing.assert_allclose(blocked, _reference(q, k, v, mask, 0.3), atol=2e-5, rtol=1e-5)
    # Key-only masks ([B, 1, S]) and no mask take the other branch of the blocked path.
    key_mask = mask[:, :1, :]
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, key_mask, scale=0.3)),
                               _reference(q, k, v, key_mask, 0.3), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, None, scale=0.3)),
                               _reference(q, k, v, None, 0.3), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 5])
def test_fully_masked_rows_are_finite_averages(t):
    """A padding row whose keys are all masked: jax.nn's convention (uniform average), never NaN."""
    q, k, v, mask = _inputs(2, t, 9, 4, 2, 8)
    mask[1] = False
    out = np.asarray(dot_product_attention(q, k, v, mask, scale=0.5))
    assert np.isfinite(out).all()
    expected = np.repeat(v[1].mean(0), 2, axis=0)  # [n, h]: query head i reads kv head i // 2
    np.testing.assert_allclose(out[1], np.broadcast_to(expected, out[1].shape), atol=1e-5)


def test_bfloat16_keeps_float32_softmax():
    q, k, v, mask = _inputs(1, 1, 40, 8, 2, 16)
    out = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask, scale=0.25)
    assert out.dtype == jnp.bfloat16
    ref = _reference(*(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (q, k, v)), mask, 0.25)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)


def test_matches_jax_nn_convention():
    """Same results as jax.nn.dot_product_attention, which serves any implementation other than None / "xla"
    (cudnn on GPU): switching implementation does not change the answer."""
    q, k, v, mask = _inputs(2, 6, 6, 4, 2, 8)
    ours = np.asarray(dot_product_attention(q, k, v, mask, scale=0.3))
    fallback = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[:, None], scale=0.3)
    np.testing.assert_allclose(ours, np.asarray(fallback), atol=1e-6)
