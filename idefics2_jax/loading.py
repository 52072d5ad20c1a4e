"""`load_model`: an HF checkpoint directory (or a converted Orbax directory) -> (model, params);
`save_pretrained`: the way back to an HF directory that transformers loads."""

from __future__ import annotations

import contextlib
import dataclasses
import os

from flax.traverse_util import unflatten_dict

from . import quant
from .ckpt.dtypes import resolve_dtype
from .ckpt.hf import load_hf_params, save_hf_checkpoint
from .ckpt.convert import TOKENIZER_FILES, plan_conversion
from .ckpt.orbax import LazyLeaf, is_orbax_dir, lazy_params, restore_params
from .ckpt.placement import param_shardings
from .config import Idefics2Config
from .finetune import lora
from .generation.options import GenerationConfig, resolve_generation_config
from .nn.model import Idefics2ForConditionalGeneration
from .processing import Idefics2Processor


def load_model(path, dtype=None, mesh=None, *, attention_impl: str | None = None, rules=None, adapter=None,
               quantize: str | None = None):
    """Load Idefics2 weights.

    path: an HF checkpoint directory (config.json + model.safetensors or shards with an index), or a directory
        written by `python -m convert --from hf` (Orbax params, restored straight into `dtype` and the shardings).
    dtype: None keeps the checkpoint's dtype; "float32" / "bfloat16" / "float16" or a numpy/jax dtype.
    mesh: a `jax.sharding.Mesh` to place each parameter directly in its sharding (see `idefics2_jax.nn.partitioning`).
    rules: the logical-axis rules table for `mesh` (default `nn.partitioning.DEFAULT_RULES`).
    adapter: a PEFT LoRA adapter directory, merged into the params (`lora.merge`: W + scale * A B in float32).
    quantize: None, "int8" or "int4" / "int4:GROUP": weight-only quantization of the decoder and connector kernels
        (`idefics2_jax.quant`; after any adapter is merged). Vision tower, embeddings and lm_head stay in `dtype`.
    Returns (model, params) for `model.apply({"params": params}, ...)`; `model.generation_config` holds the
    checkpoint's generation_config.json, which `generate` uses by default.
    """
    path = os.fspath(path)
    if quantize is not None:
        quant.parse_scheme(quantize)  # a bad scheme fails before anything is read
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
    if adapter is not None:
        adapters, lora_config = lora.load(adapter)
        lora.check_against(adapters, params)
        params = lora.merge(params, adapters, lora_config)
    if quantize is not None:
        params = quant.quantize_params(params, quantize)
    generation_config = GenerationConfig.from_pretrained(path)  # generation_config.json, else config.json's ids
    model = Idefics2ForConditionalGeneration(config, dtype=dtype, attention_impl=attention_impl,
                                             generation_config=generation_config)
    return model, params


def save_pretrained(directory, model, params, processor=None, generation_config=None, max_shard_size="5GB",
                    dtype=None, *, overwrite: bool = False) -> list[str]:
    """Write an HF checkpoint directory that `transformers.Idefics2ForConditionalGeneration.from_pretrained` and
    `load_model` read: safetensors weights (one `model.safetensors`, or shards of at most `max_shard_size` with an
    index), config.json, generation_config.json (`generation_config`, default `model.generation_config`, else the
    config's special ids) and, with `processor`, its tokenizer, image processor and chat template files.

    dtype: None keeps the params' dtype; "float32" / "bfloat16" / "float16" casts on the way out. The directory is
    written beside `directory` and renamed into place; an existing one is replaced only with overwrite=True, and
    only if it holds a config.json. Returns the file names in the directory.
    """
    extra = {"generation_config.json": resolve_generation_config(model, generation_config).to_dict()}
    if processor is not None:
        extra["processor"] = processor.save_pretrained
    return save_hf_checkpoint(directory, model.config, params, dtype=dtype, max_shard_size=max_shard_size,
                              extra_files=extra, overwrite=overwrite)


def export_hf(src, dst, *, adapter=None, dtype=None, max_shard_size="5GB", overwrite: bool = False,
              on_start=None, on_leaf=None) -> list[str]:
    """SRC (an HF directory or a converted Orbax one) -> an HF checkpoint directory DST that transformers loads,
    optionally with a PEFT LoRA adapter merged in (W + scale * A B in float32, then cast; modules_to_save taken from
    the adapter): a plain Idefics2 checkpoint. The processor and tokenizer files are carried over when SRC has them.

    Streams: one tensor is read (a safetensors slab, or an Orbax partial restore), merged, cast and written at a
    time, so memory stays about one tensor whatever the model's size. DST is written beside itself and renamed into
    place; an existing DST is replaced only with overwrite=True and only if it is a checkpoint.
    on_start(n_tensors, total_bytes) is called once the source is planned; on_leaf(leaf) after each tensor is read
    (progress bars).
    """
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if dst == src or dst.startswith(src + os.sep):
        raise ValueError(f"DST {dst} is inside SRC {src}: write the export elsewhere")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists (pass --overwrite / overwrite=True to replace it)")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a directory")
    config = Idefics2Config.from_pretrained(src)
    with contextlib.ExitStack() as stack:
        if is_orbax_dir(src):
            leaves = stack.enter_context(lazy_params(src, config))
        else:
            leaves = plan_conversion(src).leaves
        if adapter is not None:
            adapters, lora_config = lora.load(adapter)
            lora.check_against(adapters, unflatten_dict(leaves))
            leaves = lora.merge_lazy(leaves, adapters, lora_config)
        if on_start is not None:
            on_start(len(leaves), sum(leaf.nbytes for leaf in leaves.values()))
        if on_leaf is not None:
            leaves = {k: _reporting(leaf, on_leaf) for k, leaf in leaves.items()}
        extra = {"generation_config.json": GenerationConfig.from_pretrained(src).to_dict()}
        if any(os.path.isfile(os.path.join(src, name)) for name in TOKENIZER_FILES):
            extra["processor"] = Idefics2Processor.from_pretrained(src).save_pretrained
        return save_hf_checkpoint(dst, config, unflatten_dict(leaves), dtype=dtype, max_shard_size=max_shard_size,
                                  extra_files=extra, overwrite=overwrite)


def _reporting(leaf: LazyLeaf, on_leaf) -> LazyLeaf:
    def load(start, stop):
        out = leaf.load(start, stop)
        on_leaf(leaf)
        return out

    return dataclasses.replace(leaf, load=load)
