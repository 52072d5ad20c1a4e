"""Connector parity (REFERENCE §3): SwiGLU modality projection + perceiver resampler with GQA and a patch mask."""

import jax.numpy as jnp
import numpy as np
import torch

from idefics2_jax.nn.connector import Connector


def test_connector_parity(tiny_torch, tiny_jax):
    model, params = tiny_jax
    cfg = model.config
    assert cfg.perceiver_config.num_key_value_heads < cfg.perceiver_config.resampler_n_heads  # GQA exercised
    rng = np.random.default_rng(2)
    n, length = 3, 20
    feats = rng.standard_normal((n, length, cfg.vision_config.hidden_size)).astype(np.float32)
    valid = np.ones((n, length), bool)
    valid[1, 12:] = False  # padded patches must be hidden from the latents
    valid[2, 5:] = False
    with torch.no_grad():
        ref = tiny_torch.model.connector(torch.from_numpy(feats), attention_mask=torch.from_numpy(valid)).numpy()
    out = np.asarray(Connector(cfg).apply({"params": params["connector"]}, jnp.asarray(feats), jnp.asarray(valid)))
    assert out.shape == (n, cfg.perceiver_config.resampler_n_latents, cfg.text_config.hidden_size)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.5


def test_padded_patches_do_not_leak(tiny_jax):
    model, params = tiny_jax
    cfg = model.config
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((1, 10, cfg.vision_config.hidden_size)).astype(np.float32)
    valid = np.array([[True] * 6 + [False] * 4])
    noisy = feats.copy()
    noisy[:, 6:] = 100.0
    def apply(f):
        return np.asarray(Connector(cfg).apply({"params": params["connector"]}, jnp.asarray(f), jnp.asarray(valid)))

    np.testing.assert_allclose(apply(feats), apply(noisy), atol=1e-5)
