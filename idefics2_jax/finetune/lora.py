"""LoRA adapters as their own pytree and flax collection, read and written in PEFT's adapter format.

    adapters = lora.init(model, params, lora_config, rng)
    model.apply({"params": params, "lora": adapters}, ...)   # x W + scale * (x A) B, W never merged

`adapters` mirrors the params tree: each LoRA layer holds `{"lora_A": [in, r], "lora_B": [r, out], "scaling":
LoraScaling}` (float32; `scaling` has no leaves), and each module of `modules_to_save` holds full float32 copies of
its params under their own names. Module names are Hugging Face's (`model.text_model.layers.0.self_attn.q_proj`),
matched as PEFT does: a string `target_modules` with `re.fullmatch`, a list as name suffixes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from ..ckpt.orbax import LazyLeaf
from ..ckpt.table import LINEAR, WEIGHT_TABLE, checkpoint_entries, entry_for_key, to_flax, to_hf
from ..config import Idefics2Config
from ..nn.layers import LoraScaling

DEFAULT_TARGET_MODULES = (r".*(text_model|modality_projection|perceiver_resampler)"
                          r".*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
AUTO_MAPPING = {"base_model_class": "Idefics2ForConditionalGeneration",
                "parent_library": "transformers.models.idefics2.modeling_idefics2"}
# Params built through `nn.layers.trainable_param`, which the "lora" collection can replace (modules_to_save).
_REPLACEABLE = ("kernel", "bias", "scale", "latents")


@dataclasses.dataclass
class LoraConfig:
    """PEFT's `LoraConfig` fields with PEFT's meaning (see the module docstring for the matching)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian', "
                             f"got {self.init_lora_weights!r}")
        if self.target_modules is None:
            self.target_modules = DEFAULT_TARGET_MODULES
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _matches_target(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _in_modules_to_save(name: str, modules) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:k]) == m or ".".join(parts[:k]).endswith("." + m)
               for m in modules or () for k in range(1, len(parts) + 1))


def _module(hf_key: str) -> str:
    return hf_key.rsplit(".", 1)[0] if hf_key.endswith((".weight", ".bias")) else hf_key


def plan(config: Idefics2Config, lora_config: LoraConfig):
    """(LoRA layers, modules_to_save tensors) of `config`: lists of table entries. Like PEFT, a target inside a
    module of modules_to_save is trained in full, not through LoRA."""
    lora_layers, saved = [], []
    for key, entry in checkpoint_entries(config).items():
        module = _module(key)
        if _in_modules_to_save(module, lora_config.modules_to_save):
            if entry.path[-1] not in _REPLACEABLE or entry.path[-2] in ("patch_embedding", "position_embedding"):
                raise NotImplementedError(f"modules_to_save: {module} ({'/'.join(entry.path)}) cannot be trained "
                                          f"in full yet; only linear layers, RMSNorms and the perceiver latents")
            saved.append(entry)
        elif _matches_target(module, lora_config.target_modules) and key.endswith(".weight"):
            if entry.transform != LINEAR:
                raise NotImplementedError(f"target_modules matched {module}, which is not a linear layer: "
                                          f"LoRA is implemented for linear layers only")
            lora_layers.append(entry)
    if not lora_layers and not saved:
        raise ValueError(f"target_modules {lora_config.target_modules!r} matches no linear layer of this model")
    return lora_layers, saved


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def init(model, params, lora_config: LoraConfig, rng) -> dict:
    """New adapters for `model`: A as PEFT initialises it (kaiming-uniform; `"gaussian"`: normal with std 1/r),
    B zeros (with `init_lora_weights=False`, kaiming-uniform too); modules_to_save copied from `params`."""
    lora_layers, saved = plan(model.config, lora_config)
    adapters: dict = {}
    scaling = LoraScaling(lora_config.scale, lora_config.lora_dropout)
    keys = jax.random.split(rng, max(1, 2 * len(lora_layers)))
    for n, entry in enumerate(lora_layers):
        d_in, d_out = _kernel_shape(params, entry.path)
        r = lora_config.r
        if lora_config.init_lora_weights == "gaussian":
            a = jax.random.normal(keys[2 * n], (d_in, r), jnp.float32) / r
        else:  # torch's kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
            a = jax.random.uniform(keys[2 * n], (d_in, r), jnp.float32, -1, 1) / math.sqrt(d_in)
        if lora_config.init_lora_weights is False:
            b = jax.random.uniform(keys[2 * n + 1], (r, d_out), jnp.float32, -1, 1) / math.sqrt(r)
        else:
            b = jnp.zeros((r, d_out), jnp.float32)
        _set(adapters, entry.path[:-1], {"lora_A": a, "lora_B": b, "scaling": scaling})
    for entry in saved:
        _set(adapters, entry.path, jnp.asarray(_get(params, entry.path), jnp.float32))
    return adapters


def merge(params, adapters, lora_config: LoraConfig):
    """Plain params: `W + scale * A B` for every LoRA layer (in float32, then cast to W's dtype) and the
    modules_to_save copies in place of the originals. `params` is not modified."""
    out = jax.tree.map(lambda x: x, params)

    def walk(node, path):
        if "lora_A" in node:
            try:
                w = _get(out, path + ("kernel",))
            except KeyError:
                raise ValueError(f"{'/'.join(path)} is quantized: merge the adapter into the float weights, then "
                                 "quantize (load_model(path, adapter=..., quantize=...) does that)") from None
            merged = (jnp.asarray(w, jnp.float32)
                      + node["scaling"].scale * (jnp.asarray(node["lora_A"], jnp.float32)
                                                 @ jnp.asarray(node["lora_B"], jnp.float32)))
            _set(out, path + ("kernel",), merged.astype(w.dtype))
            return
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            else:
                w = _get(out, path + (k,))
                _set(out, path + (k,), jnp.asarray(v).astype(w.dtype))

    walk(adapters, ())
    return out


def merge_lazy(leaves: dict, adapters, lora_config: LoraConfig) -> dict:
    """`merge` for {param path: LazyLeaf} (a checkpoint read one tensor at a time): each LoRA kernel's slabs get
    `scale * A B` added in float32 as they are loaded; modules_to_save leaves are the adapter's arrays."""
    out = dict(leaves)

    def merged(leaf, a, b, scale):
        def load(start, stop):
            w = np.asarray(leaf.load(start, stop), np.float32)
            delta = a[start:stop] @ b if leaf.axis == 0 else a @ b[:, start:stop]
            return np.ascontiguousarray((w + scale * delta).astype(leaf.dtype))
        return LazyLeaf(leaf.shape, leaf.dtype, load, leaf.axis, leaf.name, leaf.order, leaf.source_nbytes)

    def walk(node, path):
        if "lora_A" in node:
            key = path + ("kernel",)
            if key not in out:
                raise ValueError(f"{'/'.join(path)} is quantized or missing: merge into a float checkpoint")
            out[key] = merged(out[key], np.asarray(node["lora_A"], np.float32), np.asarray(node["lora_B"], np.float32),
                              node["scaling"].scale)
            return
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            else:
                leaf = out[path + (k,)]
                out[path + (k,)] = LazyLeaf.from_array(np.asarray(v).astype(leaf.dtype), leaf.name)

    walk(adapters, ())
    return out


def _read_config(directory) -> LoraConfig:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise NotImplementedError(f"{path}: peft_type {raw['peft_type']!r}; only LORA adapters are supported")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {},
                   "alpha_pattern": {}, "layers_to_transform": None, "target_parameters": None,
                   "trainable_token_indices": None, "lora_bias": False}
    for field, default in unsupported.items():
        if raw.get(field, default) not in (default, None, {}, [], False):
            raise NotImplementedError(f"{path}: {field}={raw[field]!r} is not supported")
    return LoraConfig(r=raw["r"], lora_alpha=raw.get("lora_alpha", 8), lora_dropout=raw.get("lora_dropout", 0.0),
                      target_modules=raw.get("target_modules"), modules_to_save=raw.get("modules_to_save"),
                      use_rslora=raw.get("use_rslora", False),
                      init_lora_weights=raw.get("init_lora_weights", True))


def load(directory):
    """A PEFT adapter directory -> (adapters, lora_config)."""
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    lora_config = _read_config(directory)
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}")
    tensors = load_file(path)
    scaling = LoraScaling(lora_config.scale, lora_config.lora_dropout)
    adapters: dict = {}
    pairs: dict = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.fullmatch(r"(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        entry = entry_for_key(name)
        if entry is None or not _in_modules_to_save(_module(name), lora_config.modules_to_save):
            raise ValueError(f"{path}: unexpected tensor {key!r} (neither LoRA A/B nor a modules_to_save weight)")
        _set(adapters, entry.path, jnp.asarray(to_flax(value.astype(np.float32), entry.transform)))
    for module, ab in pairs.items():
        entry = entry_for_key(module + ".weight")
        if entry is None or entry.transform != LINEAR or set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: LoRA tensors for {module!r}, which is not a linear layer of Idefics2 "
                             f"(or lacks lora_A / lora_B)")
        a, b = ab["lora_A"].astype(np.float32), ab["lora_B"].astype(np.float32)
        if a.shape[0] != lora_config.r or b.shape[1] != lora_config.r:
            raise ValueError(f"{path}: {module} has rank {a.shape[0]}, adapter_config.json says r={lora_config.r}")
        _set(adapters, entry.path[:-1], {"lora_A": jnp.asarray(a.T), "lora_B": jnp.asarray(b.T),
                                         "scaling": scaling})
    return adapters, lora_config


def _kernel_shape(params, path: tuple) -> tuple:
    """A Dense kernel's [in, out] shape, float or quantized (`kernel_q`: QLoRA on a quantized base)."""
    try:
        return tuple(_get(params, path).shape)
    except KeyError:
        return tuple(_get(params, path[:-1] + ("kernel_q",)).shape)


def check_against(adapters, params) -> None:
    """Raise if an adapter does not fit `params` (a layer it lacks, a wrong shape)."""
    def walk(node, path):
        if "lora_A" in node:
            try:
                shape = _kernel_shape(params, path + ("kernel",))
            except (KeyError, TypeError):
                raise ValueError(f"adapter has {'/'.join(path)}, which the model has not") from None
            if node["lora_A"].shape[0] != shape[0] or node["lora_B"].shape[1] != shape[1]:
                raise ValueError(f"adapter for {'/'.join(path)}: A {node['lora_A'].shape} B {node['lora_B'].shape} "
                                 f"do not fit the kernel {shape}")
            return
        for k, v in node.items():
            try:
                target = _get(params, path + (k,))
            except (KeyError, TypeError):
                raise ValueError(f"adapter has {'/'.join(path + (k,))}, which the model has not") from None
            if isinstance(v, dict):
                walk(v, path + (k,))
            elif v.shape != target.shape:
                raise ValueError(f"adapter's {'/'.join(path + (k,))} has shape {v.shape}, the model {target.shape}")

    walk(adapters, ())


def save(directory, adapters, lora_config: LoraConfig, params=None) -> None:
    """Write a PEFT adapter directory (`adapter_config.json` with `auto_mapping`, `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained` and `AutoPeftModel` load. `params` supplies the modules_to_save weights when
    they were trained in the params rather than in `adapters`."""
    from safetensors.numpy import save_file

    tensors = {}

    def walk(node, path):
        if "lora_A" in node:
            module = _hf_module(path)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(node["lora_A"]).T)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(node["lora_B"]).T)
            return
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            else:
                value = v if params is None else _get(params, path + (k,))
                key, transform = _hf_key(path + (k,))
                tensors[PEFT_PREFIX + key] = np.ascontiguousarray(to_hf(np.asarray(value, np.float32), transform))

    walk(adapters, ())
    os.makedirs(directory, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "auto_mapping": AUTO_MAPPING, "base_model_name_or_path": None,
              "r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "lora_dropout": lora_config.lora_dropout,
              "target_modules": lora_config.target_modules, "modules_to_save": lora_config.modules_to_save,
              "use_rslora": lora_config.use_rslora, "init_lora_weights": lora_config.init_lora_weights,
              "bias": "none", "fan_in_fan_out": False, "use_dora": False, "inference_mode": True}
    tmp = os.path.join(directory, f".{ADAPTER_WEIGHTS}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, ADAPTER_WEIGHTS))
    tmp = os.path.join(directory, f".{ADAPTER_CONFIG}.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(directory, ADAPTER_CONFIG))


def _hf_key(path: tuple) -> tuple[str, str]:
    """The HF key and layout transform of a param path (the table's rows read backwards)."""
    joined = "/".join(path)
    for rule in WEIGHT_TABLE:
        pattern = re.escape(rule.path).replace(re.escape("{i}"), r"(\d+)")
        m = re.fullmatch(pattern, joined)
        if m:
            return (rule.hf.format(i=m.group(1)) if m.groups() else rule.hf), rule.transform
    raise ValueError(f"adapter path {joined} is not an Idefics2 param")


def _hf_module(path: tuple) -> str:
    return _module(_hf_key(path + ("kernel",))[0])
