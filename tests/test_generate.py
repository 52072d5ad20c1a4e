"""`generate` against transformers 5.x `generate(do_sample=False)` on the tiny random-weight model.

The tiny text model has a sliding window of 16 and every prompt here is longer, so the ring-buffer cache wraps
during prefill and decode; prompt lengths are off the bucket ladder, so bucketing adds left padding on top of the
batch's own (REFERENCE §5: left padding counts for the window; the window mask only sees differences, so the extra
padding must change nothing).
"""

import os

os.environ.setdefault("IDEFICS2_JAX_COMPILATION_CACHE", "0")  # compile counts must not depend on a disk cache

import jax
import numpy as np
import pytest
import torch

import reference
from idefics2_jax.generation import GenerationConfig, generate
from idefics2_jax.generation.batching import bucket, patch_bucket
from idefics2_jax.generation.loop import compiled_program_count

WINDOW = reference.tiny_config_dict()["text_config"]["sliding_window"]
SEQ = reference.tiny_config_dict()["perceiver_config"]["resampler_n_latents"]  # <image> tokens per image
N_NEW = 32


class Collect:
    """A transformers-protocol streamer that records what it is given."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value))

    def end(self):
        self.ended += 1


@pytest.fixture(scope="module")
def batch():
    """3 prompts with 2 / 0 / 1 images, left padded; images of different sizes (zero-padded by the processor)."""
    rng = np.random.default_rng(1)
    seqs = [reference.image_prompt(rng, 2, SEQ, 10), reference.image_prompt(rng, 0, SEQ, 9),
            reference.image_prompt(rng, 1, SEQ, 3)]
    ids, mask = reference.left_pad(seqs)
    pv, pm = reference.make_pixels(rng, [[(30, 44), (56, 28)], [], [(42, 42)]])
    assert ids.shape[1] > WINDOW and bucket(ids.shape[1], 16) > ids.shape[1]  # the ring wraps; buckets pad more
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pm)


def hf_generate(tiny_torch, batch, max_new_tokens=N_NEW, streamer=None, **kw):
    with torch.no_grad():
        out = tiny_torch.generate(**{k: torch.tensor(v) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                                  do_sample=False, streamer=streamer, **kw)
    return out.numpy()


def padded_like(ref, width, pad):
    """transformers stops once every row is done; ours always returns max_new_tokens columns."""
    out = np.full((ref.shape[0], width), pad, ref.dtype)
    out[:, :ref.shape[1]] = ref
    return out


@pytest.fixture(scope="module")
def hf_plain(tiny_torch, batch):
    return hf_generate(tiny_torch, batch, eos_token_id=None, pad_token_id=0)


def test_greedy_matches_transformers(tiny_jax, batch, hf_plain):
    model, params = tiny_jax
    out = generate(model, params, **batch, max_new_tokens=N_NEW, eos_token_id=[], pad_token_id=0)
    assert out.shape == hf_plain.shape == (3, batch["input_ids"].shape[1] + N_NEW)
    np.testing.assert_array_equal(out, hf_plain)
    # Without attention_mask it is inferred from the pad id, as transformers does (no prompt token is 0 here).
    inferred = generate(model, params, **{**batch, "attention_mask": None}, max_new_tokens=N_NEW, eos_token_id=[],
                        pad_token_id=0)
    np.testing.assert_array_equal(inferred, hf_plain)


def test_unbucketed_shapes_give_the_same_tokens(tiny_jax, batch, hf_plain):
    model, params = tiny_jax
    out = generate(model, params, **batch, max_new_tokens=N_NEW, eos_token_id=[], pad_token_id=0, buckets=False)
    np.testing.assert_array_equal(out, hf_plain)


def test_eos_pad_bad_words_and_streaming_match_transformers(tiny_torch, tiny_jax, batch, hf_plain):
    """Single- and multi-token bad words picked from the reference's own greedy output, then an EOS per row from
    the reference's bad-word-constrained output, so that every row stops and transformers ends early."""
    model, params = tiny_jax
    t = batch["input_ids"].shape[1]
    new = hf_plain[:, t:]
    bad = [[int(new[1, 3])], [int(new[0, 1]), int(new[0, 2])], [int(new[2, 4]), int(new[2, 5]), int(new[2, 6])]]
    banned = hf_generate(tiny_torch, batch, eos_token_id=None, pad_token_id=0, bad_words_ids=bad)[:, t:]
    assert not np.array_equal(banned, new)  # the bad words changed the answer
    eos = [int(banned[0, 6]), int(banned[1, 10]), int(banned[2, 4])]
    kw = dict(eos_token_id=eos, pad_token_id=7, bad_words_ids=bad)
    hf_stream = Collect()
    ref = hf_generate(tiny_torch, batch, streamer=hf_stream, **kw)
    assert ref.shape[1] < t + N_NEW  # every row finished: transformers stopped early

    stream = Collect()
    out = generate(model, params, **batch, max_new_tokens=N_NEW, streamer=stream, stream_every=3, **kw)
    np.testing.assert_array_equal(out, padded_like(ref, t + N_NEW, 7))
    # The streamer sees what transformers' streamer sees: the prompt, then each step's tokens (pad once done).
    assert stream.ended == hf_stream.ended == 1
    assert len(stream.puts) == len(hf_stream.puts)
    for a, b in zip(stream.puts, hf_stream.puts):
        np.testing.assert_array_equal(a, b)


def test_eos_is_never_a_bad_word_and_pad_defaults_to_eos(tiny_torch, tiny_jax, batch, hf_plain):
    model, params = tiny_jax
    t = batch["input_ids"].shape[1]
    eos = int(hf_plain[0, t + 2])
    kw = dict(eos_token_id=[eos], bad_words_ids=[[eos], [int(hf_plain[1, t])]])
    ref = hf_generate(tiny_torch, batch, pad_token_id=None, **kw)  # transformers pads with eos[0]
    out = generate(model, params, **batch, max_new_tokens=N_NEW, pad_token_id=None,
                   generation_config=GenerationConfig(), **kw)
    np.testing.assert_array_equal(out, padded_like(ref, t + N_NEW, eos))


def test_repetition_penalty_matches_transformers(tiny_torch, tiny_jax, batch, hf_plain):
    """penalty < 1 on the plain batch; penalty > 1 after putting each row's own greedy answer at the start of its
    prompt (beyond the 2-layer x 16-token receptive field, so the unpenalized answer starts the same and the
    penalty is what changes it). Left padding is not penalized (transformers 5.x `prompt_ignore_length`)."""
    model, params = tiny_jax
    t = batch["input_ids"].shape[1]
    rows = [list(r[m.astype(bool)]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    ids, mask = reference.left_pad([r[:1] + list(hf_plain[i, t:t + 24]) + r[1:] for i, r in enumerate(rows)])
    seeded = {**batch, "input_ids": ids, "attention_mask": mask}
    for inputs, penalty in ((batch, 0.7), (seeded, 1.5)):
        plain = hf_generate(tiny_torch, inputs, eos_token_id=None, pad_token_id=0)
        ref = hf_generate(tiny_torch, inputs, eos_token_id=None, pad_token_id=0, repetition_penalty=penalty)
        assert (ref != plain).any(axis=1).sum() >= 2  # the penalty changes the answers
        out = generate(model, params, **inputs, max_new_tokens=N_NEW, eos_token_id=[], pad_token_id=0,
                       repetition_penalty=penalty)
        np.testing.assert_array_equal(out, ref)


def test_far_past_the_window_with_a_window_sized_cache(tiny_torch, tiny_jax, monkeypatch):
    """100 new tokens (6x the window) equal transformers', while the cache has exactly W slots per layer."""
    import importlib

    import idefics2_jax

    gen = importlib.import_module("idefics2_jax.generation.loop")  # where the prefill program creates its cache

    model, params = tiny_jax
    slots = []

    def recording_init_cache(config, batch_size, max_length, dtype):
        cache = gen.init_cache.__wrapped__(config, batch_size, max_length, dtype)
        slots.append(cache["layers"][0]["k"].shape[1])
        return cache

    recording_init_cache.__wrapped__ = gen.init_cache
    monkeypatch.setattr(gen, "init_cache", recording_init_cache)
    rng = np.random.default_rng(5)
    ids, mask = reference.left_pad([[1] + list(rng.integers(3, 32000, 12)), [1] + list(rng.integers(3, 32000, 5))])
    batch = dict(input_ids=ids, attention_mask=mask)
    out = idefics2_jax.generate(model, params, ids, mask, max_new_tokens=100, eos_token_id=[], pad_token_id=0)
    np.testing.assert_array_equal(out, hf_generate(tiny_torch, batch, max_new_tokens=100, eos_token_id=None,
                                                   pad_token_id=0))
    assert slots == [WINDOW]  # traced once, for this new shape


def test_generation_config_reader(tmp_path):
    """idefics2-8b's generation_config.json (REFERENCE §9), read as transformers reads it; without the file,
    transformers falls back to config.json's text config."""
    from transformers import GenerationConfig as HFGenerationConfig

    hub = {"bos_token_id": 1, "eos_token_id": [2, 32002], "pad_token_id": 0, "bad_words_ids": [[32000], [32001]],
           "transformers_version": "4.40.0.dev0"}
    (tmp_path / "generation_config.json").write_text(__import__("json").dumps(hub))
    ours = GenerationConfig.from_pretrained(tmp_path)
    theirs = HFGenerationConfig.from_pretrained(tmp_path)
    assert list(ours.eos_token_id) == theirs.eos_token_id == [2, 32002]
    assert ours.pad_token_id == theirs.pad_token_id == 0
    assert [list(w) for w in ours.bad_words_ids] == theirs.bad_words_ids == [[32000], [32001]]
    assert ours.bos_token_id == 1


def test_generation_config_falls_back_to_config_json(tiny_dir, tiny_torch, tmp_path):
    import shutil

    shutil.copyfile(os.path.join(tiny_dir, "config.json"), tmp_path / "config.json")
    ours = GenerationConfig.from_pretrained(tmp_path)
    theirs = tiny_torch.generation_config
    assert ours.pad_token_id == theirs.pad_token_id
    assert list(ours.eos_token_id) == ([theirs.eos_token_id] if isinstance(theirs.eos_token_id, int)
                                       else list(theirs.eos_token_id or []))
    assert ours.bos_token_id == theirs.bos_token_id


def test_ids_outside_the_vocabulary_raise(tiny_jax):
    """Prompts are bucketed with the pad id, so a pad (or an input id) outside the vocabulary would give NaN logits
    and an all-0 answer in silence."""
    model, params = tiny_jax
    vocab = model.config.text_config.vocab_size
    ids = np.asarray([[1, 5, 6, 7]])
    with pytest.raises(ValueError, match=f"pad_token_id {vocab} is outside the vocabulary"):
        generate(model, params, ids, max_new_tokens=2, pad_token_id=vocab)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, params, ids, max_new_tokens=2, eos_token_id=[2, vocab + 5])
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = -3 is outside"):
        generate(model, params, np.asarray([[1, 5, -3, 7]]), max_new_tokens=2)


def test_load_model_keeps_the_checkpoints_generation_config(tiny_dir, tiny_torch, tmp_path):
    """`generate` without `generation_config=` uses the generation_config.json that load_model read, as
    transformers' `generate` uses the checkpoint's: here a bad word bans the plain greedy answer's first token."""
    import shutil

    import transformers

    import idefics2_jax

    path = tmp_path / "m"
    shutil.copytree(tiny_dir, path)
    rng = np.random.default_rng(7)
    ids = np.asarray([[1] + list(rng.integers(3, 32000, 20))])
    plain = hf_generate(tiny_torch, {"input_ids": ids}, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    banned = int(plain[0, ids.shape[1]])
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2], pad_token_id=0,
                                  bad_words_ids=[[banned]]).save_pretrained(path)
    model, params = idefics2_jax.load_model(path)
    assert model.generation_config == GenerationConfig.from_pretrained(path)
    assert model.generation_config.bad_words_ids == ((banned,),)
    ours = generate(model, params, ids, max_new_tokens=6)
    theirs = hf_generate(tiny_torch, {"input_ids": ids}, max_new_tokens=6,
                         generation_config=transformers.GenerationConfig.from_pretrained(path))
    np.testing.assert_array_equal(ours, theirs)
    assert ours[0, ids.shape[1]] != banned


def test_compilations_are_bounded_across_varied_requests(tiny_torch, tiny_jax):
    """20 requests with prompt lengths 17..48 and 0-2 images of varied sizes compile at most one prefill program
    per (prompt bucket, image-count bucket) -- here 3 x 3 -- plus one decode program (the cache is the 16-slot
    window for all of them); each answer still equals transformers'; repeating the requests compiles nothing."""
    model, params = tiny_jax
    rng = np.random.default_rng(7)
    requests = []
    while len(requests) < 20:
        n_img = len(requests) % 3
        text = int(rng.integers(4, 30))
        ids = reference.image_prompt(rng, n_img, SEQ, text)
        if not 17 <= len(ids) <= 48:
            continue
        sizes = [(int(rng.integers(70, 85)), int(rng.integers(70, 85))) for _ in range(n_img)]  # 5-6 patches
        pv, pm = reference.make_pixels(rng, [sizes]) if n_img else (None, None)
        requests.append((np.array([ids]), pv, pm))

    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    before = compiled_program_count()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outs = [generate(model, params, ids, None, pv, pm, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
                for ids, pv, pm in requests]
        first_pass = len(compiles)
        for ids, pv, pm in requests:
            generate(model, params, ids, None, pv, pm, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    programs = compiled_program_count() - before
    prompt_buckets = {24, 32, 48}  # the ladder 2^k, 3 * 2^(k-1) over 17..48
    bound = len(prompt_buckets) * 3 + 1
    print(f"compiled programs: {programs} (bound {bound}), backend compiles: {first_pass}")
    assert programs <= bound, programs
    assert first_pass <= bound, first_pass  # nothing else (no eager op per shape) compiles either
    assert len(compiles) == first_pass  # the second pass reuses every program
    for (ids, pv, pm), out in zip(requests, outs):
        batch = dict(input_ids=ids, attention_mask=np.ones_like(ids))
        if pv is not None:
            batch.update(pixel_values=pv, pixel_attention_mask=pm)
        np.testing.assert_array_equal(out, hf_generate(tiny_torch, batch, max_new_tokens=6, eos_token_id=None,
                                                       pad_token_id=0))


def test_bucket_ladder():
    assert [bucket(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert bucket(3, 16) == 16 and bucket(17, 16) == 24 and bucket(25, 16) == 32 and bucket(33, 16) == 48
    for n in range(1, 5000):  # never more than 50% padding past the minimum
        assert n <= bucket(n) <= max(2, 1.5 * n)


def test_patch_bucket_ladder():
    """Sides count whole 14-px patches only (floor), then round up: exact ladder to 16 patches, then steps of 4,
    capped at the 70-patch grid."""
    assert [patch_bucket(px, 14, 70) // 14 for px in (13, 14, 27, 28, 90, 125, 230, 252, 253, 512, 974, 980)] == \
        [1, 1, 1, 2, 6, 8, 16, 20, 20, 36, 70, 70]
    for px in range(14, 981):  # never fewer whole patches than the image has; waste bounded
        n = px // 14
        b = patch_bucket(px, 14, 70) // 14
        assert n <= b <= max(2, 1.5 * n, n + 3), (px, b)
    assert patch_bucket(2000, 14, 70) // 14 == 144  # past the grid: the ladder continues (position ids rescale)


def test_bucketing_crops_pixels_past_whole_patches(tiny_torch, tiny_jax):
    """Sides that are not whole patches (90 = 6 x 14 + 6, 125 = 8 x 14 + 13) bucket to fewer pixels than they
    have: the partial patch is cut, as the reference's valid conv and `sum == P*P` patch mask drop it; the answer
    equals transformers' (and our own unbucketed one)."""
    model, params = tiny_jax
    rng = np.random.default_rng(11)
    ids = np.array([reference.image_prompt(rng, 2, SEQ, 5)])
    pv, pm = reference.make_pixels(rng, [[(90, 125), (125, 40)]])
    ours = generate(model, params, ids, None, pv, pm, max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    plain = generate(model, params, ids, None, pv, pm, max_new_tokens=5, eos_token_id=[], pad_token_id=0,
                     buckets=False)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pv, pixel_attention_mask=pm)
    np.testing.assert_array_equal(ours, hf_generate(tiny_torch, batch, max_new_tokens=5, eos_token_id=None,
                                                    pad_token_id=0))
    np.testing.assert_array_equal(ours, plain)


def test_errors(tiny_jax, batch):
    model, params = tiny_jax
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match="sample 0"):  # images missing for a prompt with <image> tokens
        generate(model, params, ids, batch["attention_mask"], max_new_tokens=2)
    with pytest.raises(ValueError, match="bad_words_ids"):
        generate(model, params, ids[1:2, -5:], max_new_tokens=2, bad_words_ids=[32000])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, params, ids[1:2, -5:], max_new_tokens=2, do_sample=True, temperature=0.0)
    out = generate(model, params, ids[1:2, -5:], max_new_tokens=0)
    np.testing.assert_array_equal(out, ids[1:2, -5:])
