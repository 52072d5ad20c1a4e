"""Jitted generation: prefill once (vision + connector + prompt), then a compiled decode loop over a ring KV cache.

Two programs per request shape (big_vision style: prefill, extend):
  prefill  input_ids / pixels -> the KV cache and the first new token (vision tower and connector run only here);
  decode   a `lax.while_loop` over new tokens that reads only the cache; it exits early once every row has finished.
The cache is `text.init_cache`'s ring buffer: never more than the sliding window W slots per layer.

Semantics follow transformers 5.x `generate` (`GenerationMixin._sample` and `generation/logits_process.py`):
- positions `cumsum(attention_mask) - 1` (pads 0), +1 per step; left padding counts for the sliding window;
- logits are cast to float32, then processed in transformers' order: repetition penalty (prompt's left padding
  ignored), bad words (single tokens and multi-token prefixes; EOS is never banned), and when sampling temperature
  -> top-k -> top-p; greedy takes the first argmax;
- a finished row gets `pad_token_id` (default: the first EOS) for the rest of the output;
- unset options come from the checkpoint's generation_config.json, then transformers' global defaults (so sampling
  without `top_k` uses top_k=50, exactly as `model.generate(do_sample=True)` does; pass top_k=0 to disable it).
Sampling draws with `jax.random.categorical` (the same distribution as `torch.multinomial` over the softmax, not the
same stream): token t of row r uses fold_in(fold_in(key(seed), r), t), so a row's tokens do not depend on the batch
it was bucketed into.

Bucketing (so a stream of varied requests compiles a small, bounded set of programs): batch, prompt length, image
slots and new-token budget are rounded up on the ladder 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x
steps: at most 50% padding). Extra prompt length is left padding with attention 0: RoPE positions do not change,
and the sliding-window mask depends only on differences of cache positions (a uniform shift changes nothing), so
bucketed results equal unbucketed ones even when the ring wraps. Extra rows are dummies (finished from the start,
discarded); extra image slots are padding (image_mask False). Images are not run at the batch's padded size: each
real image is cut to its own valid patches, its sides rounded up in whole patches (`patch_bucket`: the ladder up to
16, then steps of PATCH_STEP), and same-sized images form one group for the vision tower (`image_groups`); the
group size is bucketed too, and extra pixels carry pixel_attention_mask 0, so they only add invalid patches.
Programs are keyed by
  prefill: (batch, prompt, image slots, image groups (count, height, width), cache slots, options)
  decode:  (batch, new-token budget, cache slots, options)
where cache slots = min(W, bucket(prompt + new)); `options` are the static switches (sampling, top-k/top-p,
repetition penalty, bad words, eos/pad ids). The numeric values of temperature / top_k / top_p / penalty / seed /
max_new_tokens are runtime arguments and never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from .config import Idefics2Config
from .model import check_image_tokens
from .sharding import constrain, mesh_context
from .text import init_cache

GENERATION_CONFIG = "generation_config.json"
# transformers' `GenerationConfig._get_default_generation_params()` for the options implemented here.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
# With a streamer, each compiled decode call runs about this long (see `generate`'s `stream_every`).
STREAM_INTERVAL_S = 0.05
MAX_STREAM_EVERY = 256
MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
PATCH_STEP = 4  # image sides above 16 patches are padded to a multiple of this many patches
COMPILATION_CACHE_ENV = "IDEFICS2_JAX_COMPILATION_CACHE"


# ------------------------------------------------------------------------------------------ generation config
def _as_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (int, np.integer)):
        return (int(ids),)
    return tuple(int(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The generation_config.json fields `generate` uses; unset fields take transformers' global defaults."""

    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    do_sample: bool = HF_DEFAULTS["do_sample"]
    temperature: float = HF_DEFAULTS["temperature"]
    top_k: int | None = HF_DEFAULTS["top_k"]
    top_p: float = HF_DEFAULTS["top_p"]
    repetition_penalty: float = HF_DEFAULTS["repetition_penalty"]
    max_new_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        d = {k: v for k, v in d.items() if v is not None}
        kw: dict[str, Any] = {}
        for name in ("bos_token_id", "pad_token_id", "top_k", "max_new_tokens"):
            if name in d:
                kw[name] = int(d[name])
        for name in ("temperature", "top_p", "repetition_penalty"):
            if name in d:
                kw[name] = float(d[name])
        if "do_sample" in d:
            kw["do_sample"] = bool(d["do_sample"])
        if "eos_token_id" in d:
            kw["eos_token_id"] = _as_tuple(d["eos_token_id"])
        if "bad_words_ids" in d:
            kw["bad_words_ids"] = tuple(tuple(int(t) for t in w) for w in d["bad_words_ids"])
        return cls(**kw)

    @classmethod
    def from_model_config(cls, config: Idefics2Config) -> "GenerationConfig":
        """What transformers uses when a checkpoint has no generation_config.json: the text config's special ids."""
        t = config.text_config
        return cls(bos_token_id=t.bos_token_id, eos_token_id=_as_tuple(t.eos_token_id), pad_token_id=t.pad_token_id)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "GenerationConfig":
        """generation_config.json of a checkpoint directory; without one, config.json's top level, then its
        text_config (as transformers' `GenerationConfig.from_model_config`)."""
        path = os.fspath(path)
        file = os.path.join(path, GENERATION_CONFIG)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no {GENERATION_CONFIG} or config.json in {path}")
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
        base = dataclasses.asdict(cls.from_model_config(Idefics2Config.from_dict(raw)))
        top = {k: v for k, v in raw.items() if k in base and v is not None}
        return cls.from_dict({**base, **top})


def load_generation_config(path: str | os.PathLike) -> GenerationConfig:
    return GenerationConfig.from_pretrained(path)


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


# --------------------------------------------------------------------------------------------------- bucketing
def bucket(n: int, minimum: int = 1) -> int:
    """Smallest value >= n on the ladder 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^(k-1)), at least `minimum`."""
    n = max(int(n), int(minimum))
    if n <= 2:
        return n
    p = 1 << (n - 1).bit_length()  # next power of two >= n
    return 3 * p // 4 if 3 * p // 4 >= n else p


def patch_bucket(pixels: int, patch: int, grid: int) -> int:
    """Padded (or cropped) image side in pixels for a side of `pixels`.

    Only whole patches count (the patch conv is a valid conv; a patch is valid iff all its pixels are), so the side
    is first cut to floor(pixels / patch) patches: the cut pixels never reach the model in the reference either.
    That count is rounded up on the ladder 1, 2, 3, 4, 6, 8, 12, 16, then in steps of PATCH_STEP patches (vision
    attention is quadratic in patches: a 512-px side is 36 patches, which the coarse ladder would pad to 48, 1.8x
    the patches and 3.2x the attention), never past the model's position grid when the image fits in it.
    """
    n = max(1, int(pixels) // patch)
    b = bucket(n) if n <= 16 else -(-n // PATCH_STEP) * PATCH_STEP
    if n <= grid < b:
        b = grid
    return b * patch


def image_groups(pixel_values, pixel_attention_mask, patch: int, grid: int, *, rows: int, slots: int,
                 buckets: bool = True):
    """Host-side: the real images of pixel_values [B, N, C, H, W], each cut to its own valid patches and grouped by
    padded size, so the vision tower never runs on another image's padding or on padding slots.

    The processor pads every image to the largest in the batch (with splitting: four half-size crops padded to the
    size of the whole image, 2.5x the patches and 4x the attention of the crops themselves); the reference runs the
    tower on all of it. The answer does not depend on it: padded patches are masked keys, and position ids count
    valid patches from the top-left corner, so cutting the invalid right / bottom margin changes nothing.

    Returns (groups, image_mask): groups is a tuple of {"pixel_values" [G, C, h, w], "pixel_attention_mask"
    [G, h, w], "index" [G]} (index = row * slots + slot; G bucketed, its extra entries blank with index
    rows * slots, dropped when scattered), image_mask [rows, slots] marks the real images (all-zero pixels are
    padding, the reference's rule).
    """
    pv = np.asarray(pixel_values)
    b, n, c, h, w = pv.shape
    pam = (np.ones((b, n, h, w), bool) if pixel_attention_mask is None
           else np.asarray(pixel_attention_mask).astype(bool))
    real = np.any(pv != 0, axis=(2, 3, 4))
    hp, wp = h // patch, w // patch
    valid = pam[:, :, : hp * patch, : wp * patch].reshape(b, n, hp, patch, wp, patch).all(axis=(3, 5))
    members: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j in zip(*np.nonzero(real)):
        rows_used = np.flatnonzero(valid[i, j].any(axis=1))
        cols_used = np.flatnonzero(valid[i, j].any(axis=0))
        eh = rows_used[-1] + 1 if rows_used.size else 1
        ew = cols_used[-1] + 1 if cols_used.size else 1
        side = ((patch_bucket(eh * patch, patch, grid), patch_bucket(ew * patch, patch, grid)) if buckets
                else (eh * patch, ew * patch))
        members.setdefault(side, []).append((int(i), int(j)))
    groups = []
    for (sh, sw), items in sorted(members.items()):
        g = bucket(len(items)) if buckets else len(items)
        gv = np.zeros((g, c, sh, sw), np.float32)
        gm = np.zeros((g, sh, sw), bool)
        index = np.full((g,), rows * slots, np.int32)
        ch, cw = min(h, sh), min(w, sw)
        for k, (i, j) in enumerate(items):
            gv[k, :, :ch, :cw] = pv[i, j, :, :ch, :cw]
            gm[k, :ch, :cw] = pam[i, j, :ch, :cw]
            index[k] = i * slots + j
        groups.append({"pixel_values": gv, "pixel_attention_mask": gm, "index": index})
    image_mask = np.zeros((rows, slots), bool)
    image_mask[:b, :n] = real
    return tuple(groups), image_mask


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
    out = model.apply({"params": params}, ids, batch["attention_mask"], position_ids=batch["positions"],
                      cache=cache, cache_index=0, logits_to_keep=1, image_hidden_states=images,
                      image_mask=batch.get("image_mask"))
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
        out = model.apply({"params": params}, token[:, None], None, position_ids=(s.last_position + s.step)[:, None],
                          cache=s.cache, cache_index=s.prompt_len + s.step - 1)
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


# ------------------------------------------------------------------------------------------------- streaming
class TextStreamer:
    """Prints text as tokens arrive (transformers' `TextStreamer` protocol: `put(ids)`, `end()`; batch 1 only).

    Text is flushed up to the last space (a word may still grow) or completely at a newline, and held back while it
    ends in an incomplete UTF-8 sequence. After a newline the held tokens are dropped but the newline token is kept
    as an anchor, so the tokenizer's "strip the leading space" rule cannot eat the next word's space (transformers'
    streamer loses it); the streamed text is exactly `decode(all new tokens)`.
    """

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True, file=None):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.file = file
        self._reset()

    def _reset(self):
        self.anchor: list[int] = []
        self.tokens: list[int] = []
        self.printed = 0
        self.next_is_prompt = True

    def _text(self) -> str:
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
        if not self.anchor:
            return decode(self.tokens)
        return decode(self.anchor + self.tokens)[len(decode(self.anchor)):]

    def put(self, value) -> None:
        value = np.asarray(value)
        if value.ndim > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        if self.skip_prompt and self.next_is_prompt:
            self.next_is_prompt = False
            return
        self.next_is_prompt = False
        self.tokens.extend(int(v) for v in value.reshape(-1))
        text = self._text()
        if text.endswith("\n"):
            printable = text[self.printed:]
            self.anchor, self.tokens, self.printed = self.tokens[-1:], [], 0
        elif text.endswith("\ufffd"):
            return
        else:
            cut = text.rfind(" ") + 1
            printable = text[self.printed:cut] if cut > self.printed else ""
            self.printed += len(printable)
        if printable:
            self.on_text(printable)

    def end(self) -> None:
        text = self._text() if self.tokens else ""
        self.on_text(text[self.printed:], stream_end=True)
        self._reset()

    def on_text(self, text: str, stream_end: bool = False) -> None:
        file = self.file if self.file is not None else sys.stdout
        print(text, end="\n" if stream_end else "", file=file, flush=True)


# -------------------------------------------------------------------------------------------------- generate
def _check_bad_words(bad_words_ids) -> tuple[tuple[int, ...], ...]:
    if bad_words_ids is None:
        return ()
    if not isinstance(bad_words_ids, (list, tuple)) or any(not isinstance(w, (list, tuple)) for w in bad_words_ids):
        raise ValueError(f"bad_words_ids must be a list of lists of token ids, got {bad_words_ids!r}")
    out = []
    for w in bad_words_ids:
        if len(w) == 0 or any(not isinstance(t, (int, np.integer)) or t < 0 for t in w):
            raise ValueError(f"each bad word must be a non-empty list of non-negative token ids, got {w!r}")
        out.append(tuple(int(t) for t in w))
    return tuple(out)


def _pick(value, default):
    return default if value is None else value


def generate(model, params, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
             max_new_tokens: int, do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             eos_token_id=None, pad_token_id: int | None = None, bad_words_ids=None, seed: int = 0, streamer=None,
             generation_config: GenerationConfig | str | os.PathLike | dict | None = None, buckets: bool = True,
             stream_every: int | None = None, compilation_cache: bool = True) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens after each prompt (greedy, or sampling with `do_sample`).

    Args:
      model, params: from `load_model`.
      input_ids [B, T], attention_mask [B, T] (left padding), pixel_values [B, N, 3, H, W], pixel_attention_mask
        [B, N, H, W]: the processor's output. Without attention_mask it is inferred as transformers does (pad tokens
        masked when the pad id is in the input and differs from every EOS).
      do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id (int or list), pad_token_id,
        bad_words_ids (list of lists; [] for none): None = the generation config's value, then transformers'
        default. The numeric values never trigger a recompilation.
      seed: sampling seed; the same seed gives the same tokens.
      streamer: an object with `put(ids)` / `end()` (transformers' streamer protocol, e.g. `TextStreamer`): it gets
        the prompt [B, T] first, then each step's new tokens [B] (pad for finished rows), then `end()`.
      generation_config: a `GenerationConfig`, a dict, or a checkpoint directory to read generation_config.json from;
        None = the model config's special tokens (transformers' fallback when a checkpoint has no such file).
      buckets: round shapes up (see the module docstring) so varied requests share compiled programs.
      stream_every: with a streamer, tokens generated per compiled call (None: adapted so a call lasts about
        STREAM_INTERVAL_S). Calls are pipelined (the next is queued before the previous one's tokens are read), so
        the device does not wait on the host.
      compilation_cache: turn on the persistent compilation cache on first use (`enable_compilation_cache`).

    Returns: int numpy array [B, T + max_new_tokens]: the prompt, then the new tokens; after a row's EOS the rest is
    pad_token_id (transformers stops when every row is done: its output is this one's prefix up to that point).
    """
    if compilation_cache and not _cache_setup_done:
        enable_compilation_cache()
    config: Idefics2Config = model.config
    if generation_config is None:
        gen = GenerationConfig.from_model_config(config)
    elif isinstance(generation_config, GenerationConfig):
        gen = generation_config
    elif isinstance(generation_config, dict):
        gen = GenerationConfig.from_dict(generation_config)
    else:
        gen = GenerationConfig.from_pretrained(generation_config)

    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, seq], got {ids.dtype} {ids.shape}")
    b, t = ids.shape
    if t == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)

    do_sample = bool(_pick(do_sample, gen.do_sample))
    temperature = float(_pick(temperature, gen.temperature))
    top_k = int(_pick(top_k, gen.top_k) or 0)
    top_p = float(_pick(top_p, gen.top_p))
    penalty = float(_pick(repetition_penalty, gen.repetition_penalty))
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if do_sample and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    eos = _as_tuple(eos_token_id) if eos_token_id is not None else gen.eos_token_id
    pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
    if pad is None and eos:
        pad = eos[0]  # transformers' rule
    bad = _check_bad_words(bad_words_ids) if bad_words_ids is not None else gen.bad_words_ids
    bad = tuple(w for w in bad if not (len(w) == 1 and w[0] in eos))  # EOS is never banned
    vocab = config.text_config.vocab_size
    too_big = sorted({tok for w in bad for tok in w if tok >= vocab})
    if too_big:
        raise ValueError(f"bad_words_ids has ids {too_big} outside the vocabulary (size {vocab})")

    if attention_mask is None:
        infer = pad is not None and np.any(ids == pad) and pad not in eos
        mask = (ids != pad) if infer else np.ones_like(ids, bool)
    else:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have shape {ids.shape}, got {mask.shape}")
    if pixel_values is not None:
        pixel_values = np.asarray(pixel_values)
        if pixel_values.ndim != 5 or pixel_values.shape[0] != b:
            raise ValueError(f"pixel_values must be [batch={b}, images, 3, height, width], got {pixel_values.shape}")
    check_image_tokens(ids, pixel_values, config.image_token_id, config.image_seq_len)

    if streamer is not None:
        streamer.put(ids.copy())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return ids.copy()

    # ---- shapes
    rup = bucket if buckets else (lambda n, minimum=1: int(n))
    bb, tb, nb = rup(b), rup(t, MIN_PROMPT_BUCKET), rup(max_new_tokens, MIN_NEW_BUCKET)
    window = config.text_config.sliding_window
    cache_len = rup(tb + nb)
    if window is not None:
        cache_len = min(window, cache_len)
    spec = _Spec(do_sample=do_sample, top_k_top_p=do_sample and (top_k > 0 or top_p < 1), penalty=penalty != 1.0,
                 eos=eos, pad=int(pad if pad is not None else 0), bad_single=tuple(sorted({w[0] for w in bad
                                                                                           if len(w) == 1})),
                 bad_multi=tuple(w for w in bad if len(w) > 1))

    # ---- host-side batch (numpy only: no eager device ops, which would compile per shape)
    shift = tb - t
    fill = spec.pad
    bids = np.full((bb, tb), fill, np.int32)
    bids[:b, shift:] = ids
    bmask = np.zeros((bb, tb), bool)
    bmask[:b, shift:] = mask
    bmask[b:, -1] = True  # dummy rows: one visible token keeps their attention well defined
    positions = np.maximum(np.cumsum(bmask, axis=1) - 1, 0).astype(np.int32)
    live = np.arange(bb) < b
    batch: dict[str, Any] = {"input_ids": bids, "attention_mask": bmask, "positions": positions, "live": live,
                             "seed": np.asarray(int(seed) % 2**32, np.uint32)}
    if spec.penalty:
        # transformers ignores each row's left padding (up to its first attended token) for the penalty.
        first = np.argmax(mask, axis=1)
        counted = np.zeros((bb, tb), bool)
        counted[:b, shift:] = np.arange(t)[None, :] >= first[:, None]
        batch["counted"] = counted
    if spec.context_len:
        p = spec.context_len
        ctx = np.full((bb, max(p, t)), -1, np.int32)  # -1: before the input (transformers' context is T long)
        ctx[:b, ctx.shape[1] - t:] = ids
        batch["context"] = ctx[:, -p:]
    if pixel_values is not None and pixel_values.shape[1] > 0:
        n, _, h, w = pixel_values.shape[1:]
        if pixel_attention_mask is not None and np.shape(pixel_attention_mask) != (b, n, h, w):
            raise ValueError(f"pixel_attention_mask must have shape {(b, n, h, w)}, got "
                             f"{np.shape(pixel_attention_mask)}")
        vc = config.vision_config
        batch["image_groups"], batch["image_mask"] = image_groups(
            pixel_values, pixel_attention_mask, vc.patch_size, vc.image_size // vc.patch_size, rows=bb,
            slots=rup(n), buckets=buckets)
    opts = {"temperature": np.float32(temperature), "top_k": np.int32(top_k), "top_p": np.float32(top_p),
            "repetition_penalty": np.float32(penalty)}

    # ---- run (params sharded on a mesh: run on it, with the rules' activation and KV-cache shardings)
    with mesh_context(params):
        state, snap = _prefill(params, batch, opts, model=model, spec=spec, cache_len=cache_len, new_len=nb)
        if streamer is None:
            state, snap = _decode(params, state, np.int32(max_new_tokens), opts, model=model, spec=spec)
            tokens = np.asarray(snap[0])
        else:
            tokens = _stream(streamer, params, state, snap, opts, model, spec, b, max_new_tokens, stream_every)
    return np.concatenate([ids, tokens[:b, :max_new_tokens].astype(ids.dtype)], axis=1)


def _stream(streamer, params, state, snap, opts, model, spec, b, max_new_tokens, every):
    """Chunked decode: queue chunk i+1, then hand chunk i's tokens to the streamer while the device works.

    every=None adapts the chunk so one lasts about STREAM_INTERVAL_S (from the measured time per token): tokens
    still arrive several times a second, and the per-call cost stays well under 1% of a real model's step time.
    """
    adaptive = every is None
    every = 1 if adaptive else max(1, int(every))
    emitted, stop = 0, 1
    last = time.perf_counter()
    while True:
        pending = None
        if stop < max_new_tokens:
            stop = min(stop + every, max_new_tokens)
            state, pending = _decode(params, state, np.int32(stop), opts, model=model, spec=spec)
        tokens, step, finished = (np.asarray(x) for x in snap)
        for i in range(emitted, int(step)):
            streamer.put(tokens[:b, i].copy())
        now = time.perf_counter()
        if adaptive and int(step) > emitted:
            per_token = (now - last) / (int(step) - emitted)
            every = int(min(MAX_STREAM_EVERY, max(1, STREAM_INTERVAL_S / max(per_token, 1e-6))))
        emitted, last = int(step), now
        if pending is None or bool(finished):
            break
        snap = pending
    streamer.end()
    return tokens
