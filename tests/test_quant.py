"""Weight-only int8 / int4 quantization of the decoder and connector (issue 17, in part).

The reference is a plain round-to-nearest quantizer of the same schemes written here with numpy, independently of
`idefics2_jax.quant`: our quantized forward must be the forward of the dequantized weights, and its error against
the float model no larger than that reference quantizer's.
"""

import os
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import idefics2_jax
from idefics2_jax import quant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R  # noqa: E402


def _rtn(w, bits, group):
    """Round-to-nearest, symmetric: per output channel (int8) or per `group` input rows (int4); dequantized."""
    w = np.asarray(w, np.float64)
    if bits == 8:
        s = np.abs(w).max(axis=0) / 127
        return np.clip(np.round(w / s), -127, 127) * s
    g = w.reshape(w.shape[0] // group, group, w.shape[1])
    s = np.abs(g).max(axis=1, keepdims=True) / 7
    return (np.clip(np.round(g / s), -7, 7) * s).reshape(w.shape)


def _is_llm_kernel(path):
    return path[-1] == "kernel" and (path[0] == "connector" or (path[0] == "text_model" and path[1] != "embed_tokens"))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids, mask = R.left_pad([R.image_prompt(rng, 1, 8, 12), R.image_prompt(rng, 2, 8, 6)])
    pv, pm = R.make_pixels(rng, [[(40, 50)], [(30, 60), (56, 28)]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pm)


def _rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


@pytest.mark.parametrize("scheme,bits,group", [("int8", 8, None), ("int4:16", 4, 16)])
def test_quantized_forward_matches_round_to_nearest(tiny_jax, inputs, scheme, bits, group):
    import jax.numpy as jnp

    model, params = tiny_jax
    q = quant.quantize_params(params, scheme)
    flat, qflat = flatten_dict(params), flatten_dict(q)
    llm = [p for p in flat if _is_llm_kernel(p)]
    assert llm and all(p not in qflat and qflat[p[:-1] + ("kernel_q",)].dtype == (jnp.int8 if bits == 8 else jnp.int4)
                       for p in llm)
    assert all(qflat[p] is flat[p] for p in flat if p not in llm)  # vision, embeddings, norms, lm_head untouched
    rtn = unflatten_dict({p: (_rtn(v, bits, group).astype(np.float32) if p in llm else v) for p, v in flat.items()})
    logits = lambda p: np.asarray(model.apply({"params": p}, **inputs).logits)  # noqa: E731
    want, ours, theirs = logits(params), logits(q), logits(rtn)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(want).max())  # the same quantizer
    assert _rel_rms(ours, want) <= 1.5 * _rel_rms(theirs, want)
    assert _rel_rms(ours, want) > 0  # something was quantized
    np.testing.assert_allclose(logits(quant.dequantize_params(q)), ours, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_load_model_quantize_generate_and_qlora(tiny_dir, tiny_jax, inputs):
    import jax

    model, params = tiny_jax
    qmodel, q = idefics2_jax.load_model(tiny_dir, quantize="int8")
    for (pa, a), (pb, b) in zip(sorted(flatten_dict(q).items()), sorted(flatten_dict(quant.quantize_params(
            params, "int8")).items())):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = idefics2_jax.generate(qmodel, q, **inputs, max_new_tokens=4)
    want = idefics2_jax.generate(model, quant.dequantize_params(q), **inputs, max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    # QLoRA: float adapters on the frozen quantized base; gradients reach them.
    lora_config = idefics2_jax.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    adapters = idefics2_jax.lora.init(qmodel, q, lora_config, jax.random.key(0))
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    grads = jax.grad(lambda a: qmodel.apply({"params": q, "lora": a}, **inputs, labels=labels).loss)(adapters)
    norms = [float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and min(norms) > 0
    with pytest.raises(ValueError, match="is quantized: merge the adapter into the float weights"):
        idefics2_jax.lora.merge(q, adapters, lora_config)


def test_bad_schemes_are_clear_errors(tiny_jax, tmp_path):
    _, params = tiny_jax
    for scheme, message in {"int3": "unknown quantization scheme 'int3'", "int4:0": "must be positive",
                            "fp8": "unknown quantization scheme"}.items():
        with pytest.raises(ValueError, match=message):
            quant.quantize_params(params, scheme)
    with pytest.raises(ValueError, match=r"group size 128 does not divide the input size \d+ of \w+/"):
        quant.quantize_params(params, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_params(quant.quantize_params(params, "int8"), "int8")
    with pytest.raises(ValueError, match="unknown quantization scheme"):  # before the (missing) directory is read
        idefics2_jax.load_model(tmp_path / "missing", quantize="int2")


@pytest.mark.parametrize("scheme", ["int8", "int4:16"])
def test_convert_quantize_writes_what_load_model_reads_as_is(tiny_dir, tiny_jax, tmp_path, scheme):
    from convert.__main__ import main

    from idefics2_jax.ckpt.orbax import read_manifest

    dst = tmp_path / "q"
    assert main(["--from", "hf", tiny_dir, str(dst), "--quantize", scheme, "--quiet"]) == 0
    assert read_manifest(dst)["quantize"] == scheme
    model, got = idefics2_jax.load_model(dst)
    want = quant.quantize_params(tiny_jax[1], scheme)
    got, want = flatten_dict(got), flatten_dict(want)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(np.asarray(got[key]).astype(np.float32), np.asarray(value).astype(np.float32),
                                      err_msg="/".join(key))
    with pytest.raises(ValueError, match="already quantized"):
        idefics2_jax.load_model(dst, quantize="int8")
    with pytest.raises(ValueError, match=f"holds {scheme} weights; HF checkpoints of Idefics2 are float"):
        idefics2_jax.loading.export_hf(dst, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_convert_quantize_bad_input_writes_nothing(tiny_dir, tmp_path, capsys):
    from convert.__main__ import main

    cases = {("--quantize", "int4"): r"group size 128 does not divide the input size \d+ of \w+/",
             ("--quantize", "int3"): "unknown quantization scheme 'int3'",
             ("--quantize", "int8", "--to", "hf"): "does not combine with --to hf"}
    for extra, message in cases.items():
        capsys.readouterr()
        assert main(["--from", "hf", tiny_dir, str(tmp_path / "q"), *extra, "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("convert: error: ") and err.count("\n") == 1
        assert __import__("re").search(message, err), err
    assert not os.listdir(tmp_path)


def _worker(hf_dir, out):
    """int8 on a (data 2, fsdp 2, model 2) mesh of 8 simulated devices vs one device."""
    import json

    import jax

    from idefics2_jax.nn.partitioning import make_mesh

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    ids, mask = R.left_pad([R.image_prompt(rng, 1, 8, 12), R.image_prompt(rng, 1, 8, 6)])
    pv, pm = R.make_pixels(rng, [[(40, 50)], [(30, 60)]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pm)
    model, one = idefics2_jax.load_model(hf_dir, quantize="int8")
    want = np.asarray(model.apply({"params": one}, **inputs).logits)
    mesh = make_mesh(data=2, fsdp=2, model=2)
    _, sharded = idefics2_jax.load_model(hf_dir, mesh=mesh, quantize="int8")
    from idefics2_jax.nn.partitioning import use_mesh

    with use_mesh(mesh):
        got = np.asarray(jax.jit(lambda p: model.apply({"params": p}, **inputs).logits)(sharded))
    split = {"/".join(k): [int(s) for s in v.addressable_shards[0].data.shape] != list(v.shape)
             for k, v in flatten_dict(sharded).items() if k[-1] in ("kernel_q", "kernel_scale")}
    # A checkpoint written quantized (`convert --quantize`), restored straight into the shardings.
    from idefics2_jax.ckpt.convert import convert_hf_to_orbax

    converted = os.path.join(os.path.dirname(out), "int8")
    convert_hf_to_orbax(hf_dir, converted, quantize="int8")
    _, restored = idefics2_jax.load_model(converted, mesh=mesh)
    with use_mesh(mesh):
        again = np.asarray(jax.jit(lambda p: model.apply({"params": p}, **inputs).logits)(restored))
    same_split = all([int(s) for s in restored_leaf.addressable_shards[0].data.shape] ==
                     [int(s) for s in flatten_dict(sharded)[k].addressable_shards[0].data.shape]
                     for k, restored_leaf in flatten_dict(restored).items())
    with open(out, "w") as f:
        json.dump({"diff": float(np.abs(got - want).max()), "max": float(np.abs(want).max()), "split": split,
                   "restored_diff": float(np.abs(again - want).max()), "same_split": same_split}, f)


def test_int8_on_eight_simulated_devices_matches_one(tiny_dir, tmp_path):
    import json
    import subprocess

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", tiny_dir, str(out)], capture_output=True,
                       text=True, env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.load(open(out))
    assert res["diff"] <= 1e-5 * max(1.0, res["max"]), res
    split = res["split"]
    layer = "text_model/layers_0/"
    assert split[layer + "self_attn/q_proj/kernel_q"] and split[layer + "mlp/down_proj/kernel_q"]
    assert split[layer + "self_attn/q_proj/kernel_scale"]  # scales follow their output channels
    assert sum(split.values()) >= len(split) // 2, split
    assert res["restored_diff"] <= 1e-5 * max(1.0, res["max"]) and res["same_split"], res


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
