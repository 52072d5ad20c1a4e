"""Mistral decoder parity (REFERENCE §5): one decoder layer with RoPE and GQA, and the 5.x sliding-window mask."""

import jax.numpy as jnp
import numpy as np
import torch
from transformers import masking_utils

from idefics2_jax.nn.attention import sliding_window_mask
from idefics2_jax.nn.text import DecoderLayer, rope


def test_sliding_window_mask_matches_5x_rule():
    # transformers 5.x: key k visible to query q iff 0 <= q - k <= W - 1 (W keys including itself).
    window, length = 4, 10
    fn = masking_utils.sliding_window_causal_mask_function(window)
    t = torch.tensor
    ref = np.array([[bool(fn(t(0), t(0), t(q), t(k))) for k in range(length)] for q in range(length)])
    ours = np.asarray(sliding_window_mask(jnp.arange(length), jnp.arange(length), window))
    np.testing.assert_array_equal(ours, ref)
    assert ours.sum(axis=1).max() == window


def test_rope_matches_reference(tiny_torch):
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    text = tiny_torch.model.text_model
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 7, 16)).astype(np.float32)  # [B, N, T, H] torch layout
    pos = np.stack([np.arange(7), np.arange(7) + 300])
    with torch.no_grad():
        cos, sin = text.rotary_emb(torch.from_numpy(q), torch.from_numpy(pos))
        ref, _ = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), cos, sin)
    theta = tiny_torch.config.text_config.rope_parameters["rope_theta"]
    ours = rope(jnp.asarray(q.transpose(0, 2, 1, 3)), jnp.asarray(pos), theta)
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 2, 1, 3), ref.numpy(), atol=1e-5)


def test_decoder_layer_parity(tiny_torch, tiny_jax):
    model, params = tiny_jax
    cfg = model.config.text_config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA exercised
    layer = tiny_torch.model.text_model.layers[1]
    rng = np.random.default_rng(4)
    b, t = 2, 24  # longer than the window (16)
    x = rng.standard_normal((b, t, cfg.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t), (b, t)).copy()
    mask = np.asarray(sliding_window_mask(jnp.arange(t), jnp.arange(t), cfg.sliding_window))
    with torch.no_grad():
        cos_sin = tiny_torch.model.text_model.rotary_emb(torch.from_numpy(x), torch.from_numpy(pos))
        additive = torch.from_numpy(np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32))[None, None]
        ref = layer(torch.from_numpy(x), attention_mask=additive, position_embeddings=cos_sin).numpy()
    ours, _ = DecoderLayer(cfg).apply({"params": params["text_model"]["layers_1"]}, jnp.asarray(x), jnp.asarray(pos),
                                      jnp.asarray(mask)[None])
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.5
