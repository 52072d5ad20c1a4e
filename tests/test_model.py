"""End-to-end parity of Idefics2ForConditionalGeneration with transformers (REFERENCE §2-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import idefics2_jax

import reference as R

SEQ = 8  # tiny perceiver latents per image


@pytest.fixture(scope="module")
def batch():
    """2 / 0 / 1 images, left padding, image sides not multiples of 14, prompts longer than the window (16)."""
    rng = np.random.default_rng(0)
    seqs = [R.image_prompt(rng, 2, SEQ, 5), R.image_prompt(rng, 0, SEQ, 30), R.image_prompt(rng, 1, SEQ, 7)]
    ids, mask = R.left_pad(seqs)
    pv, pm = R.make_pixels(rng, [[(45, 60), (70, 33)], [], [(60, 75)]])
    labels = np.where(mask == 1, ids, -100)
    labels[0, -3:] = -100
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pm, labels=labels)


def _torch_out(model, batch, grads=False):
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    if grads:
        return model(**t)
    with torch.no_grad():
        return model(**t)


def test_logits_and_loss_parity(tiny_torch, tiny_jax, batch):
    model, params = tiny_jax
    assert batch["input_ids"].shape[1] > model.config.text_config.sliding_window
    ref = _torch_out(tiny_torch, batch)
    out = model.apply({"params": params}, **batch)
    valid = batch["attention_mask"].astype(bool)
    got, want = np.asarray(out.logits), ref.logits.numpy()
    assert np.abs(want[valid]).max() > 1.0  # O(1) logits
    assert np.abs(got - want)[valid].max() <= 1e-4
    np.testing.assert_array_equal(got.argmax(-1)[valid], want.argmax(-1)[valid])
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-4 * abs(ref.loss.item())


def test_jit_matches_eager(tiny_jax, batch):
    model, params = tiny_jax
    eager = model.apply({"params": params}, **batch).logits
    jitted = jax.jit(lambda p, b: model.apply({"params": p}, **b).logits)(params, batch)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


def test_gradients_match_torch_autograd(tiny_torch, tiny_jax, batch):
    model, params = tiny_jax
    # A left-padded row's first real token is "predicted" from a padding position, whose attention row is fully
    # masked: the forward value is a constant (uniform weights) in both implementations, but torch's autograd
    # differentiates `logits + finfo.min` as if it were not, so that one degenerate term has no reference gradient.
    # Ignore it, as a careful fine-tuning setup would.
    batch = dict(batch)
    labels = batch["labels"].copy()
    first = np.argmax(batch["attention_mask"] == 1, axis=1)
    labels[np.arange(len(labels)), first] = -100
    batch["labels"] = labels
    tiny_torch.zero_grad()
    ref = _torch_out(tiny_torch, batch, grads=True)
    ref.loss.backward()
    grads = jax.grad(lambda p: model.apply({"params": p}, **batch).loss)(params)
    named = dict(tiny_torch.named_parameters())
    text0, vision0 = grads["text_model"]["layers_0"], grads["vision_model"]["encoder"]["layers_0"]
    checks = {
        "lm_head.weight": grads["lm_head"]["kernel"].T,
        "model.text_model.layers.0.self_attn.q_proj.weight": text0["self_attn"]["q_proj"]["kernel"].T,
        "model.text_model.embed_tokens.weight": grads["text_model"]["embed_tokens"]["embedding"],
        "model.connector.perceiver_resampler.latents": grads["connector"]["perceiver_resampler"]["latents"],
        "model.vision_model.encoder.layers.0.mlp.fc1.weight": vision0["mlp"]["fc1"]["kernel"].T,
        "model.vision_model.embeddings.patch_embedding.weight": jnp.transpose(
            grads["vision_model"]["embeddings"]["patch_embedding"]["kernel"], (3, 2, 0, 1)),
    }
    for name, ours in checks.items():
        want = named[name].grad.numpy()
        assert np.abs(want).max() > 0, name
        rel = np.abs(np.asarray(ours) - want).max() / np.abs(want).max()
        assert rel <= 1e-4, (name, rel)


def test_bfloat16_close_to_float32(tiny_torch, tiny_dir, tiny_jax, batch):
    """bf16 keeps ~3 significant digits, so logits drift; ours may drift at most 2x as far as the reference's own
    bf16 run does from its fp32 run (plus a small floor), and nothing may overflow."""
    model32, params32 = tiny_jax
    model16, params16 = idefics2_jax.load_model(tiny_dir, dtype="bfloat16")
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.bfloat16
    valid = batch["attention_mask"].astype(bool)
    f32 = np.asarray(model32.apply({"params": params32}, **batch).logits)
    b16 = np.asarray(model16.apply({"params": params16}, **batch).logits.astype(jnp.float32))
    assert np.isfinite(b16[valid]).all()
    torch16 = R.build_torch_model(R.tiny_config_dict(), seed=0).to(torch.bfloat16)
    ref16 = _torch_out(torch16, batch).logits.float().numpy()
    ours_err = np.abs(b16 - f32)[valid].max()
    ref_err = np.abs(ref16 - f32)[valid].max()
    assert ours_err <= 2 * ref_err + 0.05, (ours_err, ref_err)


def test_mismatched_image_tokens_raise_naming_the_sample(tiny_jax, batch):
    model, params = tiny_jax
    bad = dict(batch)
    ids = batch["input_ids"].copy()
    first = int(np.argmax(ids[2] == R.IMAGE_TOKEN))
    ids[2, first] = 5  # sample 2 now has one <image> token too few
    bad["input_ids"] = ids
    with pytest.raises(ValueError, match=r"sample 2: 7 <image> tokens .* 1 image"):
        model.apply({"params": params}, **bad)


def test_mismatch_under_jit_poisons_only_that_sample(tiny_jax, batch):
    """Under jit the check cannot raise; the sample's logits become NaN instead of borrowing another's features."""
    model, params = tiny_jax
    bad = dict(batch)
    ids = batch["input_ids"].copy()
    ids[0, int(np.argmax(ids[0] == R.IMAGE_TOKEN))] = 5
    bad["input_ids"] = ids
    logits = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, **b).logits)(params, bad))
    assert np.isnan(logits[0]).all()
    good = np.asarray(model.apply({"params": params}, **batch).logits)
    np.testing.assert_allclose(logits[1:], good[1:], atol=1e-5)


def test_image_tokens_without_pixels_raise(tiny_jax, batch):
    model, params = tiny_jax
    with pytest.raises(ValueError, match="sample 0: 16 <image> tokens"):
        model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


def test_pixel_values_wrong_rank_raises(tiny_jax, batch):
    model, params = tiny_jax
    with pytest.raises(ValueError, match="pixel_values must be"):
        model.apply({"params": params}, batch["input_ids"], pixel_values=batch["pixel_values"][:, 0])


def test_out_of_vocabulary_ids_and_non_finite_pixels_raise(tiny_jax, batch):
    """Without the check an id >= vocab gives NaN logits and a negative one reads another embedding row (jnp's
    negative indexing), NaN pixels an empty answer: all silently wrong."""
    model, params = tiny_jax
    vocab = model.config.text_config.vocab_size
    for value in (vocab, -1):
        ids = batch["input_ids"].copy()
        ids[1, -1] = value
        with pytest.raises(ValueError, match=rf"input_ids\[1, {ids.shape[1] - 1}\] = {value} is outside"):
            model.apply({"params": params}, **{**batch, "input_ids": ids})
    for value in (np.nan, np.inf):
        pv = batch["pixel_values"].copy()
        pv[2, 0, 1, 3, 4] = value
        with pytest.raises(ValueError, match=r"pixel_values\[2, 0\] has NaN or infinite"):
            model.apply({"params": params}, **{**batch, "pixel_values": pv})


def test_padding_image_slots_anywhere_are_ignored(tiny_jax):
    """An all-zero image is padding wherever it sits (the reference drops it); features stay in order."""
    model, params = tiny_jax
    rng = np.random.default_rng(5)
    ids = np.array([R.image_prompt(rng, 1, SEQ, 4)])
    pv, pm = R.make_pixels(rng, [[(40, 50)]])
    ref = np.asarray(model.apply({"params": params}, ids, pixel_values=pv, pixel_attention_mask=pm).logits)
    pv2 = np.concatenate([np.zeros_like(pv), pv], axis=1)
    pm2 = np.concatenate([np.zeros_like(pm), pm], axis=1)
    got = np.asarray(model.apply({"params": params}, ids, pixel_values=pv2, pixel_attention_mask=pm2).logits)
    np.testing.assert_allclose(got, ref, atol=1e-5)
