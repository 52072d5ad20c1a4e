"""Vision tower parity, block by block (REFERENCE §2): patch mask, NaViT position ids, embeddings, encoder."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.idefics2 import modeling_idefics2 as hf

from idefics2_jax.nn.attention import patch_mask
from idefics2_jax.nn.vision import VisionEmbeddings, VisionTransformer, position_ids


def _torch_position_ids(num_side, masks):
    """The reference's position ids, read off its embeddings: zero conv, identity-like position table."""
    cfg = hf.Idefics2VisionConfig(hidden_size=1, patch_size=1, image_size=num_side, num_channels=1)
    emb = hf.Idefics2VisionEmbeddings(cfg)
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(num_side**2, dtype=torch.float32)[:, None])
        n, h, w = masks.shape
        out = emb(torch.zeros(n, 1, h, w), torch.from_numpy(masks))
    return out[..., 0].numpy().astype(np.int64)


def test_position_ids_every_count_on_the_real_70_grid():
    # Every valid row count 1..70 paired with a column count (the two axes bucket independently), padded to 70x70.
    masks = np.zeros((70, 70, 70), bool)
    for i in range(70):
        masks[i, : i + 1, : 70 - i] = True
    ours = np.asarray(position_ids(jnp.asarray(masks), 70))
    np.testing.assert_array_equal(ours, _torch_position_ids(70, masks))


@pytest.mark.parametrize("side", [4, 16, 32, 64])
def test_position_ids_other_grids(side):
    masks = np.zeros((side, side, side), bool)
    for i in range(side):
        masks[i, : i + 1, : side - i] = True
    np.testing.assert_array_equal(np.asarray(position_ids(jnp.asarray(masks), side)), _torch_position_ids(side, masks))


def test_patch_mask_needs_every_pixel():
    # Since 4.45 (PR #33499) a patch is valid iff all P*P pixels are; `> 0` gave batch-dependent answers.
    m = np.zeros((1, 30, 45), np.int64)
    m[0, :28, :29] = 1  # 2 full patch rows; the third column of patches has 1 valid pixel column only
    got = np.asarray(patch_mask(jnp.asarray(m), 14))
    assert got.shape == (1, 2, 3)
    np.testing.assert_array_equal(got[0], [[True, True, False], [True, True, False]])


def _vision_inputs(rng, sizes, height, width):
    pixels = np.zeros((len(sizes), 3, height, width), np.float32)
    pmask = np.zeros((len(sizes), height, width), bool)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = rng.uniform(-1, 1, (3, h, w))
        pmask[i, :h, :w] = True
    return pixels, pmask


def test_embeddings_and_encoder_parity(tiny_torch, tiny_jax):
    """Embeddings, then the whole tower, on images whose sides are not multiples of 14."""
    model, params = tiny_jax
    vm = tiny_torch.model.vision_model
    rng = np.random.default_rng(1)
    pixels, pmask = _vision_inputs(rng, [(45, 60), (70, 33), (98, 98)], 100, 100)
    pv = np.array(patch_mask(jnp.asarray(pmask), 14))
    with torch.no_grad():
        ref_emb = vm.embeddings(torch.from_numpy(pixels), torch.from_numpy(pv)).numpy()
        ref_out = vm(torch.from_numpy(pixels), patch_attention_mask=torch.from_numpy(pv)).last_hidden_state.numpy()
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    cfg = model.config.vision_config
    emb = VisionEmbeddings(cfg).apply({"params": params["vision_model"]["embeddings"]}, nhwc, jnp.asarray(pv))
    np.testing.assert_allclose(np.asarray(emb), ref_emb, atol=1e-5, rtol=0)
    out = np.asarray(VisionTransformer(cfg).apply({"params": params["vision_model"]}, nhwc, jnp.asarray(pv)))
    valid = pv.reshape(len(pv), -1)  # padded patches are free to differ; the perceiver never sees them
    np.testing.assert_allclose(out[valid], ref_out[valid], atol=1e-4, rtol=0)
    assert np.abs(ref_out[valid]).max() > 0.5  # O(1) activations: the tolerance means something
