"""Idefics2Config resolves config.json exactly as transformers 5.x does (REFERENCE §1)."""

import dataclasses
import glob
import json
import os

import pytest
import transformers

from idefics2_jax import Idefics2Config

import reference

DATA = os.path.join(os.path.dirname(__file__), "data")
PUBLISHED = sorted(glob.glob(os.path.join(DATA, "*.config.json")))


def _hf(d):
    return transformers.Idefics2Config.from_dict(d)


def _compare(ours: Idefics2Config, hf) -> None:
    for f in dataclasses.fields(ours.vision_config):
        assert getattr(ours.vision_config, f.name) == getattr(hf.vision_config, f.name), f.name
    for f in dataclasses.fields(ours.perceiver_config):
        assert getattr(ours.perceiver_config, f.name) == getattr(hf.perceiver_config, f.name), f.name
    text = hf.text_config
    for f in dataclasses.fields(ours.text_config):
        if f.name == "rope_theta":
            assert ours.text_config.rope_theta == text.rope_parameters["rope_theta"]
            continue
        want = getattr(text, f.name)
        want = tuple(want) if isinstance(want, list) else want
        assert getattr(ours.text_config, f.name) == want, f.name
    assert ours.image_token_id == hf.image_token_id
    assert ours.tie_word_embeddings == hf.tie_word_embeddings


def test_published_configs_present():
    assert {os.path.basename(p) for p in PUBLISHED} == {
        "idefics2-8b.config.json", "idefics2-8b-base.config.json", "idefics2-8b-chatty.config.json"}


@pytest.mark.parametrize("path", PUBLISHED, ids=os.path.basename)
def test_published_config_resolves_like_transformers(path):
    d = json.load(open(path))
    ours = Idefics2Config.from_dict(d)
    _compare(ours, _hf(d))
    # The numbers REFERENCE §1 gives for the real model.
    t, v, p = ours.text_config, ours.vision_config, ours.perceiver_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 14336, 32, 32)
    assert (t.num_key_value_heads, t.head_dim, t.sliding_window, t.rms_norm_eps) == (8, 128, 4096, 1e-5)
    assert t.vocab_size == (32002 if "base" in path else 32003)
    assert (v.hidden_size, v.num_hidden_layers, v.head_dim, v.num_patches_per_side) == (1152, 27, 72, 70)
    # Trap: 5.x uses the perceiver's own default eps (1e-6), not the text eps the model was trained with.
    assert p.rms_norm_eps == 1e-6 and p.hidden_size == 4096 and p.num_key_value_heads == 4


def test_tiny_config_resolves_like_transformers():
    d = reference.tiny_config_dict()
    _compare(Idefics2Config.from_dict(d), _hf(d))


def test_perceiver_defaults_follow_text_when_hidden_sizes_differ():
    # transformers' __post_init__: a perceiver left at hidden 4096 under a smaller text model takes the text
    # hidden size *and* its eps.
    d = reference.tiny_config_dict()
    del d["perceiver_config"]["hidden_size"], d["perceiver_config"]["rms_norm_eps"]
    ours, hf = Idefics2Config.from_dict(d), _hf(d)
    _compare(ours, hf)
    assert ours.perceiver_config.rms_norm_eps == 1e-5


def test_missing_text_config_uses_subconfig_init_kwargs():
    d = {"model_type": "idefics2"}
    ours, hf = Idefics2Config.from_dict(d), _hf(d)
    _compare(ours, hf)
    assert ours.text_config.max_position_embeddings == 32768 and ours.text_config.pad_token_id == 0


def test_rope_theta_forms():
    for text in ({"rope_theta": 1e6}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}):
        d = {"model_type": "idefics2", "text_config": {"model_type": "mistral", **text}}
        assert Idefics2Config.from_dict(d).text_config.rope_theta == _hf(d).text_config.rope_parameters["rope_theta"]


def test_round_trip_through_to_dict():
    ours = Idefics2Config.from_dict(json.load(open(PUBLISHED[0])))
    assert Idefics2Config.from_dict(ours.to_dict()) == ours
    _compare(ours, _hf(ours.to_dict()))


def test_other_model_type_refused():
    with pytest.raises(ValueError, match="model_type='llava'"):
        Idefics2Config.from_dict({"model_type": "llava"})
    with pytest.raises(ValueError, match="only 'mistral'"):
        Idefics2Config.from_dict({"model_type": "idefics2", "text_config": {"model_type": "llama"}})
