"""Hugging Face checkpoint <-> Flax params: the one declarative mapping table, and loading.

`WEIGHT_TABLE` is used by loading, conversion and (later) export alike. Each row maps an HF key pattern (`{i}` is a
layer index) to a param path, a layout transform and the tensor's logical axes (used by the sharding rules).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .config import Idefics2Config

# Layout transforms HF -> Flax (and their inverses for export).
LINEAR = "linear"  # [out, in] -> [in, out]
CONV = "conv"  # [out, in, kh, kw] -> [kh, kw, in, out]
COPY = "copy"

_TO_FLAX = {LINEAR: (1, 0), CONV: (2, 3, 1, 0), COPY: None}


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF key, `{i}` = layer index
    path: str  # param path, "/"-separated, `{i}` = layer index
    transform: str
    axes: tuple  # logical axis names of the Flax tensor


def _linear(hf_prefix, path_prefix, in_axis, out_axis, bias=False):
    rows = [Rule(f"{hf_prefix}.weight", f"{path_prefix}/kernel", LINEAR, (in_axis, out_axis))]
    if bias:
        rows.append(Rule(f"{hf_prefix}.bias", f"{path_prefix}/bias", COPY, (out_axis,)))
    return rows


def _norm(hf_prefix, path_prefix, axis, bias=False):
    rows = [Rule(f"{hf_prefix}.weight", f"{path_prefix}/scale", COPY, (axis,))]
    if bias:
        rows.append(Rule(f"{hf_prefix}.bias", f"{path_prefix}/bias", COPY, (axis,)))
    return rows


def _gated_mlp(hf_prefix, path_prefix, in_axis, out_axis):
    return (_linear(f"{hf_prefix}.gate_proj", f"{path_prefix}/gate_proj", in_axis, "mlp")
            + _linear(f"{hf_prefix}.up_proj", f"{path_prefix}/up_proj", in_axis, "mlp")
            + _linear(f"{hf_prefix}.down_proj", f"{path_prefix}/down_proj", "mlp", out_axis))


_V = "model.vision_model"
_VL = f"{_V}.encoder.layers.{{i}}"
_P = "model.connector.perceiver_resampler"
_PL = f"{_P}.layers.{{i}}"
_T = "model.text_model"
_TL = f"{_T}.layers.{{i}}"

# Logical axes: the vision tower has its own names so it can stay data-parallel while the decoder is tensor-parallel.
VISION_TABLE = [
    Rule(f"{_V}.embeddings.patch_embedding.weight", "vision_model/embeddings/patch_embedding/kernel", CONV,
         (None, None, None, "vision_embed")),
    Rule(f"{_V}.embeddings.patch_embedding.bias", "vision_model/embeddings/patch_embedding/bias", COPY,
         ("vision_embed",)),
    Rule(f"{_V}.embeddings.position_embedding.weight", "vision_model/embeddings/position_embedding/embedding", COPY,
         (None, "vision_embed")),
    *[r for name in ("q_proj", "k_proj", "v_proj")
      for r in _linear(f"{_VL}.self_attn.{name}", f"vision_model/encoder/layers_{{i}}/self_attn/{name}",
                       "vision_embed", "vision_heads", bias=True)],
    *_linear(f"{_VL}.self_attn.out_proj", "vision_model/encoder/layers_{i}/self_attn/out_proj",
             "vision_heads", "vision_embed", bias=True),
    *_norm(f"{_VL}.layer_norm1", "vision_model/encoder/layers_{i}/layer_norm1", "vision_embed", bias=True),
    *_norm(f"{_VL}.layer_norm2", "vision_model/encoder/layers_{i}/layer_norm2", "vision_embed", bias=True),
    *_linear(f"{_VL}.mlp.fc1", "vision_model/encoder/layers_{i}/mlp/fc1", "vision_embed", "vision_mlp", bias=True),
    *_linear(f"{_VL}.mlp.fc2", "vision_model/encoder/layers_{i}/mlp/fc2", "vision_mlp", "vision_embed", bias=True),
    *_norm(f"{_V}.post_layernorm", "vision_model/post_layernorm", "vision_embed", bias=True),
]

CONNECTOR_TABLE = [
    *_gated_mlp("model.connector.modality_projection", "connector/modality_projection", "vision_embed", "embed"),
    Rule(f"{_P}.latents", "connector/perceiver_resampler/latents", COPY, (None, "embed")),
    *_norm(f"{_P}.norm", "connector/perceiver_resampler/norm", "embed"),
    *_norm(f"{_PL}.input_latents_norm", "connector/perceiver_resampler/layers_{i}/input_latents_norm", "embed"),
    *_norm(f"{_PL}.input_context_norm", "connector/perceiver_resampler/layers_{i}/input_context_norm", "embed"),
    *_norm(f"{_PL}.post_attention_layernorm", "connector/perceiver_resampler/layers_{i}/post_attention_layernorm",
           "embed"),
    *_linear(f"{_PL}.self_attn.q_proj", "connector/perceiver_resampler/layers_{i}/self_attn/q_proj", "embed", "heads"),
    *_linear(f"{_PL}.self_attn.k_proj", "connector/perceiver_resampler/layers_{i}/self_attn/k_proj", "embed",
             "kv_heads"),
    *_linear(f"{_PL}.self_attn.v_proj", "connector/perceiver_resampler/layers_{i}/self_attn/v_proj", "embed",
             "kv_heads"),
    *_linear(f"{_PL}.self_attn.o_proj", "connector/perceiver_resampler/layers_{i}/self_attn/o_proj", "heads", "embed"),
    *_gated_mlp(f"{_PL}.mlp", "connector/perceiver_resampler/layers_{i}/mlp", "embed", "embed"),
]

TEXT_TABLE = [
    Rule(f"{_T}.embed_tokens.weight", "text_model/embed_tokens/embedding", COPY, ("vocab", "embed")),
    *_norm(f"{_T}.norm", "text_model/norm", "embed"),
    *_linear(f"{_TL}.self_attn.q_proj", "text_model/layers_{i}/self_attn/q_proj", "embed", "heads"),
    *_linear(f"{_TL}.self_attn.k_proj", "text_model/layers_{i}/self_attn/k_proj", "embed", "kv_heads"),
    *_linear(f"{_TL}.self_attn.v_proj", "text_model/layers_{i}/self_attn/v_proj", "embed", "kv_heads"),
    *_linear(f"{_TL}.self_attn.o_proj", "text_model/layers_{i}/self_attn/o_proj", "heads", "embed"),
    *_gated_mlp(f"{_TL}.mlp", "text_model/layers_{i}/mlp", "embed", "embed"),
    *_norm(f"{_TL}.input_layernorm", "text_model/layers_{i}/input_layernorm", "embed"),
    *_norm(f"{_TL}.post_attention_layernorm", "text_model/layers_{i}/post_attention_layernorm", "embed"),
]

LM_HEAD = Rule("lm_head.weight", "lm_head/kernel", LINEAR, ("embed", "vocab"))

WEIGHT_TABLE = VISION_TABLE + CONNECTOR_TABLE + TEXT_TABLE + [LM_HEAD]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One concrete checkpoint tensor."""

    hf_key: str
    path: tuple[str, ...]
    transform: str
    axes: tuple


def _layers_for(rule: Rule, config: Idefics2Config) -> int | None:
    if "{i}" not in rule.hf:
        return None
    if rule.hf.startswith(_V):
        return config.vision_config.num_hidden_layers
    if rule.hf.startswith(_P):
        return config.perceiver_config.resampler_depth
    return config.text_config.num_hidden_layers


def checkpoint_entries(config: Idefics2Config) -> dict[str, Entry]:
    """Every tensor the checkpoint of `config` holds, keyed by HF name, in table order."""
    out = {}
    for rule in WEIGHT_TABLE:
        if rule is LM_HEAD and config.tie_word_embeddings:
            continue
        n = _layers_for(rule, config)
        for i in (range(n) if n is not None else [None]):  # a stack of 0 layers holds no tensors
            key = rule.hf.format(i=i) if i is not None else rule.hf
            path = rule.path.format(i=i) if i is not None else rule.path
            out[key] = Entry(key, tuple(path.split("/")), rule.transform, rule.axes)
    return out


def to_flax(array: np.ndarray, transform: str) -> np.ndarray:
    perm = _TO_FLAX[transform]
    return array if perm is None else np.transpose(array, perm)


def to_hf(array: np.ndarray, transform: str) -> np.ndarray:
    perm = _TO_FLAX[transform]
    return array if perm is None else np.transpose(array, np.argsort(perm))


def hf_leading_axis(transform: str) -> int:
    """The Flax axis that the HF tensor's axis 0 becomes (slabs along it are contiguous in a safetensors file)."""
    perm = _TO_FLAX[transform]
    return 0 if perm is None else perm.index(0)


def flax_shape(hf_shape, transform: str) -> tuple:
    perm = _TO_FLAX[transform]
    return tuple(hf_shape) if perm is None else tuple(hf_shape[p] for p in perm)


# ----------------------------------------------------------------------------------------------- safetensors files
def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: `model.safetensors`, or the shards named by the index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = []
        for name in dict.fromkeys(weight_map.values()):
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file}: shard named in model.safetensors.index.json is missing")
            files.append(file)
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


class SafetensorsReader:
    """Reads checkpoint tensors one at a time (memory-mapped by the safetensors library; no torch)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.files = safetensors_files(path)
        self._handles = []
        self.where: dict[str, Any] = {}
        for file in self.files:
            try:
                handle = safe_open(file, framework="numpy")
            except Exception as e:  # the library raises its own SafetensorError for truncated / corrupt files
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
            self._handles.append(handle)
            for key in handle.keys():
                self.where[key] = handle

    def keys(self):
        return list(self.where)

    def shape(self, key: str) -> tuple:
        return tuple(self.where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self.where[key].get_slice(key).get_dtype()

    def get(self, key: str) -> np.ndarray:
        try:
            return self.where[key].get_tensor(key)
        except Exception as e:
            raise ValueError(f"tensor {key!r}: could not be read ({e})") from None

    def get_slice(self, key: str, index) -> np.ndarray:
        try:
            return self.where[key].get_slice(key)[index]
        except Exception as e:
            raise ValueError(f"tensor {key!r}: could not be read ({e})") from None


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def resolve_dtype(dtype) -> jnp.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                 "float16": jnp.float16, "fp16": jnp.float16}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'")
        return jnp.dtype(names[dtype])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype {d}: use float32, bfloat16 or float16")
    return d


def checkpoint_dtype(reader: SafetensorsReader, config: Idefics2Config) -> jnp.dtype:
    """The dtype the checkpoint stores (its first floating tensor), falling back to config.json's."""
    for key in reader.keys():
        name = _ST_DTYPES.get(reader.dtype(key))
        if name and name != "float64":
            return jnp.dtype(name)
    return resolve_dtype(config.dtype or "float32")


def check_keys(config: Idefics2Config, keys, shape_of) -> dict[str, Entry]:
    """Raise a ValueError naming the first missing, unexpected or wrongly-shaped tensor."""
    entries = checkpoint_entries(config)
    expected = param_shapes(config)
    present = set(keys)
    for key in entries:
        if key not in present:
            raise ValueError(f"checkpoint is missing tensor {key!r}")
    for key in keys:
        if key not in entries:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise ValueError(f"checkpoint has unexpected tensor {key!r} (not part of Idefics2 for this config)")
        entry = entries[key]
        want = expected[entry.path]
        got = flax_shape(shape_of(key), entry.transform)
        if got != want:
            raise ValueError(f"tensor {key!r} has shape {tuple(shape_of(key))}, expected "
                             f"{_hf_shape(want, entry.transform)} for this config.json")
    return entries


def _hf_shape(shape, transform) -> tuple:
    perm = _TO_FLAX[transform]
    return tuple(shape) if perm is None else tuple(shape[i] for i in np.argsort(perm))


def param_shapes(config: Idefics2Config) -> dict[tuple, tuple]:
    """{param path: shape} computed with jax.eval_shape (no memory allocated)."""
    from flax.traverse_util import flatten_dict

    tree = abstract_params(config, jnp.float32)
    return {k: tuple(v.shape) for k, v in flatten_dict(tree).items()}


def abstract_params(config: Idefics2Config, dtype=jnp.float32):
    """The param tree as ShapeDtypeStructs (no memory allocated)."""
    from .model import Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration(config, dtype=dtype)
    p = config.vision_config.patch_size
    ids = jnp.zeros((1, config.image_seq_len), jnp.int32) + config.image_token_id
    pixels = jnp.ones((1, 1, config.vision_config.num_channels, p, p), dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, pixel_values=pixels))
    return variables["params"]


def iter_params(reader: SafetensorsReader, entries: dict[str, Entry], dtype) -> Iterator[tuple[Entry, np.ndarray]]:
    """(entry, Flax-layout numpy array in `dtype`) for each tensor, one at a time."""
    for key, entry in entries.items():
        yield entry, to_flax(reader.get(key), entry.transform).astype(dtype)


def load_hf_params(path: str, config: Idefics2Config, dtype=None, shardings=None):
    """Read an HF safetensors checkpoint into a Flax param tree.

    shardings: optional {param path: jax.sharding.Sharding}; each tensor is then placed directly in its sharding
    (devices read only their slices) instead of on the default device.
    """
    from flax.traverse_util import unflatten_dict

    reader = SafetensorsReader(path)
    entries = check_keys(config, reader.keys(), reader.shape)
    dtype = resolve_dtype(dtype) or checkpoint_dtype(reader, config)
    flat = {}
    for key, entry in entries.items():
        if shardings is not None and entry.path in shardings:
            flat[entry.path] = _place_sharded(reader, entry, dtype, shardings[entry.path])
        else:
            flat[entry.path] = jnp.asarray(to_flax(reader.get(key), entry.transform), dtype=dtype)
    return unflatten_dict(flat), dtype


def _place_sharded(reader: SafetensorsReader, entry: Entry, dtype, sharding):
    shape = flax_shape(reader.shape(entry.hf_key), entry.transform)
    perm = _TO_FLAX[entry.transform]

    def read(index):
        # index is over the Flax layout; map it back to the HF layout and read only that slice.
        if perm is None:
            hf_index = index
        else:
            hf_index = tuple(index[i] for i in np.argsort(perm))
        return to_flax(reader.get_slice(entry.hf_key, hf_index), entry.transform).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, read)
