"""The two compiled programs (prefill, decode) and JAX's persistent compilation cache."""

from __future__ import annotations

import dataclasses
import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ..nn.partitioning import constrain
from ..nn.text import init_cache
from .processors import (apply_bad_words, apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                         greedy, sample)

COMPILATION_CACHE_ENV = "IDEFICS2_JAX_COMPILATION_CACHE"


# --------------------------------------------------------------------------------------------- compiled steps
@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static switches of a program (part of its compile key)."""

    do_sample: bool
    top_k_top_p: bool
    penalty: bool
    eos: tuple[int, ...]
    pad: int
    bad_single: tuple[int, ...]
    bad_multi: tuple[tuple[int, ...], ...]

    @property
    def context_len(self) -> int:
        return max((len(w) - 1 for w in self.bad_multi), default=0)


@flax.struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B, N] int32 new tokens (pad where not generated)
    cache: dict
    done: jax.Array  # [B] bool
    step: jax.Array  # () int32: tokens generated so far
    last_position: jax.Array  # [B] int32 RoPE position of the last prompt token
    prompt_len: jax.Array  # () int32: cache position of the first new token
    keys: jax.Array  # [B] typed PRNG keys, one per row
    seen: jax.Array | None  # [B, V] bool (repetition penalty)
    context: jax.Array | None  # [B, P] int32 latest tokens (multi-token bad words)


def process_logits(spec: _Spec, logits, seen, context, opts):
    """transformers' logits-processor chain, in its order: repetition penalty, bad words, then (sampling only)
    temperature, top-k, top-p. logits [B, V] float32; seen [B, V] bool; context [B, P] int32."""
    if spec.penalty:
        logits = apply_repetition_penalty(logits, seen, opts["repetition_penalty"])
    if spec.bad_single or spec.bad_multi:
        single = np.zeros(logits.shape[-1], np.float32)
        single[list(spec.bad_single)] = -np.inf
        logits = apply_bad_words(logits, context, jnp.asarray(single), spec.bad_multi)
    if spec.do_sample:
        logits = apply_temperature(logits, opts["temperature"])
        if spec.top_k_top_p:
            logits = apply_top_p(apply_top_k(logits, opts["top_k"]), opts["top_p"])
    return logits


def _select(spec: _Spec, state: DecodeState, logits, opts) -> DecodeState:
    """Process the step's float32 logits [B, V], pick the next token, and record it."""
    logits = process_logits(spec, logits, state.seen, state.context, opts)
    if spec.do_sample:
        keys = jax.vmap(jax.random.fold_in, (0, None))(state.keys, state.step)
        token = sample(logits, keys)
    else:
        token = greedy(logits)
    done = state.done
    if spec.eos:
        token = jnp.where(done, spec.pad, token)
        done = done | jnp.isin(token, jnp.asarray(spec.eos, jnp.int32))
    rows = jnp.arange(token.shape[0])
    return state.replace(
        tokens=jax.lax.dynamic_update_index_in_dim(state.tokens, token, state.step, axis=1),
        done=done,
        step=state.step + 1,
        seen=None if state.seen is None else state.seen.at[rows, token].set(True),
        context=None if state.context is None else jnp.concatenate([state.context[:, 1:], token[:, None]], axis=1),
    )


def _snapshot(state: DecodeState):
    # Tokens replicated on a mesh, so every host can read them (a batch-split array is not fully addressable).
    return constrain(state.tokens, (None, None)), state.step, jnp.all(state.done)


@functools.partial(jax.jit, static_argnames=("model", "spec", "cache_len", "new_len"))
def _prefill(params, batch, opts, *, model, spec: _Spec, cache_len: int, new_len: int):
    ids = batch["input_ids"]
    b, t = ids.shape
    cache = init_cache(model.config.text_config, b, cache_len, model.dtype)
    images = None
    if "image_groups" in batch:
        # The vision tower and connector once per same-sized group, scattered into [B, slots, L, D].
        slots = batch["image_mask"].shape[1]
        images = jnp.zeros((b * slots, model.config.image_seq_len, model.config.text_config.hidden_size),
                           model.dtype)
        for group in batch["image_groups"]:
            tokens = model.apply({"params": params}, group["pixel_values"][:, None],
                                 group["pixel_attention_mask"][:, None], method=type(model).encode_images)
            images = images.at[group["index"]].set(tokens[:, 0].astype(images.dtype), mode="drop")
        images = images.reshape(b, slots, *images.shape[1:])
    out = model.apply({"params": params}, ids, batch["attention_mask"], batch["positions"], cache,
                      image_hidden_states=images, image_mask=batch.get("image_mask"), method=type(model).prefill)
    seen = None
    if spec.penalty:
        vocab = out.logits.shape[-1]
        # Ids outside the logits' vocabulary cannot be generated: dropped, as transformers drops them.
        seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], ids].max(batch["counted"], mode="drop")
    state = DecodeState(
        tokens=jnp.full((b, new_len), spec.pad, jnp.int32),
        cache=out.cache,
        done=~batch["live"],
        step=jnp.zeros((), jnp.int32),
        last_position=batch["positions"][:, -1],
        prompt_len=jnp.asarray(t, jnp.int32),
        keys=jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(batch["seed"]), jnp.arange(b)),
        seen=seen,
        context=batch.get("context"),
    )
    state = _select(spec, state, out.logits[:, -1].astype(jnp.float32), opts)
    return state, _snapshot(state)


@functools.partial(jax.jit, static_argnames=("model", "spec"), donate_argnames=("state",))
def _decode(params, state: DecodeState, stop, opts, *, model, spec: _Spec):
    """Generate until `stop` tokens exist or every row is done. Returns the state and a separate snapshot
    (tokens, step, all done) that stays readable after the state is donated to the next call."""

    def cond(s):
        return (s.step < stop) & ~jnp.all(s.done)

    def body(s):
        token = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=False)
        out = model.apply({"params": params}, token[:, None], (s.last_position + s.step)[:, None], s.cache,
                          s.prompt_len + s.step - 1, method=type(model).decode_step)
        return _select(spec, s.replace(cache=out.cache), out.logits[:, -1].astype(jnp.float32), opts)

    state = jax.lax.while_loop(cond, body, state)
    return state, _snapshot(state)


def compiled_program_count() -> int:
    """How many (prefill + decode) programs this process has compiled so far."""
    return _prefill._cache_size() + _decode._cache_size()


# ---------------------------------------------------------------------------------------- compilation cache
_cache_setup_done = False


def default_compilation_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "idefics2_jax", "jax_compilation_cache")


def enable_compilation_cache(path: str | os.PathLike | None = None, min_compile_time_secs: float = 0.0) -> str | None:
    """Turn on JAX's persistent compilation cache so a second process reuses compiled programs.

    Resolution: an explicit `path`; else $IDEFICS2_JAX_COMPILATION_CACHE ("0"/"off"/"false" disables it, any other
    value is the directory); else a directory already configured for JAX (jax_compilation_cache_dir /
    $JAX_COMPILATION_CACHE_DIR) is kept; else ~/.cache/idefics2_jax/jax_compilation_cache. Returns the directory,
    or None when disabled. `generate` calls this once per process unless told not to.
    """
    global _cache_setup_done
    _cache_setup_done = True
    env = os.environ.get(COMPILATION_CACHE_ENV)
    if path is None and env is not None and env.strip().lower() in ("0", "off", "false", "no", ""):
        return None
    if path is None:
        path = env or jax.config.jax_compilation_cache_dir or default_compilation_cache_dir()
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        from jax.experimental.compilation_cache import compilation_cache as cc

        cc.reset_cache()  # pick up the new directory even if something was compiled before
    # The decode programs of small models compile in well under JAX's default 1 s threshold.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    return path


def enable_compilation_cache_once() -> None:
    """`enable_compilation_cache()` with its defaults, unless it was already called in this process."""
    if not _cache_setup_done:
        enable_compilation_cache()
