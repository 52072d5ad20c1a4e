"""LoRA adapters against peft (REFERENCE §11): forward, gradients, PEFT's file format both ways, merge."""

import copy
import json

import jax
import numpy as np
import peft
import pytest
import torch

import idefics2_jax
from idefics2_jax import lora
from idefics2_jax.ckpt.table import entry_for_key

import reference as R

SEQ = 8
TUTORIAL = lora.DEFAULT_TARGET_MODULES
VARIANTS = {
    "tutorial": dict(r=4, lora_alpha=8, target_modules=TUTORIAL),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=TUTORIAL, modules_to_save=["connector"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], use_rslora=True),
}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    seqs = [R.image_prompt(rng, 2, SEQ, 5), R.image_prompt(rng, 1, SEQ, 20)]
    ids, mask = R.left_pad(seqs)
    pv, pm = R.make_pixels(rng, [[(45, 60), (70, 33)], [(60, 75)]])
    labels = np.where(mask == 1, ids, -100)
    labels[:, : ids.shape[1] // 2] = -100
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pm, labels=labels)


def _peft_model(tiny_torch, kwargs, seed):
    model = peft.get_peft_model(copy.deepcopy(tiny_torch), peft.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # non-zero B, A at a scale that makes the update O(0.1-1)
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
            elif "modules_to_save" in name:  # the trained copy differs from the frozen original
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def adapter(request, tiny_torch, tmp_path_factory):
    model = _peft_model(tiny_torch, VARIANTS[request.param], seed=len(request.param))
    path = tmp_path_factory.mktemp(f"adapter_{request.param}")
    model.save_pretrained(path)
    return request.param, model, str(path)


def _torch(model, batch, grads=False):
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    if grads:
        return model(**t)
    with torch.no_grad():
        return model(**t)


def _close(got, want, valid, tol=1e-4):
    assert np.abs(want[valid]).max() > 1.0
    assert np.abs(got - want)[valid].max() <= tol, (np.abs(got - want)[valid].max(), np.abs(want[valid]).max())
    np.testing.assert_array_equal(got.argmax(-1)[valid], want.argmax(-1)[valid])


def test_load_and_forward_match_peft(adapter, tiny_jax, tiny_dir, batch):
    name, peft_model, path = adapter
    model, params = tiny_jax
    adapters, cfg = lora.load(path)
    assert cfg.r == 4 and cfg.use_rslora == (name == "rslora")
    want = _torch(peft_model, batch).logits.numpy()
    base = np.asarray(model.apply({"params": params}, **batch).logits)
    got = np.asarray(model.apply({"params": params, "lora": adapters}, **batch).logits)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(base - want)[valid].max() > 1e-2  # the adapter changes the answer
    _close(got, want, valid)
    _, merged = idefics2_jax.load_model(tiny_dir, adapter=path)
    _close(np.asarray(model.apply({"params": merged}, **batch).logits), want, valid)


def test_gradients_match_peft_autograd(adapter, tiny_jax, batch):
    name, peft_model, path = adapter
    model, params = tiny_jax
    adapters, _ = lora.load(path)
    peft_model.zero_grad()
    out = _torch(peft_model, batch, grads=True)
    out.loss.backward()
    grads = jax.grad(lambda a: model.apply({"params": params, "lora": a}, **batch).loss)(adapters)
    torch_grads = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if "lora_" in n}
    checked = 0
    for n, g in torch_grads.items():
        module, ab = n.rsplit(".lora_", 1)
        path = entry_for_key(module.removeprefix("base_model.model.") + ".weight").path[:-1]
        ours = np.asarray(lora._get(grads, path)["lora_" + ab.split(".")[0]]).T
        np.testing.assert_allclose(ours, g, rtol=1e-4, atol=1e-4 * np.abs(g).max())
        checked += 1
    assert checked == len(torch_grads) > 0


def test_save_loads_in_peft(adapter, tiny_torch, tiny_jax, batch, tmp_path):
    name, peft_model, path = adapter
    model, params = tiny_jax
    adapters, cfg = lora.load(path)
    lora.save(tmp_path, adapters, cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "Idefics2ForConditionalGeneration"
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_torch), str(tmp_path)).eval()
    want = _torch(peft_model, batch).logits.numpy()
    _close(_torch(reloaded, batch).logits.numpy(), want, batch["attention_mask"].astype(bool), tol=1e-5)


def test_merge_equals_lora_forward(tiny_jax, batch):
    model, params = tiny_jax
    cfg = idefics2_jax.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False)
    adapters = lora.init(model, params, cfg, jax.random.key(0))
    got = model.apply({"params": params, "lora": adapters}, **batch).logits
    merged = model.apply({"params": lora.merge(params, adapters, cfg)}, **batch).logits
    base = model.apply({"params": params}, **batch).logits
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(got - base))[valid].max() > 1e-2
    assert np.abs(np.asarray(got - merged))[valid].max() <= 1e-4


def test_init_matches_peft_defaults(tiny_torch, tiny_jax):
    model, params = tiny_jax
    adapters = lora.init(model, params, idefics2_jax.LoraConfig(r=8), jax.random.key(1))
    ref = peft.get_peft_model(copy.deepcopy(tiny_torch), peft.LoraConfig(r=8, lora_alpha=8, target_modules=TUTORIAL))
    ref_names = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                 for n, _ in ref.named_parameters() if ".lora_A." in n}
    ours = set()

    def walk(node, path):
        if "lora_A" in node:
            ours.add(lora._hf_module(path))
            fan_in = node["lora_A"].shape[0]
            assert np.abs(np.asarray(node["lora_A"])).max() <= 1 / np.sqrt(fan_in)
            assert not np.asarray(node["lora_B"]).any()
            return
        for k, v in node.items():
            walk(v, path + (k,))

    walk(adapters, ())
    assert ours == ref_names
    out = model.apply({"params": params, "lora": adapters}, input_ids=np.array([[1, 5, 6]]))
    np.testing.assert_array_equal(out.logits, model.apply({"params": params}, input_ids=np.array([[1, 5, 6]])).logits)


def _dot_output_shapes(jaxpr):
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _dot_output_shapes(inner)
    return shapes


def test_adapter_gradients_compute_no_frozen_weight_gradient(tiny_jax):
    model, params = tiny_jax
    adapters = lora.init(model, params, idefics2_jax.LoraConfig(r=4), jax.random.key(0))
    ids = np.array([[1, 5, 6, 7]])

    def loss(p, a):
        return model.apply({"params": p, "lora": a}, input_ids=ids, labels=ids).loss

    kernel_shapes = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim == 2}
    adapter_grad = _dot_output_shapes(jax.make_jaxpr(jax.grad(loss, argnums=1))(params, adapters).jaxpr)
    full_grad = _dot_output_shapes(jax.make_jaxpr(jax.grad(loss, argnums=0))(params, adapters).jaxpr)
    assert kernel_shapes & set(full_grad)  # the check sees weight gradients where they are computed
    assert not kernel_shapes & set(adapter_grad)


def test_bad_adapters_are_clear_errors(tmp_path, tiny_jax):
    model, params = tiny_jax
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    with pytest.raises(NotImplementedError, match="use_dora"):
        lora.load(tmp_path)
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.init(model, params, idefics2_jax.LoraConfig(target_modules="nothing"), jax.random.key(0))
    with pytest.raises(NotImplementedError, match="not a linear layer"):
        lora.init(model, params, idefics2_jax.LoraConfig(target_modules=["embed_tokens"]), jax.random.key(0))
