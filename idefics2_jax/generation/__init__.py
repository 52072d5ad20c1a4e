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


from .api import generate
from .options import GenerationConfig, load_generation_config
from .streaming import TextStreamer

__all__ = ["generate", "GenerationConfig", "load_generation_config", "TextStreamer"]
