"""`idefics2_jax.save_pretrained`: HF checkpoint -> our params -> HF checkpoint, checked with transformers itself."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import idefics2_jax
import reference as R


def _tensors(path):
    index = os.path.join(path, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for name in files:
        out.update(load_file(os.path.join(path, name)))
    return out


def _hf_config(path):
    from transformers import Idefics2Config

    d = Idefics2Config.from_pretrained(path).to_dict()
    d.pop("transformers_version", None)
    return d


@pytest.fixture(scope="module")
def bf16_src(tiny_torch, tmp_path_factory):
    path = tmp_path_factory.mktemp("export_bf16_src")
    return str(R.save(copy.deepcopy(tiny_torch), path, dtype=torch.bfloat16))


@pytest.mark.parametrize("source,shard", [("fp32", None), ("bf16", "1MB")])
def test_round_trip_is_bit_identical_and_transformers_loads_it(source, shard, tiny_dir, bf16_src, tmp_path):
    from transformers import Idefics2ForConditionalGeneration

    src = tiny_dir if source == "fp32" else bf16_src
    model, params = idefics2_jax.load_model(src)
    dst = tmp_path / "out"
    idefics2_jax.save_pretrained(dst, model, params, max_shard_size=shard or "5GB")
    assert os.path.exists(dst / "model.safetensors.index.json") == (shard is not None)
    theirs, ours = _tensors(src), _tensors(dst)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        np.testing.assert_array_equal(ours[key].view(np.uint8), value.view(np.uint8), err_msg=key)
    assert _hf_config(dst) == _hf_config(src)
    loaded, info = Idefics2ForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = Idefics2ForConditionalGeneration.from_pretrained(src)
    ids = torch.tensor([[1, 5, 300, 7, 9000, 31999]])
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(input_ids=ids).logits.float().numpy(),
                                      reference(input_ids=ids).logits.float().numpy())
    with open(dst / "generation_config.json") as f:
        assert json.load(f) == model.generation_config.to_dict()
    again, _ = idefics2_jax.load_model(dst)
    assert again.generation_config == model.generation_config


def test_dtype_cast_and_overwrite_rules(tiny_dir, tmp_path):
    model, params = idefics2_jax.load_model(tiny_dir)
    dst = tmp_path / "out"
    idefics2_jax.save_pretrained(dst, model, params, dtype="bfloat16")
    assert {str(v.dtype) for v in _tensors(dst).values()} == {"bfloat16"}
    assert json.load(open(dst / "config.json"))["dtype"] == "bfloat16"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        idefics2_jax.save_pretrained(dst, model, params)
    idefics2_jax.save_pretrained(dst, model, params, overwrite=True)  # an earlier checkpoint: replaced
    assert {str(v.dtype) for v in _tensors(dst).values()} == {"float32"}
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        idefics2_jax.save_pretrained(other, model, params, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="max_shard_size"):
        idefics2_jax.save_pretrained(tmp_path / "x", model, params, max_shard_size="lots")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary directory left behind
