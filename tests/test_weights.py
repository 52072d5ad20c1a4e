"""The weight table and HF loading (REFERENCE §8): coverage of the real checkpoint, dtypes, clear errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

import idefics2_jax
from idefics2_jax import Idefics2Config
from idefics2_jax.ckpt.shapes import abstract_params
from idefics2_jax.ckpt.table import checkpoint_entries, flax_shape

import reference as R

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_real_8b_config_covers_every_checkpoint_tensor():
    """eval_shape of the params (no memory) vs transformers' model built on the meta device."""
    d = json.load(open(os.path.join(DATA, "idefics2-8b.config.json")))
    config = Idefics2Config.from_dict(d)
    with torch.device("meta"):
        hf = transformers.Idefics2ForConditionalGeneration(transformers.Idefics2Config.from_dict(d))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    entries = checkpoint_entries(config)
    assert len(hf_shapes) == 763 and set(entries) == set(hf_shapes)
    params = flatten_dict(abstract_params(config, jnp.bfloat16))
    assert set(params) == {e.path for e in entries.values()}
    for key, entry in entries.items():
        assert params[entry.path].shape == flax_shape(hf_shapes[key], entry.transform), key
    total = sum(int(np.prod(v.shape)) for v in params.values())
    assert total == sum(int(np.prod(s)) for s in hf_shapes.values())
    assert round(total / 1e9, 2) == 8.40


def test_a_stack_of_zero_layers_holds_no_tensors():
    """resampler_depth 0 (a perceiver of latents and a norm only): the table must not invent a layers.0."""
    d = R.tiny_config_dict()
    d["perceiver_config"]["resampler_depth"] = 0
    config = Idefics2Config.from_dict(d)
    with torch.device("meta"):
        hf = transformers.Idefics2ForConditionalGeneration(transformers.Idefics2Config.from_dict(d))
    entries = checkpoint_entries(config)
    assert not any(k.startswith("model.connector.perceiver_resampler.layers.") for k in entries)
    assert set(entries) == set(hf.state_dict())
    assert set(flatten_dict(abstract_params(config))) == {e.path for e in entries.values()}


def test_sharded_bf16_checkpoint_keeps_its_dtype(tiny_torch, tiny_jax, tmp_path):
    path = R.save(R.build_torch_model(R.tiny_config_dict(), seed=0), tmp_path / "sharded", dtype=torch.bfloat16,
                  max_shard_size="2MB")
    assert os.path.exists(path / "model.safetensors.index.json")
    model, params = idefics2_jax.load_model(path)  # dtype=None: the checkpoint's own
    assert model.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _, params32 = tiny_jax
    a = flatten_dict(params)
    for k, v in flatten_dict(params32).items():
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(v.astype(jnp.bfloat16)))


def test_dtype_argument_forms(tiny_dir):
    for dtype in ("float16", np.float16, jnp.float16):
        model, params = idefics2_jax.load_model(tiny_dir, dtype=dtype)
        assert model.dtype == jnp.float16
        assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float16
    with pytest.raises(ValueError, match="int8"):
        idefics2_jax.load_model(tiny_dir, dtype="int8")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path / "m")
    _edit_weights(path, lambda t: t.pop("model.text_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.text_model\.layers\.1\.mlp\.up_proj\.weight'"):
        idefics2_jax.load_model(path)


def test_unexpected_tensor(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path / "u")
    _edit_weights(path, lambda t: t.__setitem__("model.vision_model.head.probe", np.zeros((1, 1, 32), np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.vision_model\.head\.probe'"):
        idefics2_jax.load_model(path)


def test_wrong_shape(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path / "s")
    key = "model.vision_model.encoder.layers.0.mlp.fc1.weight"
    _edit_weights(path, lambda t: t.__setitem__(key, np.zeros((72, 32), np.float32)))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(72, 32\), expected \(64, 32\)"):
        idefics2_jax.load_model(path)


def test_truncated_safetensors(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path / "t")
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(ValueError, match="model.safetensors"):
        idefics2_jax.load_model(path)


def test_garbage_safetensors(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path / "g")
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        idefics2_jax.load_model(path)


def test_other_model_type(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path / "o")
    cfg = json.load(open(path / "config.json"))
    cfg["model_type"] = "idefics3"
    json.dump(cfg, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type='idefics3'"):
        idefics2_jax.load_model(path)


def test_no_weights(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path / "n")
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        idefics2_jax.load_model(path)
