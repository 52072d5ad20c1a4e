"""The composed model: vision tower -> connector -> merge at `<image>` positions -> Mistral decoder -> lm_head."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Idefics2Config
from .connector import Connector
from .attention import patch_mask
from .partitioning import HIDDEN_AXES, LOGITS_AXES, constrain
from .text import TextModel
from .layers import Dense
from .vision import VisionTransformer

Dtype = Any
IGNORE_INDEX = -100


@flax.struct.dataclass
class Idefics2Output:
    logits: jax.Array | None  # [batch, seq, vocab] (None with return_hidden=True)
    loss: jax.Array | None = None  # scalar, when labels are given
    cache: dict | None = None  # the updated KV cache, when a cache was passed in
    hidden_states: jax.Array | None = None  # [batch, seq, hidden]: the final (normed) states, with return_hidden


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def real_image_mask(pixel_values):
    """[B, N, C, H, W] -> [B, N] bool: an image whose every value is 0.0 is padding (the reference's rule).
    numpy in, numpy out (host-side, no device op); otherwise jax."""
    xp = np if isinstance(pixel_values, np.ndarray) else jnp
    return xp.any(pixel_values != 0, axis=(2, 3, 4))


def validate_inputs(config: Idefics2Config, input_ids, attention_mask=None, pixel_values=None,
                    pixel_attention_mask=None, image_hidden_states=None, image_mask=None, *,
                    check_images: bool = True) -> None:
    """The one check of a model input: shapes always; `<image>` tokens against the images when the values are
    known (not under jit). Raises ValueError naming the argument or the first bad sample.

    The reference checks only the batch's total of image tokens, so a short sample silently shifts features into the
    next one; here each sample must have exactly image_seq_len tokens per real image.
    check_images=False skips the token count (a decode step has image tokens in its cache, not its input).
    """
    shape = np.shape(input_ids)
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {shape}")
    dtype = getattr(input_ids, "dtype", None) or np.asarray(input_ids).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {dtype}")
    b, t = shape
    if attention_mask is not None and tuple(np.shape(attention_mask)) != (b, t):
        raise ValueError(f"attention_mask must have shape {(b, t)}, got {tuple(np.shape(attention_mask))}")
    if pixel_values is not None:
        if np.ndim(pixel_values) != 5:
            raise ValueError(
                f"pixel_values must be [batch, num_images, channels, height, width] (the processor's layout), "
                f"got shape {np.shape(pixel_values)}")
        if np.shape(pixel_values)[0] != b:
            raise ValueError(f"pixel_values has batch {np.shape(pixel_values)[0]} but input_ids has batch {b}")
        if pixel_attention_mask is not None:
            expect = tuple(np.shape(pixel_values)[:2]) + tuple(np.shape(pixel_values)[3:])
            if tuple(np.shape(pixel_attention_mask)) != expect:
                raise ValueError(f"pixel_attention_mask must have shape {expect} for pixel_values of shape "
                                 f"{np.shape(pixel_values)}, got {np.shape(pixel_attention_mask)}")
    # The values, once on the host, where they are known (not under jit).
    ids = np.asarray(input_ids) if _is_concrete(input_ids) else None
    pixels = np.asarray(pixel_values) if pixel_values is not None and _is_concrete(pixel_values) else None
    if ids is not None:
        vocab = config.text_config.vocab_size
        bad = np.argwhere((ids < 0) | (ids >= vocab))
        if bad.size:  # an id >= vocab gives NaN logits under jit, a negative one wraps to another embedding row
            i, j = bad[0]
            raise ValueError(f"input_ids[{i}, {j}] = {ids[i, j]} is outside the vocabulary [0, {vocab}) "
                             f"({len(bad)} such ids)")
    if pixels is not None:
        finite = np.isfinite(pixels).all(axis=(2, 3, 4))
        if not finite.all():
            i, j = np.argwhere(~finite)[0]
            raise ValueError(f"pixel_values[{i}, {j}] has NaN or infinite values (the image would give an empty or "
                             "garbage answer)")
    images, source = None, "pixel_values"
    if image_hidden_states is not None:
        if pixel_values is not None:
            raise ValueError("pass pixel_values or image_hidden_states, not both")
        expect = (b, config.image_seq_len, config.text_config.hidden_size)
        hs = tuple(np.shape(image_hidden_states))
        if len(hs) != 4 or (hs[0], hs[2], hs[3]) != expect:
            raise ValueError(f"image_hidden_states must be [batch={b}, images, {expect[1]}, {expect[2]}], "
                             f"got shape {hs}")
        if image_mask is not None and tuple(np.shape(image_mask)) != hs[:2]:
            raise ValueError(f"image_mask must have shape {hs[:2]}, got {tuple(np.shape(image_mask))}")
        source = "image_hidden_states / image_mask"
        if image_mask is None:
            images = np.full(b, hs[1])
        elif _is_concrete(image_mask):
            images = np.sum(np.asarray(image_mask, bool), axis=1)
    elif pixel_values is not None:
        if pixels is not None:
            images = real_image_mask(pixels).sum(axis=1)
    else:
        images = np.zeros(b, np.int64)
    if not check_images or images is None or ids is None:
        return
    tokens = (ids == config.image_token_id).sum(axis=1)
    for i in np.flatnonzero(tokens != images * config.image_seq_len)[:1]:
        n = int(images[i])
        raise ValueError(
            f"sample {i}: {tokens[i]} <image> tokens in input_ids but {n} image(s) in {source}, which need "
            f"{n * config.image_seq_len} (= {n} x {config.image_seq_len}); build inputs with Idefics2Processor")


def merge_image_features(embeds, input_ids, features, real, image_token_id: int):
    """Place each sample's own image features at its `<image>` positions (static shapes, no cross-sample shift).

    embeds [B, T, D]; features [B, N, L, D] for N image slots of L tokens; real [B, N] marks non-padding slots.
    The k-th `<image>` token of sample b takes token k % L of the (k // L)-th *real* image of sample b.
    Returns (merged embeds, ok [B]) where ok is False for a sample whose token count does not match its images.
    """
    b, n, length, d = features.shape
    is_img = input_ids == image_token_id
    # Real images first, in their original order (padding slots may sit anywhere in the reference's rule).
    order = jnp.argsort(~real, axis=1, stable=True)
    features = jnp.take_along_axis(features, order[:, :, None, None], axis=1).reshape(b, n * length, d)
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, max(n * length - 1, 0))
    gathered = jnp.take_along_axis(features, idx[:, :, None], axis=1).astype(embeds.dtype)
    ok = jnp.sum(is_img, axis=1) == jnp.sum(real, axis=1) * length
    return jnp.where(is_img[:, :, None], gathered, embeds), ok


def causal_lm_nll(logits, labels):
    """(summed next-token NLL, number of labelled targets): shift by one, ignore -100. Sums let gradient
    accumulation and data-parallel shards weight every token alike (transformers' `num_items_in_batch`)."""
    return token_nll(logits[:, :-1], labels[:, 1:])


def token_nll(logits, labels):
    """(summed NLL of `labels` under `logits`, count) for aligned logits [..., V] and labels [...]; -100 ignored."""
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def causal_lm_loss(logits, labels):
    """transformers' ForCausalLMLoss: shift by one, ignore -100, mean over the rest (NaN if nothing is left)."""
    total, count = causal_lm_nll(logits, labels)
    return total / count


class Idefics2ForConditionalGeneration(nn.Module):
    """Idefics2 with a language-modelling head; `apply` takes the HF processor's layout.

    dtype: compute (and parameter) dtype; norms and softmax run in float32 as in the reference.
    attention_impl: passed to `jax.nn.dot_product_attention` (None = XLA; "cudnn" on GPU).
    generation_config: the checkpoint's generation_config.json as a `GenerationConfig` (None: the config's ids).
    """

    config: Idefics2Config
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    # The checkpoint's `generation.GenerationConfig` (set by `load_model`), the defaults `generate` uses.
    generation_config: Any = None
    # Recompute vision, perceiver and decoder layers in the backward pass (training memory; `layers.remat_layer`).
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.vision_model = VisionTransformer(cfg.vision_config, self.dtype, self.attention_impl, self.remat)
        self.connector = Connector(cfg, self.dtype, self.attention_impl, self.remat)
        self.text_model = TextModel(cfg.text_config, self.dtype, self.attention_impl, self.remat)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.text_config.vocab_size, dtype=self.dtype)

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        """pixel_values [B, N, C, H, W], pixel_attention_mask [B, N, H, W] -> image tokens [B, N, n_latents, D].

        Every slot is computed (padding slots too, then ignored by the merge): static shapes for jit.
        """
        b, n, c, h, w = pixel_values.shape
        pixels = jnp.asarray(pixel_values).reshape(b * n, c, h, w).astype(self.dtype).transpose(0, 2, 3, 1)
        if pixel_attention_mask is None:
            pixel_attention_mask = jnp.ones((b * n, h, w), bool)
        pmask = jnp.asarray(pixel_attention_mask).reshape(b * n, h, w)
        # The vision tower is data-parallel over images (each image's patches stay on one device).
        pixels = constrain(pixels, ("images", None, None, None))
        pmask = constrain(pmask, ("images", None, None))
        patch_valid = patch_mask(pmask, self.config.vision_config.patch_size)
        features = self.vision_model(pixels, patch_valid)
        tokens = self.connector(features, patch_valid.reshape(b * n, -1))
        return tokens.reshape(b, n, *tokens.shape[1:])

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.text_model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def _embed(self, input_ids, pixel_values, pixel_attention_mask, image_hidden_states, image_mask):
        """Token embeddings with each sample's image features merged in; and ok [B] (None without images)."""
        cfg = self.config
        x = self.text_model.embed(input_ids)
        ok = None
        if pixel_values is not None:
            pixel_values = jnp.asarray(pixel_values)
            features = self.encode_images(pixel_values, pixel_attention_mask)
            x, ok = merge_image_features(x, input_ids, features, real_image_mask(pixel_values), cfg.image_token_id)
        elif image_hidden_states is not None:
            if image_mask is None:
                image_mask = jnp.ones(np.shape(image_hidden_states)[:2], bool)
            x, ok = merge_image_features(x, input_ids, jnp.asarray(image_hidden_states), jnp.asarray(image_mask, bool),
                                         cfg.image_token_id)
        return constrain(x, HIDDEN_AXES), ok

    def _decoder(self, x, ok, token_valid, position_ids, cache_positions, cache, mode, logits_to_keep, labels=None,
                 return_hidden=False):
        b, t = token_valid.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(cache_positions, (b, t))
        hidden, new_cache = self.text_model(x, jnp.asarray(position_ids), token_valid, cache_positions, cache, mode)
        if return_hidden:
            if labels is not None or logits_to_keep is not None:
                raise ValueError("return_hidden computes no logits: it takes neither labels nor logits_to_keep")
            if ok is not None:
                hidden = jnp.where(ok[:, None, None], hidden, jnp.nan)
            return Idefics2Output(logits=None, cache=new_cache, hidden_states=hidden)
        if logits_to_keep is not None:
            if labels is not None:
                raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
            hidden = hidden[:, -logits_to_keep:]
        logits = constrain(self.logits(hidden), LOGITS_AXES)
        if ok is not None:
            # Under jit `validate_inputs` cannot see values: a mismatched sample gets NaN logits, never a wrong answer.
            logits = jnp.where(ok[:, None, None], logits, jnp.nan)
        loss = None if labels is None else causal_lm_loss(logits, jnp.asarray(labels))
        return Idefics2Output(logits=logits, loss=loss, cache=new_cache)

    @staticmethod
    def _token_valid(attention_mask, shape):
        if attention_mask is None:
            return jnp.ones(shape, bool)
        return jnp.asarray(attention_mask).astype(bool)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, labels=None,
                 *, position_ids=None, cache=None, cache_index=0, logits_to_keep: int | None = None,
                 image_hidden_states=None, image_mask=None, return_hidden: bool = False):
        """The forward pass and loss (the reference's `forward`).

        input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding; default all ones);
        pixel_values [B, N, 3, H, W] float; pixel_attention_mask [B, N, H, W] int/bool; labels [B, T] (-100 ignored).
        position_ids [B, T]: RoPE positions (default `cache_index + arange(T)`, as the reference's forward).
        cache / cache_index: a KV cache (`text.init_cache`) whose entries come before input_ids, and the cache
        position of input_ids[:, 0]: the tokens attend to [cache ; themselves] and the updated cache is returned in
        `out.cache` (the "extend" mode). To start a sequence in a cache use `prefill`; for one token, `decode_step`.
        logits_to_keep: compute logits for the last N positions only; not with labels.
        return_hidden: return the final hidden states (`out.hidden_states`) and no logits (`self.logits(h)` maps
        them; the trainer's chunked loss uses it).
        image_hidden_states [B, N, L, D] and image_mask [B, N] bool (default all True): image tokens already computed
        by `encode_images` (as the reference's `image_hidden_states`), instead of pixel_values; slots with
        image_mask False are padding.
        """
        validate_inputs(self.config, input_ids, attention_mask, pixel_values, pixel_attention_mask,
                        image_hidden_states, image_mask, check_images=cache is None or pixel_values is not None
                        or image_hidden_states is not None)
        input_ids = jnp.asarray(input_ids)
        token_valid = self._token_valid(attention_mask, input_ids.shape)
        x, ok = self._embed(input_ids, pixel_values, pixel_attention_mask, image_hidden_states, image_mask)
        cache_positions = cache_index + jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        return self._decoder(x, ok, token_valid, position_ids, cache_positions, cache,
                             "forward" if cache is None else "extend", logits_to_keep, labels, return_hidden)

    def prefill(self, input_ids, attention_mask, position_ids, cache, *, pixel_values=None, pixel_attention_mask=None,
                image_hidden_states=None, image_mask=None, logits_to_keep: int | None = 1):
        """Start a sequence: the prompt [B, T] fills cache positions 0..T-1 of `cache` (`text.init_cache`; its old
        entries are dropped, never attended). Returns `Idefics2Output` with the last `logits_to_keep` logits and the
        new cache. Images as in `__call__` (pixels, or image tokens from `encode_images`)."""
        validate_inputs(self.config, input_ids, attention_mask, pixel_values, pixel_attention_mask,
                        image_hidden_states, image_mask)
        input_ids = jnp.asarray(input_ids)
        token_valid = self._token_valid(attention_mask, input_ids.shape)
        x, ok = self._embed(input_ids, pixel_values, pixel_attention_mask, image_hidden_states, image_mask)
        cache_positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        return self._decoder(x, ok, token_valid, position_ids, cache_positions, cache, "prefill", logits_to_keep)

    def decode_step(self, token_ids, position_ids, cache, cache_index):
        """One new token per row: token_ids [B, 1] at RoPE positions position_ids [B, 1], written at cache position
        `cache_index` (a traced scalar is fine: one program for every step). Returns `Idefics2Output` with logits
        [B, 1, V] and the updated cache."""
        validate_inputs(self.config, token_ids, check_images=False)
        token_ids = jnp.asarray(token_ids)
        if token_ids.shape[1] != 1:
            raise ValueError(f"decode_step takes one token per row ([batch, 1]), got shape {token_ids.shape}")
        token_valid = jnp.ones(token_ids.shape, bool)
        x = constrain(self.text_model.embed(token_ids), HIDDEN_AXES)
        cache_positions = cache_index + jnp.arange(1, dtype=jnp.int32)
        return self._decoder(x, None, token_valid, position_ids, cache_positions, cache, "decode", None)
