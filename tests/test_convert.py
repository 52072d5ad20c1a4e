"""`python -m convert --from hf`: HF safetensors -> self-contained Orbax directory (issue 4).

Pins down: logits from the converted directory equal logits from the source (bit-equal for the same dtype), for a
single-file fp32 checkpoint and a sharded bf16 one with an index; casts on the way match casting at load time; a
restore with shardings places each param's slices; every bad input exits 1 with one line naming the file or key and
leaves no DST; an interrupted conversion (SIGINT, SIGTERM, SIGKILL + rerun) leaves neither DST nor a temporary dir.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import idefics2_jax
from convert import ConversionError, convert_hf_to_orbax
from convert.__main__ import main as convert_main
from idefics2_jax.ckpt.orbax import MANIFEST, is_orbax_dir, restore_params
from idefics2_jax.config import Idefics2Config

import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 8  # tiny perceiver latents per image


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    seqs = [R.image_prompt(rng, 1, SEQ, 4), R.image_prompt(rng, 0, SEQ, 9)]
    ids, mask = R.left_pad(seqs)
    pv, pm = R.make_pixels(rng, [[(45, 60)], []])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pm)


@pytest.fixture(scope="module")
def bf16_dir(tiny_torch, tmp_path_factory):
    """Sharded bf16 checkpoint with model.safetensors.index.json, plus tokenizer and processor files."""
    path = tmp_path_factory.mktemp("tiny_bf16_sharded")
    R.save(copy.deepcopy(tiny_torch), path, dtype=torch.bfloat16, max_shard_size="2MB")  # .to() is in place
    assert os.path.exists(path / "model.safetensors.index.json")
    try:
        import preprocessing_fixtures

        preprocessing_fixtures.write_reference_dir(str(path))
    except (ImportError, FileNotFoundError):  # mistral-common missing: the processor check is skipped
        pass
    return str(path)


def _logits(model_params, batch):
    model, params = model_params
    return np.asarray(model.apply({"params": params}, **batch).logits.astype(jnp.float32))


def _assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (key, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape, key
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)),
                                      err_msg=str(key))


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "convert", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def _siblings(path):
    parent, name = os.path.split(str(path))
    return sorted(e for e in os.listdir(parent) if name in e)


# ----------------------------------------------------------------------------------------------- round trips
def test_fp32_single_file_cli_logits_bit_equal(tiny_dir, tiny_jax, batch, tmp_path):
    dst = tmp_path / "out"
    r = _cli("--from", "hf", tiny_dir, str(dst))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("converted 83 tensors"), r.stdout
    assert "[83/83 tensors]" in r.stderr  # progress (tensors and bytes) on stderr
    assert _siblings(dst) == ["out"] and is_orbax_dir(dst) and not is_orbax_dir(tiny_dir)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["dtype"] == "float32" and manifest["num_tensors"] == 83
    model, params = idefics2_jax.load_model(dst)
    assert model.dtype == jnp.float32
    _assert_trees_equal(params, tiny_jax[1])
    np.testing.assert_array_equal(_logits((model, params), batch), _logits(tiny_jax, batch))


def test_sharded_bf16_logits_bit_equal_and_side_files(bf16_dir, batch, tmp_path):
    dst = tmp_path / "out"
    # A small chunk size so that every large tensor is written as many slabs (the embedding in ~60).
    summary = convert_hf_to_orbax(bf16_dir, dst, chunk_bytes=64 * 1024)
    assert summary.tensors == 83 and summary.dtype == summary.source_dtype == "bfloat16"
    src_model, src_params = idefics2_jax.load_model(bf16_dir)
    model, params = idefics2_jax.load_model(dst)
    assert model.dtype == src_model.dtype == jnp.bfloat16
    _assert_trees_equal(params, src_params)
    np.testing.assert_array_equal(_logits((model, params), batch), _logits((src_model, src_params), batch))
    # Restoring into another dtype casts while reading, exactly as loading the source in that dtype does.
    _assert_trees_equal(idefics2_jax.load_model(dst, dtype="float32")[1],
                        idefics2_jax.load_model(bf16_dir, dtype="float32")[1])
    # Self-contained: everything but the weights is copied; config.json's dtype tells what is stored.
    for name in os.listdir(bf16_dir):
        if name.endswith(".safetensors") or name.endswith(".index.json") or name == "config.json":
            continue
        assert (dst / name).read_bytes() == open(os.path.join(bf16_dir, name), "rb").read(), name
    assert Idefics2Config.from_pretrained(dst).dtype == "bfloat16"
    if os.path.exists(os.path.join(bf16_dir, "tokenizer.model")):
        from idefics2_jax.processing import Idefics2Processor

        ours, theirs = Idefics2Processor.from_pretrained(dst), Idefics2Processor.from_pretrained(bf16_dir)
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]}]
        assert ours.apply_chat_template(chat, add_generation_prompt=True) == \
            theirs.apply_chat_template(chat, add_generation_prompt=True)
        assert ours.tokenizer.encode("User: hello<end_of_utterance>") == \
            theirs.tokenizer.encode("User: hello<end_of_utterance>")


def test_cast_on_the_way_equals_cast_at_load(tiny_dir, batch, tmp_path):
    dst = tmp_path / "out"
    assert convert_main(["--from", "hf", tiny_dir, str(dst), "--dtype", "bfloat16", "--quiet"]) == 0
    assert json.loads((dst / MANIFEST).read_text())["dtype"] == "bfloat16"
    model, params = idefics2_jax.load_model(dst)
    ref = idefics2_jax.load_model(tiny_dir, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    _assert_trees_equal(params, ref[1])
    np.testing.assert_array_equal(_logits((model, params), batch), _logits(ref, batch))


def test_restore_into_shardings_on_two_devices(bf16_dir, tmp_path):
    """Each device gets exactly its slice, in the requested dtype (a fresh process with 2 CPU devices)."""
    dst = tmp_path / "out"
    convert_hf_to_orbax(bf16_dir, dst, chunk_bytes=64 * 1024)
    script = textwrap.dedent(f"""
        import jax, numpy as np, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from flax.traverse_util import flatten_dict
        import idefics2_jax
        from idefics2_jax.ckpt.orbax import restore_params
        from idefics2_jax.config import Idefics2Config
        assert len(jax.devices()) == 2
        mesh = Mesh(np.array(jax.devices()), ("model",))
        config = Idefics2Config.from_pretrained({str(dst)!r})
        # (the vocab, 32003, divides by nothing useful: shard the other axis)
        shardings = {{("text_model", "embed_tokens", "embedding"): NamedSharding(mesh, P(None, "model")),
                      ("lm_head", "kernel"): NamedSharding(mesh, P("model", None)),
                      ("text_model", "layers_1", "mlp", "up_proj", "kernel"): NamedSharding(mesh, P(None, "model"))}}
        params, dtype = restore_params({str(dst)!r}, config, "float32", shardings)
        flat = flatten_dict(params)
        ref = flatten_dict(idefics2_jax.load_model({bf16_dir!r}, dtype="float32")[1])
        for key, spec in shardings.items():
            a = flat[key]
            assert a.sharding == spec and a.dtype == jnp.float32, (key, a.sharding)
            for shard in a.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(ref[key])[shard.index])
        try:
            from idefics2_jax.ckpt.placement import param_shardings  # noqa: F401
        except ImportError:
            pass
        else:
            model, p = idefics2_jax.load_model({str(dst)!r}, mesh=mesh)
            assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(p) if hasattr(x.sharding, "mesh"))
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_overwrite(tiny_dir, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert_main(["--from", "hf", tiny_dir, str(dst), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and str(dst) in err and "--overwrite" in err
    assert (dst / "keep.txt").read_text() == "mine"
    assert convert_main(["--from", "hf", tiny_dir, str(dst), "--quiet", "--overwrite"]) == 0
    assert is_orbax_dir(dst) and not (dst / "keep.txt").exists() and _siblings(dst) == ["out"]


def test_help_documents_the_cli():
    r = _cli("--help")
    assert r.returncode == 0
    for word in ("--from", "hf", "SRC", "DST", "--dtype", "bfloat16", "--overwrite", "--quiet", "Orbax"):
        assert word in r.stdout, word


# ---------------------------------------------------------------------------------------------- bad inputs
def _copy(src, tmp_path, name="src"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _rewrite(file, mutate):
    tensors = load_file(str(file))
    mutate(tensors)
    save_file(tensors, str(file))


def _no_config(src):
    (src / "config.json").unlink()
    return "config.json"


def _missing_shard(src):
    (src / "model-00002-of-00003.safetensors").unlink()
    return "model-00002-of-00003.safetensors"


def _truncated_shard(src):
    shard = src / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    return "model-00001-of-00003.safetensors"


def _corrupt_shard(src):
    shard = src / "model-00003-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header....."
    shard.write_bytes(bytes(data))
    return "model-00003-of-00003.safetensors"


def _unknown_tensor(src):
    _rewrite(src / "model.safetensors", lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    return "model.extra.weight"


def _missing_tensor(src):
    _rewrite(src / "model.safetensors", lambda t: t.pop("model.text_model.norm.weight"))
    return "model.text_model.norm.weight"


def _wrong_shape(src):
    _rewrite(src / "model.safetensors", lambda t: t.update({"lm_head.weight": np.zeros((32003, 60), np.float32)}))
    return "lm_head.weight"


def _bad_model_type(src):
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llava"
    (src / "config.json").write_text(json.dumps(config))
    return "model_type"


@pytest.mark.parametrize("corrupt,sharded", [
    (_no_config, False), (_missing_shard, True), (_truncated_shard, True), (_corrupt_shard, True),
    (_unknown_tensor, False), (_missing_tensor, False), (_wrong_shape, False), (_bad_model_type, False),
])
def test_bad_input_one_line_nonzero_no_dst(corrupt, sharded, tiny_dir, bf16_dir, tmp_path, capsys):
    src = _copy(bf16_dir if sharded else tiny_dir, tmp_path)
    named = corrupt(src)
    dst = tmp_path / "out"
    assert convert_main(["--from", "hf", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert: error: ") and named in err, err
    assert "Traceback" not in err
    assert not os.path.lexists(dst) and _siblings(dst) == []


def test_bad_input_through_the_real_cli(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    _missing_tensor(src)
    r = _cli("--from", "hf", str(src), str(tmp_path / "out"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "convert: error: checkpoint is missing tensor 'model.text_model.norm.weight'"]
    assert _cli("--from", "hf", str(src), str(tmp_path / "out"), "--dtype", "int8").returncode == 2  # argparse


def test_python_api_raises_conversion_error(tmp_path):
    with pytest.raises(ConversionError, match="not a directory"):
        convert_hf_to_orbax(tmp_path / "nope", tmp_path / "out")


# ----------------------------------------------------------------------------------------------- interrupts
# The child slows each slab read down so that the kill lands mid-way, deterministically: it is sent once the
# temporary directory holds written data, and the whole conversion would take > 10 s.


def _start_slow(src, dst):
    proc = subprocess.Popen([sys.executable, "-c", R.SLOW_CONVERT_CHILD, "--from", "hf", str(src), str(dst)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent, name = os.path.split(str(dst))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tmps = [e for e in os.listdir(parent) if e.startswith(f".{name}.convert-tmp-")]
        data = [f for t in tmps for _, _, fs in os.walk(os.path.join(parent, t)) for f in fs]
        if len(data) >= 3:  # Orbax's temporary params dir exists and slabs are being written
            return proc
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the conversion never started writing")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_leaves_nothing(sig, tiny_dir, tmp_path):
    dst = tmp_path / "out"
    proc = _start_slow(tiny_dir, dst)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []  # no DST, no temporary directory


def test_killed_conversion_is_cleaned_up_by_the_next(tiny_dir, tmp_path):
    dst = tmp_path / "out"
    proc = _start_slow(tiny_dir, dst)
    proc.kill()  # SIGKILL: nothing can run in the child
    proc.communicate(timeout=60)
    assert not os.path.lexists(dst) and len(_siblings(dst)) == 1  # the orphaned temporary directory
    assert not is_orbax_dir(tmp_path / _siblings(dst)[0])  # and it is never taken for a checkpoint
    convert_hf_to_orbax(tiny_dir, dst)
    assert _siblings(dst) == ["out"] and is_orbax_dir(dst)


def test_streaming_save_is_a_plain_orbax_checkpoint(tmp_path):
    """Slab-written leaves (odd row counts, transposed axis, 0-d) read back with stock Orbax, no idefics2 code."""
    import orbax.checkpoint as ocp

    from idefics2_jax.ckpt.orbax import LazyLeaf, save_params_streaming

    rng = np.random.default_rng(0)
    arrays = {("a", "w"): rng.standard_normal((37, 5), np.float32), ("b",): np.float32(3.5),
              ("c", "k"): rng.standard_normal((3, 41), np.float32).astype(jnp.bfloat16)}
    leaves = {k: LazyLeaf.from_array(v) for k, v in arrays.items()}
    t = arrays[("c", "k")]  # a leaf produced along axis 1, as the converter does for transposed kernels
    leaves[("c", "k")] = LazyLeaf(t.shape, t.dtype, lambda a, b: np.ascontiguousarray(t[:, a:b]), axis=1)
    written = []
    save_params_streaming(tmp_path / "ckpt", leaves, on_leaf=written.append, chunk_bytes=64)
    assert len(written) == 3
    restored = ocp.StandardCheckpointer().restore(str(tmp_path / "ckpt"))
    for key, value in arrays.items():
        got = restored
        for k in key:
            got = got[k]
        np.testing.assert_array_equal(np.asarray(got), value)
        assert np.asarray(got).dtype == np.asarray(value).dtype


def test_restore_rejects_a_checkpoint_for_another_config(tiny_dir, tmp_path):
    dst = tmp_path / "out"
    convert_hf_to_orbax(tiny_dir, dst)
    config = Idefics2Config.from_dict({**R.tiny_config_dict(), "text_config": {
        **R.tiny_config_dict()["text_config"], "num_hidden_layers": 3}})
    with pytest.raises(ValueError, match="missing param 'text_model/layers_2"):
        restore_params(dst, config)
