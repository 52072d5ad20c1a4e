"""`generate()`: validate the request, bucket it, run prefill and decode, stream, and return the new tokens."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..config import Idefics2Config
from ..nn.model import validate_inputs
from ..nn.partitioning import mesh_context
from .batching import MIN_NEW_BUCKET, MIN_PROMPT_BUCKET, bucket, image_groups
from .loop import _Spec, _decode, _prefill, enable_compilation_cache_once
from .options import GenerationConfig, resolve_generation_config, token_ids

# With a streamer, each compiled decode call runs about this long (see `generate`'s `stream_every`).
STREAM_INTERVAL_S = 0.05
MAX_STREAM_EVERY = 256


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
        None = `model.generation_config` (what `load_model` read from the checkpoint), else the model config's
        special tokens (transformers' fallback when a checkpoint has no such file).
      buckets: round shapes up (see the module docstring) so varied requests share compiled programs.
      stream_every: with a streamer, tokens generated per compiled call (None: adapted so a call lasts about
        STREAM_INTERVAL_S). Calls are pipelined (the next is queued before the previous one's tokens are read), so
        the device does not wait on the host.
      compilation_cache: turn on the persistent compilation cache on first use (`enable_compilation_cache`).

    Returns: int numpy array [B, T + max_new_tokens]: the prompt, then the new tokens; after a row's EOS the rest is
    pad_token_id (transformers stops when every row is done: its output is this one's prefix up to that point).
    """
    if compilation_cache:
        enable_compilation_cache_once()
    config: Idefics2Config = model.config
    gen = resolve_generation_config(model, generation_config)
    ids = np.asarray(input_ids)
    pixel_values = None if pixel_values is None else np.asarray(pixel_values)
    validate_inputs(config, ids, attention_mask, pixel_values, pixel_attention_mask)
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    spec, opts, pad = _sampling(gen, config, do_sample, temperature, top_k, top_p, repetition_penalty,
                                eos_token_id, pad_token_id, bad_words_ids)
    if attention_mask is None:  # transformers infers it from the pad token when that is not also EOS
        infer = pad is not None and np.any(ids == pad) and pad not in spec.eos
        mask = (ids != pad) if infer else np.ones_like(ids, bool)
    else:
        mask = np.asarray(attention_mask).astype(bool)

    if streamer is not None:
        streamer.put(ids.copy())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return ids.copy()

    batch, cache_len, new_len = _host_batch(config, spec, ids, mask, pixel_values, pixel_attention_mask,
                                            max_new_tokens, seed, buckets)
    b = ids.shape[0]
    # ---- run (params sharded on a mesh: run on it, with the rules' activation and KV-cache shardings)
    with mesh_context(params):
        state, snap = _prefill(params, batch, opts, model=model, spec=spec, cache_len=cache_len, new_len=new_len)
        if streamer is None:
            state, snap = _decode(params, state, np.int32(max_new_tokens), opts, model=model, spec=spec)
            tokens = np.asarray(snap[0])
        else:
            tokens = _stream(streamer, params, state, snap, opts, model, spec, b, max_new_tokens, stream_every)
    return np.concatenate([ids, tokens[:b, :max_new_tokens].astype(ids.dtype)], axis=1)


def check_options(model_config: Idefics2Config, generation_config: GenerationConfig | None = None, *,
                  do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
                  eos_token_id=None, pad_token_id=None, bad_words_ids=None) -> None:
    """Raise the ValueError `generate` would raise for these options, without a model (a CLI checks its flags
    before loading weights)."""
    gen = generation_config or GenerationConfig.from_model_config(model_config)
    _sampling(gen, model_config, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id,
              pad_token_id, bad_words_ids)


def _sampling(gen: GenerationConfig, config: Idefics2Config, do_sample, temperature, top_k, top_p,
              repetition_penalty, eos_token_id, pad_token_id, bad_words_ids) -> tuple[_Spec, dict, int | None]:
    """Resolve the options (arguments over generation_config over transformers' defaults) and check them.
    Returns the static switches of the programs (`_Spec`), their runtime values, and the pad id (None if unset:
    finished rows then get 0)."""
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
    eos = token_ids(eos_token_id) if eos_token_id is not None else gen.eos_token_id
    pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
    if pad is None and eos:
        pad = eos[0]  # transformers' rule
    vocab = config.text_config.vocab_size
    for name, ids in (("pad_token_id", () if pad is None else (pad,)), ("eos_token_id", eos)):
        if any(not 0 <= int(t) < vocab for t in ids):
            # Prompts are bucketed with the pad id: one outside the vocabulary would give NaN logits in silence.
            raise ValueError(f"{name} {list(ids) if name == 'eos_token_id' else pad} is outside the vocabulary "
                             f"[0, {vocab})")
    bad = _check_bad_words(bad_words_ids) if bad_words_ids is not None else gen.bad_words_ids
    bad = tuple(w for w in bad if not (len(w) == 1 and w[0] in eos))  # EOS is never banned
    too_big = sorted({tok for w in bad for tok in w if tok >= vocab})
    if too_big:
        raise ValueError(f"bad_words_ids has ids {too_big} outside the vocabulary (size {vocab})")
    spec = _Spec(do_sample=do_sample, top_k_top_p=do_sample and (top_k > 0 or top_p < 1), penalty=penalty != 1.0,
                 eos=eos, pad=int(pad if pad is not None else 0),
                 bad_single=tuple(sorted({w[0] for w in bad if len(w) == 1})),
                 bad_multi=tuple(w for w in bad if len(w) > 1))
    opts = {"temperature": np.float32(temperature), "top_k": np.int32(top_k), "top_p": np.float32(top_p),
            "repetition_penalty": np.float32(penalty)}
    return spec, opts, pad


def _host_batch(config: Idefics2Config, spec: _Spec, ids, mask, pixel_values, pixel_attention_mask,
                max_new_tokens: int, seed: int, buckets: bool) -> tuple[dict, int, int]:
    """The bucketed prefill inputs, built with numpy only (no eager device ops, which would compile per shape).
    Returns (batch, cache slots, new-token budget)."""
    rup = bucket if buckets else (lambda n, minimum=1: int(n))
    b, t = ids.shape
    bb, tb, nb = rup(b), rup(t, MIN_PROMPT_BUCKET), rup(max_new_tokens, MIN_NEW_BUCKET)
    window = config.text_config.sliding_window
    cache_len = rup(tb + nb)
    if window is not None:
        cache_len = min(window, cache_len)
    shift = tb - t
    bids = np.full((bb, tb), spec.pad, np.int32)
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
        vc = config.vision_config
        batch["image_groups"], batch["image_mask"] = image_groups(
            pixel_values, pixel_attention_mask, vc.patch_size, vc.image_size // vc.patch_size, rows=bb,
            slots=rup(pixel_values.shape[1]), buckets=buckets)
    return batch, cache_len, nb


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
