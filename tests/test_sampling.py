"""Logit processors and samplers against transformers' `generation/logits_process.py`, and sampling behaviour."""

import os

os.environ.setdefault("IDEFICS2_JAX_COMPILATION_CACHE", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import generation as hf

import reference
from idefics2_jax.generation import generate
from idefics2_jax.generation.loop import _Spec, process_logits
from idefics2_jax.generation.processors import (apply_bad_words, apply_repetition_penalty, apply_temperature,
                                                apply_top_k, apply_top_p, sample)

VOCAB = 1000


@pytest.fixture(scope="module")
def logits():
    """Random logits with different spreads per row (so top-p cuts at very different ranks)."""
    rng = np.random.default_rng(0)
    scale = np.array([0.5, 1.0, 3.0, 8.0], np.float32)[:, None]
    return (rng.standard_normal((4, VOCAB)) * scale).astype(np.float32)


def hf_apply(processor, scores, input_ids=None):
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long) if input_ids is None else torch.tensor(input_ids)
    return processor(ids, torch.tensor(scores)).numpy()


def assert_same(ours, theirs):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature(logits, temperature):
    assert_same(apply_temperature(logits, temperature), hf_apply(hf.TemperatureLogitsWarper(temperature), logits))


@pytest.mark.parametrize("k", [1, 2, 17, 50, VOCAB - 1, VOCAB, VOCAB + 5])
def test_top_k(logits, k):
    assert_same(apply_top_k(logits, k), hf_apply(hf.TopKLogitsWarper(k), logits))


def test_top_k_zero_is_off_and_ties_are_kept(logits):
    np.testing.assert_array_equal(apply_top_k(logits, 0), logits)
    tied = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], np.float32)
    assert_same(apply_top_k(tied, 2), hf_apply(hf.TopKLogitsWarper(2), tied))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p(logits, p):
    assert_same(apply_top_p(logits, p), hf_apply(hf.TopPLogitsWarper(p), logits))


def test_top_p_one_is_off(logits):
    np.testing.assert_array_equal(apply_top_p(logits, 1.0), logits)


@pytest.mark.parametrize("penalty", [0.6, 1.3])
def test_repetition_penalty_ignores_left_padding(logits, penalty):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (4, 30))
    ignore = np.array([0, 3, 10, 29])  # each row's left-padding length
    theirs = hf_apply(hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.tensor(ignore)),
                      logits, ids)
    seen = np.zeros((4, VOCAB), bool)
    for b in range(4):
        seen[b, ids[b, ignore[b]:]] = True
    assert_same(apply_repetition_penalty(logits, seen, penalty), theirs)


def test_bad_words(logits):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, VOCAB, (4, 12))
    ids[0, -1] = 7  # row 0 ends with the prefix of [7, 8]
    ids[1, -2:] = [3, 4]  # row 1 ends with the prefix of [3, 4, 9]
    ids[2, -1] = 3  # row 2 only half-way into [3, 4, 9]
    bad = [[5], [7, 8], [3, 4, 9], [11], [2]]
    eos = [2]  # an EOS is never banned
    theirs = hf_apply(hf.NoBadWordsLogitsProcessor(bad, eos_token_id=eos), logits, ids)
    single = np.zeros(VOCAB, np.float32)
    single[[5, 11]] = -np.inf
    ours = apply_bad_words(logits, ids[:, -2:], single, [(7, 8), (3, 4, 9)])
    assert_same(ours, theirs)
    assert np.isneginf(theirs[0, 8]) and np.isneginf(theirs[1, 9]) and np.isfinite(theirs[2, 9])


def test_processor_chain_equals_transformers(tiny_torch, logits):
    """The whole chain as transformers' own `_get_logits_processor` builds it for these options."""
    import transformers

    cfg = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3,
                                        bad_words_ids=[[5], [7, 8]], eos_token_id=[2, 9], pad_token_id=0)
    cfg, _ = tiny_torch._prepare_generation_config(cfg)
    tiny_torch._prepare_special_tokens(cfg, True, device="cpu")
    ids = np.array([[0, 0, 1, 5, 7], [1, 3, 4, 7, 8], [0, 1, 30, 31, 7], [1, 2, 3, 4, 5]])
    mask = (ids != 0).astype(np.int64)
    chain = tiny_torch._get_logits_processor(cfg, input_ids_seq_length=5, device="cpu",
                                             model_kwargs={"attention_mask": torch.tensor(mask)})
    theirs = hf_apply(chain, logits, ids)

    spec = _Spec(do_sample=True, top_k_top_p=True, penalty=True, eos=(2, 9), pad=0, bad_single=(5,),
                 bad_multi=((7, 8),))
    seen = np.zeros((4, VOCAB), bool)
    for b in range(4):
        seen[b, ids[b, np.argmax(mask[b]):]] = True
    opts = {"temperature": np.float32(0.7), "top_k": np.int32(20), "top_p": np.float32(0.9),
            "repetition_penalty": np.float32(1.3)}
    assert_same(process_logits(spec, jnp.asarray(logits), seen, jnp.asarray(ids[:, -1:]), opts), theirs)


def test_sample_follows_softmax():
    """Empirical frequencies of `sample` match softmax(logits) (chi-square far below its 1e-4 quantile)."""
    logits = jnp.array([[0.0, 1.0, 2.0, -1.0, -jnp.inf], [3.0, 3.0, 0.5, 0.0, 1.0]])
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: sample(logits, jax.random.split(k, 2)))(keys)  # [n, 2]
    for row in range(2):
        p = np.asarray(jax.nn.softmax(logits[row]))
        counts = np.bincount(np.asarray(draws[:, row]), minlength=5)
        assert counts[p == 0].sum() == 0
        expected = n * p[p > 0]
        chi2 = ((counts[p > 0] - expected) ** 2 / expected).sum()
        assert chi2 < 25, (counts, expected)  # 4 degrees of freedom: P(chi2 > 25) < 1e-4


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(3)
    ids, mask = reference.left_pad([[1] + list(rng.integers(3, 32000, 20)), [1] + list(rng.integers(3, 32000, 13))])
    return ids, mask


def test_same_seed_same_tokens_and_top_k_1_is_greedy(tiny_jax, prompt):
    model, params = tiny_jax
    ids, mask = prompt
    kw = dict(max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    a = generate(model, params, ids, mask, do_sample=True, seed=11, top_k=0, **kw)
    b = generate(model, params, ids, mask, do_sample=True, seed=11, top_k=0, **kw)
    c = generate(model, params, ids, mask, do_sample=True, seed=12, top_k=0, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = generate(model, params, ids, mask, **kw)
    assert (a != greedy).any()
    top1 = generate(model, params, ids, mask, do_sample=True, seed=11, top_k=1, temperature=1.7, **kw)
    np.testing.assert_array_equal(top1, greedy)
    # top_p small enough keeps only the top token too (the top token is always kept).
    nucleus = generate(model, params, ids, mask, do_sample=True, seed=5, top_k=0, top_p=1e-6, **kw)
    np.testing.assert_array_equal(nucleus, greedy)
