"""The one declarative mapping between Hugging Face checkpoint keys and Flax param paths.

`WEIGHT_TABLE` is used by loading, conversion, placement on meshes and export alike. Each row maps an HF key pattern
(`{i}` is a layer index) to a param path, a layout transform and the tensor's logical axes (used by the sharding
rules of `idefics2_jax.nn.partitioning`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ..config import Idefics2Config

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



def hf_shape(flax_shape, transform: str) -> tuple:
    """The inverse of `flax_shape`."""
    perm = _TO_FLAX[transform]
    return tuple(flax_shape) if perm is None else tuple(flax_shape[i] for i in np.argsort(perm))



def _key_pattern(template: str):
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


_KEY_PATTERNS = [(_key_pattern(rule.hf), rule) for rule in WEIGHT_TABLE]


def entry_for_key(key: str) -> Entry | None:
    """The table entry of one HF key, without a config (None for a key the table does not know)."""
    for pattern, rule in _KEY_PATTERNS:
        m = pattern.fullmatch(key)
        if m:
            path = rule.path.format(i=m.group(1)) if m.groups() else rule.path
            return Entry(key, tuple(path.split("/")), rule.transform, rule.axes)
    return None
