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


# ------------------------------------------------------------------------------------ python -m convert --to hf
def _convert(*argv):
    from convert.__main__ import main

    return main([*map(str, argv), "--quiet"])


def test_convert_to_hf_from_orbax_round_trips_bit_identically(tiny_dir, tmp_path, capsys):
    assert _convert("--from", "hf", tiny_dir, tmp_path / "orbax") == 0
    assert _convert("--from", "orbax", "--to", "hf", tmp_path / "orbax", tmp_path / "back") == 0
    theirs, ours = _tensors(tiny_dir), _tensors(tmp_path / "back")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key].view(np.uint8), value.view(np.uint8), err_msg=key)
    assert _hf_config(tmp_path / "back") == _hf_config(tiny_dir)
    from convert.__main__ import main

    capsys.readouterr()
    assert main(["--from", "orbax", "--to", "hf", str(tmp_path / "orbax"), str(tmp_path / "back"), "--overwrite"]) == 0
    err = capsys.readouterr().err
    n = len(theirs)
    assert f"exporting {tmp_path / 'orbax'} ({n} tensors" in err and f"[{n}/{n} tensors]" in err  # progress
    assert _convert("--from", "orbax", "--to", "hf", tmp_path / "orbax", tmp_path / "back") == 1  # no --overwrite
    err = capsys.readouterr().err
    assert err.startswith("convert: error: ") and "--overwrite" in err and err.count("\n") == 1


def test_convert_to_hf_merges_a_peft_adapter(tiny_torch, tiny_dir, tmp_path, capsys):
    import peft
    from transformers import Idefics2ForConditionalGeneration

    base = copy.deepcopy(tiny_torch)
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=idefics2_jax.lora
                                                      .DEFAULT_TARGET_MODULES, modules_to_save=["connector"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    tuned.eval().save_pretrained(tmp_path / "adapter")
    assert _convert("--from", "hf", "--to", "hf", tiny_dir, tmp_path / "merged", "--adapter", tmp_path / "adapter") == 0
    merged, info = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    rng = np.random.default_rng(0)
    ids, mask = R.left_pad([R.image_prompt(rng, 1, 8, 6)])
    pv, pm = R.make_pixels(rng, [[(40, 52)]])
    inputs = {k: torch.from_numpy(v) for k, v in dict(input_ids=ids, attention_mask=mask, pixel_values=pv,
                                                      pixel_attention_mask=pm).items()}
    with torch.no_grad():
        want = tuned(**inputs).logits.numpy()
        got = merged.eval()(**inputs).logits.numpy()
        plain = Idefics2ForConditionalGeneration.from_pretrained(tiny_dir).eval()(**inputs).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4 < np.abs(plain - want).max()
    bad = tmp_path / "bad_adapter"
    peft.get_peft_model(copy.deepcopy(tiny_torch), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(bad)
    config = json.load(open(bad / "adapter_config.json"))
    config["r"] = 8  # the stored factors are rank 4: shapes differ
    json.dump(config, open(bad / "adapter_config.json", "w"))
    capsys.readouterr()
    assert _convert("--from", "hf", "--to", "hf", tiny_dir, tmp_path / "x", "--adapter", bad) == 1
    assert _convert("--from", "hf", "--to", "hf", tiny_dir, os.path.join(tiny_dir, "inside")) == 1
    assert _convert("--from", "hf", "--to", "orbax", tiny_dir, tmp_path / "y", "--adapter", tmp_path / "adapter") == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("convert: error: ") for e in errors), errors
    assert "inside" in errors[1] and "--to hf" in errors[2]
    assert not any(os.path.exists(p) for p in (tmp_path / "x", tmp_path / "y", os.path.join(tiny_dir, "inside")))




@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_export_leaves_nothing(sig, tiny_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", R.SLOW_CONVERT_CHILD, "--from", "hf", "--to", "hf", tiny_dir,
                             str(tmp_path / "out")], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the shard file is being written tensor by tensor
        tmps = [e for e in os.listdir(tmp_path) if e.startswith(".out.save-tmp-")]
        if tmps and os.path.exists(tmp_path / tmps[0] / "model.safetensors"):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError("the export never started writing")
    number = getattr(signal, sig)
    proc.send_signal(number)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + number, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []
