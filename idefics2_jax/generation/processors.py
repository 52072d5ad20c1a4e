"""Logits processors and samplers, in transformers' order (`generation/logits_process.py`)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------------------- logits processors
# Tiny pure functions on float32 logits [batch, vocab], each equal to its transformers counterpart.
def apply_repetition_penalty(logits, seen, penalty):
    """RepetitionPenaltyLogitsProcessor: seen [batch, vocab] bool marks tokens already in the sequence."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def apply_bad_words(logits, context, single_bias, multi_words: Sequence[tuple[int, ...]] = ()):
    """NoBadWordsLogitsProcessor: single_bias [vocab] is -inf at banned single tokens (0 elsewhere); a multi-token
    word bans its last token when its prefix ends `context` [batch, P] (the latest tokens; -1 = before the input)."""
    logits = jnp.asarray(logits) + single_bias
    for word in multi_words:
        prefix = jnp.asarray(word[:-1], jnp.int32)
        match = jnp.all(jnp.asarray(context)[:, context.shape[1] - len(prefix):] == prefix, axis=1)
        logits = logits.at[:, word[-1]].add(jnp.where(match, -jnp.inf, 0.0))
    return logits


def apply_temperature(logits, temperature):
    """TemperatureLogitsWarper (temperature 1.0 is exactly the identity)."""
    return logits / temperature


def apply_top_k(logits, top_k):
    """TopKLogitsWarper: keep every logit >= the k-th largest (ties kept); top_k <= 0 keeps everything.
    `top_k` may be traced (one program for every k)."""
    vocab = logits.shape[-1]
    k = jnp.clip(top_k, 1, vocab)
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), jnp.broadcast_to(vocab - k, logits.shape[:-1])[..., None],
                              axis=-1)
    return jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)


def apply_top_p(logits, top_p):
    """TopPLogitsWarper: drop the low tail whose ascending cumulative probability is <= 1 - top_p (the top token is
    always kept); top_p >= 1 keeps everything. `top_p` may be traced."""
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = (cumulative <= 1 - top_p).at[..., -1].set(False)
    # cumulative is non-decreasing, so the removed entries are a prefix; the first kept one is the threshold.
    first_kept = jnp.sum(removed, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ascending, first_kept, axis=-1)
    return jnp.where((top_p < 1) & (logits < threshold), -jnp.inf, logits)


def greedy(logits):
    """argmax, first index on ties (as torch.argmax)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample(logits, keys):
    """One draw per row from softmax(logits); keys: one typed PRNG key per row."""
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
