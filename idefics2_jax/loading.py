"""`load_model`: an HF checkpoint directory (or a converted Orbax directory) -> (model, params)."""

from __future__ import annotations

import os

from .ckpt.dtypes import resolve_dtype
from .ckpt.hf import load_hf_params
from .ckpt.orbax import is_orbax_dir, restore_params
from .ckpt.placement import param_shardings
from .config import Idefics2Config
from .generation.options import GenerationConfig
from .nn.model import Idefics2ForConditionalGeneration


def load_model(path, dtype=None, mesh=None, *, attention_impl: str | None = None, rules=None):
    """Load Idefics2 weights.

    path: an HF checkpoint directory (config.json + model.safetensors or shards with an index), or a directory
        written by `python -m convert --from hf` (Orbax params, restored straight into `dtype` and the shardings).
    dtype: None keeps the checkpoint's dtype; "float32" / "bfloat16" / "float16" or a numpy/jax dtype.
    mesh: a `jax.sharding.Mesh` to place each parameter directly in its sharding (see `idefics2_jax.nn.partitioning`).
    rules: the logical-axis rules table for `mesh` (default `nn.partitioning.DEFAULT_RULES`).
    Returns (model, params) for `model.apply({"params": params}, ...)`; `model.generation_config` holds the
    checkpoint's generation_config.json, which `generate` uses by default.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    config = Idefics2Config.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    shardings = None
    if mesh is not None:
        shardings = param_shardings(config, mesh, rules)
    if is_orbax_dir(path):
        params, dtype = restore_params(path, config, dtype, shardings=shardings)
    else:
        params, dtype = load_hf_params(path, config, dtype, shardings=shardings)
    generation_config = GenerationConfig.from_pretrained(path)  # generation_config.json, else config.json's ids
    model = Idefics2ForConditionalGeneration(config, dtype=dtype, attention_impl=attention_impl,
                                             generation_config=generation_config)
    return model, params
