"""Sharded inference (issue 6): rules table -> PartitionSpecs, and the model on 8 simulated CPU devices.

The multi-device checks run in one subprocess (`python tests/test_sharding.py --worker ...`) with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported there; pytest's own process already
has jax initialised with one device. Meshes (data, fsdp, model): (1,1,8), (2,1,4), (8,1,1) and (2,2,2); for each,
sharded logits must equal the single-device ones within 1e-5, greedy tokens must be identical, and every large
weight's addressable shard must be 1/k of it along each k-way sharded dimension.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(1, 1, 8), (2, 1, 4), (8, 1, 1), (2, 2, 2)]
N_NEW = 6
TOL = 1e-5
# The tiny model with 8 query heads over 4 KV heads: KV heads divide a 4-way model axis, not an 8-way one.
TEXT_OVERRIDES = dict(num_attention_heads=8, num_key_value_heads=4)


# ============================================================================================ in-process checks
def _abstract(**sizes):
    from jax.sharding import AbstractMesh

    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def test_logical_to_spec_divisibility_and_missing_axes():
    from jax.sharding import PartitionSpec as P

    from idefics2_jax.nn.partitioning import DEFAULT_RULES, logical_to_spec

    mesh = _abstract(data=2, fsdp=2, model=4)
    assert logical_to_spec(("embed", "heads"), mesh, DEFAULT_RULES, (4096, 4096)) == P("fsdp", "model")
    # batch -> ("data", "fsdp"): each mesh axis is kept only if it still divides the dimension.
    assert logical_to_spec(("batch", "length"), mesh, DEFAULT_RULES, (8, 5)) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), mesh, DEFAULT_RULES, (2, 5)) == P("data", None)
    assert logical_to_spec(("batch", "length"), mesh, DEFAULT_RULES, (3, 5)) == P(None, None)  # replicated
    # 8 KV heads on a 16-way model axis: replicated (activations and cache are never reassigned).
    big = _abstract(data=1, fsdp=1, model=16)
    assert logical_to_spec(("batch", "cache_length", "kv_heads", "head_dim"), big, DEFAULT_RULES,
                           (1, 4096, 8, 128)) == P(None, None, None, None)
    # vocab 32003 is prime: parameters move the dropped "model" axis onto their embed dimension instead.
    assert logical_to_spec(("embed", "vocab"), mesh, DEFAULT_RULES, (4096, 32003)) == P("fsdp", None)
    assert logical_to_spec(("embed", "vocab"), mesh, DEFAULT_RULES, (4096, 32003), reassign=True) == P(
        ("fsdp", "model"), None)
    assert logical_to_spec(("vocab", "embed"), mesh, DEFAULT_RULES, (32003, 4096), reassign=True) == P(
        None, ("fsdp", "model"))
    # A mesh may use any subset of the names; size-1 axes are left out; unnamed dims are never reassigned.
    only_model = _abstract(model=4)
    assert logical_to_spec(("embed", "mlp"), only_model, DEFAULT_RULES, (64, 128)) == P(None, "model")
    assert logical_to_spec((None, "embed"), only_model, DEFAULT_RULES, (64, 63), reassign=True) == P(None, None)
    assert logical_to_spec(("embed", "mlp"), _abstract(data=1, fsdp=1, model=1), DEFAULT_RULES, (64, 128)) == P(
        None, None)
    # Another strategy is another table.
    assert logical_to_spec(("embed", "mlp"), mesh, {"embed": "model", "mlp": None}, (64, 128)) == P("model", None)


def test_every_logical_name_has_a_rule():
    from idefics2_jax.ckpt.table import WEIGHT_TABLE
    from idefics2_jax.nn import partitioning as S

    names = {a for rule in WEIGHT_TABLE for a in rule.axes if a is not None}
    names |= {a for axes in (S.HIDDEN_AXES, S.LOGITS_AXES, S.CACHE_KV_AXES, *S.INPUT_AXES.values()) for a in axes}
    names |= {"images", "patches", "heads", "kv_heads", "head_dim"}
    names.discard(None)
    assert names <= set(S.DEFAULT_RULES), names - set(S.DEFAULT_RULES)
    assert set(S.VISION_TENSOR_PARALLEL_RULES) == set(S.DEFAULT_RULES)


def test_real_config_param_specs_split_every_large_weight():
    """idefics2-8b on (data 1, fsdp 1, model 8): every decoder / connector weight is 1/8 per device."""
    import math

    from idefics2_jax.config import Idefics2Config
    from idefics2_jax.ckpt.placement import param_specs
    from idefics2_jax.ckpt.shapes import param_shapes
    from idefics2_jax.nn.partitioning import shard_shape

    config = Idefics2Config.from_json_file(os.path.join(ROOT, "tests", "data", "idefics2-8b.config.json"))
    mesh = _abstract(data=1, fsdp=1, model=8)
    specs, shapes = param_specs(config, mesh), param_shapes(config)
    for path, spec in specs.items():
        n = math.prod(shapes[path])
        per_device = math.prod(shard_shape(shapes[path], spec, mesh))
        if path[0] in ("text_model", "connector", "lm_head") and n >= 1 << 20:
            assert per_device * 8 == n, (path, spec)
        if path[0] == "vision_model":  # data-parallel vision tower: replicated over "model"
            assert per_device == n, (path, spec)


def test_constrain_is_a_noop_without_a_mesh():
    import jax.numpy as jnp

    from idefics2_jax.nn.partitioning import constrain

    x = jnp.ones((2, 3, 4))
    assert constrain(x, ("batch", "length", "act_embed")) is x


def test_memory_table_in_docs_is_current():
    """docs/SHARDING.md holds exactly what `benchmarks/memory_table.py` prints (jax.eval_shape, no weights)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_table.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout.strip()
    assert "| 16 |" in table and "KV cache" in table
    with open(os.path.join(ROOT, "docs", "SHARDING.md"), encoding="utf-8") as f:
        assert table in f.read(), "re-run benchmarks/memory_table.py and paste its output into docs/SHARDING.md"


def test_notebook_is_valid_nbformat4():
    with open(os.path.join(ROOT, "notebooks", "tpu_sharded_inference.ipynb"), encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and nb["cells"]
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for needle in ("jax.distributed.initialize()", "make_mesh(", "load_model(", "mesh=mesh", "generate("):
        assert needle in code, needle
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            compile("".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))),
                    "cell", "exec")


# ============================================================================================ 8-device worker
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    import reference as R

    root = tmp_path_factory.mktemp("sharding")
    R.save(R.build_torch_model(R.tiny_config_dict(**TEXT_OVERRIDES), seed=0), root / "hf")
    from convert import convert_hf_to_orbax

    convert_hf_to_orbax(root / "hf", root / "orbax")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               IDEFICS2_JAX_COMPILATION_CACHE="0")  # generate's persistent cache: keep this run self-contained
    start = time.monotonic()
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(root)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
    with open(root / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    results["seconds"] = time.monotonic() - start
    return results


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "data%d-fsdp%d-model%d" % m)
def test_sharded_logits_and_greedy_tokens_match_single_device(worker, mesh):
    res = worker["meshes"]["%d,%d,%d" % mesh]
    assert res["logits_max_abs_diff"] <= TOL
    assert res["logits_max_abs"] > 1.0  # O(1) logits, so the tolerance means something
    assert res["tokens"] == worker["reference_tokens"]
    assert res["step_logits_max_abs_diff"] <= TOL


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "data%d-fsdp%d-model%d" % m)
def test_generate_on_a_mesh_matches_single_device(worker, mesh):
    ref = worker["generate_reference"]
    assert not isinstance(ref, str), ref
    assert worker["meshes"]["%d,%d,%d" % mesh]["generate"] == ref


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "data%d-fsdp%d-model%d" % m)
def test_each_large_weight_shard_is_one_kth(worker, mesh):
    data, fsdp, model = mesh
    res = worker["meshes"]["%d,%d,%d" % mesh]
    shards, shapes = res["shards"], res["shapes"]
    d = 64  # text hidden
    expect = {  # path: shard shape (HF layout transposed: kernels are [in, out])
        "text_model/layers_0/self_attn/q_proj/kernel": (d // fsdp, 64 // model),
        "text_model/layers_0/self_attn/k_proj/kernel": (d // fsdp, 32 // model),
        "text_model/layers_1/self_attn/o_proj/kernel": (64 // model, d // fsdp),
        "text_model/layers_1/mlp/gate_proj/kernel": (d // fsdp, 128 // model),
        "text_model/layers_1/mlp/down_proj/kernel": (128 // model, d // fsdp),
        # vocab 32003 divides nothing: the "model" axis moves to embed (fsdp x model = 8 on every mesh but (8,1,1))
        "text_model/embed_tokens/embedding": (32003, d // (fsdp * model)),
        "lm_head/kernel": (d // (fsdp * model), 32003),
        "connector/perceiver_resampler/layers_0/mlp/up_proj/kernel": (d // fsdp, 256 // model),
        "connector/modality_projection/gate_proj/kernel": (32 // fsdp, 128 // model),
        # data-parallel vision tower: replicated over "model", split only by fsdp
        "vision_model/encoder/layers_0/mlp/fc1/kernel": (32 // fsdp, 64),
    }
    for path, shape in expect.items():
        assert tuple(shards[path]) == shape, (path, shards[path], shape)
    # The Orbax directory restores into the same shards.
    assert res["orbax_shards"] == shards
    assert res["orbax_logits_max_abs_diff"] <= TOL
    # Every param: each addressable shard is the global shape divided by its spec's mesh axes.
    for path, (shape, spec_sizes) in shapes.items():
        assert tuple(shards[path]) == tuple(n // k for n, k in zip(shape, spec_sizes)), path


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "data%d-fsdp%d-model%d" % m)
def test_kv_cache_sharded_over_batch_and_kv_heads(worker, mesh):
    data, fsdp, model = mesh
    res = worker["meshes"]["%d,%d,%d" % mesh]
    batch, slots, kv_heads, head_dim = res["cache_shape"]
    assert batch == 8 and kv_heads == 4
    # 4 KV heads on an 8-way model axis do not divide: replicated over "model" (documented).
    want = (batch // (data * fsdp), slots, kv_heads // model if kv_heads % model == 0 else kv_heads, head_dim)
    assert tuple(res["cache_shard"]) == want
    assert res["cache_sharding_kept"]  # every decode step returns the cache in the sharding it got
    # The logits constraint splits the batch of 8 over data x fsdp (the vocab, 32003, stays whole).
    want_batch = [a for a, n in (("data", data), ("fsdp", fsdp)) if n > 1]
    spec = res["step_logits_spec"] + [[], []]  # [batch, vocab]; trailing unsplit dims may be left out
    assert spec[0] == want_batch and not spec[1]


def test_alternative_rules_table_changes_sharding_not_results(worker):
    res = worker["vision_tp"]
    assert tuple(res["fc1_shard"]) == (32, 64 // 4)
    assert res["logits_max_abs_diff"] <= TOL


def test_worker_is_fast_enough(worker):
    assert worker["seconds"] < 240, worker["seconds"]


# ----------------------------------------------------------------------------------------- the worker itself
def _batch(rng, n, seq_len):
    import reference as R

    kinds = [(2, 5), (0, 30), (1, 7), (1, 3), (0, 12), (2, 2), (1, 20), (0, 4)]
    sizes = [[(45, 60), (70, 33)], [], [(60, 75)], [(28, 42)], [], [(30, 30), (50, 20)], [(42, 56)], []]
    seqs = [R.image_prompt(rng, kinds[i][0], seq_len, kinds[i][1]) for i in range(n)]
    ids, mask = R.left_pad(seqs)
    pv, pm = R.make_pixels(rng, sizes[:n])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pm)


def _greedy(model, params, batch, n_new, mesh=None):
    """Prefill + n_new cached greedy steps with the model's own KV cache; returns (tokens, step logits, caches)."""
    import jax
    import jax.numpy as jnp

    from idefics2_jax.ckpt.placement import init_cache
    from idefics2_jax.nn.partitioning import shard_batch

    cfg = model.config.text_config
    b, t = batch["input_ids"].shape
    cache = init_cache(cfg, b, t + n_new, jnp.float32)  # sharded when a mesh is active, else text.init_cache
    if mesh is not None:
        batch = shard_batch(batch, mesh)
    pos = np.maximum(np.cumsum(batch["attention_mask"], axis=1) - 1, 0)

    @jax.jit
    def prefill(p, batch, pos, cache):
        out = model.apply({"params": p}, **batch, position_ids=pos, cache=cache, cache_index=0)
        return out.logits[:, -1], out.cache

    @jax.jit
    def step(p, tok, pos, cache, index):
        out = model.apply({"params": p}, tok[:, None], attention_mask=jnp.ones((b, 1), bool),
                          position_ids=pos[:, None], cache=cache, cache_index=index)
        return out.logits[:, -1], out.cache

    logits, cache = prefill(params, batch, pos, cache)
    caches, step_logits = [cache], [np.asarray(logits)]
    tokens = [np.asarray(jnp.argmax(logits, -1))]
    next_pos = pos[:, -1] + 1
    for i in range(n_new - 1):
        logits, cache = step(params, jnp.argmax(logits, -1), next_pos + i, cache, t + i)
        caches.append(cache)
        step_logits.append(np.asarray(logits))
        tokens.append(np.asarray(jnp.argmax(logits, -1)))
    return np.stack(tokens, 1), np.stack(step_logits, 1), caches, logits.sharding


def _run_worker(root: str) -> None:
    import jax
    from flax.traverse_util import flatten_dict

    import idefics2_jax
    from idefics2_jax.nn import partitioning as S

    assert len(jax.devices()) == 8, jax.devices()
    hf, orbax = os.path.join(root, "hf"), os.path.join(root, "orbax")
    rng = np.random.default_rng(0)
    model, params = idefics2_jax.load_model(hf)
    seq = model.config.image_seq_len
    forward_batch = _batch(rng, 3, seq)  # batch 3: divides no data axis -> replicated
    gen_batch = _batch(rng, 8, seq)

    def logits_fn(p, b):
        return model.apply({"params": p}, **b).logits

    ref = np.asarray(jax.jit(logits_fn)(params, forward_batch))
    ref_tokens, ref_step_logits, _, _ = _greedy(model, params, gen_batch, N_NEW)
    results = {"reference_tokens": ref_tokens.tolist(), "meshes": {}}
    from idefics2_jax.generation import generate

    def run_generate(p):
        try:
            out = generate(model, p, **gen_batch, max_new_tokens=N_NEW)
            return np.asarray(getattr(out, "sequences", out)).tolist()
        except Exception as e:  # reported by the test, with the mesh
            return f"{type(e).__name__}: {e}"

    results["generate_reference"] = run_generate(params)

    def sharded_logits(p, mesh, rules=None):
        with S.use_mesh(mesh, rules):
            return np.asarray(jax.jit(logits_fn)(p, S.shard_batch(forward_batch, mesh, rules)))

    def shard_info(p):
        shards, shapes = {}, {}
        for path, x in flatten_dict(p).items():
            name = "/".join(path)
            blocks = {tuple(s.data.shape) for s in x.addressable_shards}
            assert len(blocks) == 1, (name, blocks)
            shards[name] = list(blocks.pop())
            sizes = dict(x.sharding.mesh.shape)
            spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
            shapes[name] = [list(x.shape), [int(np.prod([sizes[a] for a in S._mesh_axes(e)])) for e in spec]]
        return shards, shapes

    for dims in MESHES:
        mesh = S.make_mesh(*dims)
        _, p = idefics2_jax.load_model(hf, mesh=mesh)
        out = {}
        out["shards"], out["shapes"] = shard_info(p)
        got = sharded_logits(p, mesh)
        out["logits_max_abs_diff"] = float(np.abs(got - ref).max())
        out["logits_max_abs"] = float(np.abs(ref).max())
        with S.mesh_context(p):  # what library entry points use: the mesh of the params
            tokens, step_logits, caches, logits_sharding = _greedy(model, p, gen_batch, N_NEW, mesh)
        out["step_logits_spec"] = [S._mesh_axes(e) for e in logits_sharding.spec]
        out["generate"] = run_generate(p)
        out["tokens"] = tokens.tolist()
        out["step_logits_max_abs_diff"] = float(np.abs(step_logits - ref_step_logits).max())
        k = caches[-1]["layers"][0]["k"]
        out["cache_shape"] = list(k.shape)
        out["cache_shard"] = list(k.addressable_shards[0].data.shape)
        want = S.cache_shardings(caches[0], mesh)
        out["cache_sharding_kept"] = all(
            jax.tree.all(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), c, want))
            for c in caches)
        # The converted (Orbax) directory restores straight into the same shardings.
        _, po = idefics2_jax.load_model(orbax, mesh=mesh)
        out["orbax_shards"] = shard_info(po)[0]
        out["orbax_logits_max_abs_diff"] = float(np.abs(sharded_logits(po, mesh) - ref).max())
        results["meshes"]["%d,%d,%d" % dims] = out
        print(dims, "ok", flush=True)

    # A different strategy is a different table: the vision tower tensor-parallel too.
    mesh = S.make_mesh(2, 1, 4)
    _, p = idefics2_jax.load_model(hf, mesh=mesh, rules=S.VISION_TENSOR_PARALLEL_RULES)
    fc1 = p["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    got = sharded_logits(p, mesh, S.VISION_TENSOR_PARALLEL_RULES)
    results["vision_tp"] = {"fc1_shard": list(fc1.addressable_shards[0].data.shape),
                            "logits_max_abs_diff": float(np.abs(got - ref).max())}
    with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _run_worker(sys.argv[2])
