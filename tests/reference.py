"""Test helpers: tiny random-weight transformers Idefics2 models, saved with `save_pretrained`.

HF's 0.02 init makes logits tiny and every error look small, so weights are redrawn at a scale that keeps
activations and logits O(1) (`randomize`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import transformers

IMAGE_TOKEN = 32001
FAKE_TOKEN = 32000


def tiny_config_dict(**text_overrides) -> dict:
    text = dict(model_type="mistral", vocab_size=32003, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                sliding_window=16, pad_token_id=0)
    text.update(text_overrides)
    return dict(
        model_type="idefics2",
        image_token_id=IMAGE_TOKEN,
        tie_word_embeddings=False,
        # The real 70 x 70 position grid (patch 14, image_size 980) at a tiny width.
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=14, image_size=980),
        # GQA in the perceiver (4 heads over 2 KV heads); hidden_size / eps given explicitly as the hub file should.
        perceiver_config=dict(hidden_size=text["hidden_size"], rms_norm_eps=1e-6, resampler_n_latents=8,
                              resampler_depth=2, resampler_n_heads=4, resampler_head_dim=16, num_key_value_heads=2),
        text_config=text,
    )


def build_torch_model(config_dict: dict, seed: int = 0):
    config = transformers.Idefics2Config(**{k: v for k, v in config_dict.items() if k != "model_type"})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Idefics2ForConditionalGeneration(config).eval()
    randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("latents"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.ndim == 1:  # norm weights around 1, biases around 0
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name or "position_embedding" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:  # Linear [out, in] / Conv [out, in, kh, kw]: 1/sqrt(fan_in) keeps activations O(1)
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def save(model, path, dtype=None, max_shard_size=None):
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def make_pixels(rng: np.random.Generator, sizes_per_sample: list[list[tuple[int, int]]]):
    """Processor-layout pixel_values / pixel_attention_mask for images of the given (h, w), zero-padded."""
    b = len(sizes_per_sample)
    n = max(1, max(len(s) for s in sizes_per_sample))
    hmax = max(h for s in sizes_per_sample for h, _ in s)
    wmax = max(w for s in sizes_per_sample for _, w in s)
    pv = np.zeros((b, n, 3, hmax, wmax), np.float32)
    pm = np.zeros((b, n, hmax, wmax), np.int64)
    for i, sizes in enumerate(sizes_per_sample):
        for j, (h, w) in enumerate(sizes):
            pv[i, j, :, :h, :w] = rng.uniform(-1, 1, (3, h, w))
            pm[i, j, :h, :w] = 1
    return pv, pm


def image_prompt(rng: np.random.Generator, n_images: int, seq_len: int, text_len: int, vocab: int = 32000):
    """Token ids: BOS, text, then per image <fake> <image> x seq_len <fake>, then text."""
    ids = [1] + list(rng.integers(3, vocab, text_len))
    for _ in range(n_images):
        ids += [FAKE_TOKEN] + [IMAGE_TOKEN] * seq_len + [FAKE_TOKEN]
        ids += list(rng.integers(3, vocab, 3))
    return ids


def left_pad(seqs: list[list[int]], pad_id: int = 0):
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad_id, np.int64)
    mask = np.zeros((len(seqs), t), np.int64)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    return ids, mask


# A `python -m convert` child whose safetensors reads are slowed down (0.1 s each), so that a signal sent once it
# has started writing lands mid-way, deterministically (the interrupt tests of test_convert and test_export).
SLOW_CONVERT_CHILD = """
import sys, time
import idefics2_jax.ckpt.safetensors as s
read = s.SafetensorsReader.read
def slow_read(self, *args, **kwargs):
    time.sleep(0.1)
    return read(self, *args, **kwargs)
s.SafetensorsReader.read = slow_read
from convert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""
