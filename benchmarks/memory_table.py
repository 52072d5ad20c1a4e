"""Bytes per device of Idefics2 sharded with the default rules, computed with `jax.eval_shape` (no weights, no devices).

    python benchmarks/memory_table.py                       # idefics2-8b, 1/2/4/8/16 devices, markdown to stdout
    python benchmarks/memory_table.py --devices 8 32 --mesh 2,2,8 --rules vision_tp

Each mesh is an `AbstractMesh`, so any device count works on a laptop. Weights: bf16 (2 bytes), and the
`load_model(quantize=...)` schemes: the decoder and connector kernels in int8 (1 byte, a bf16 scale per output
channel) or int4 (half a byte, a bf16 scale per 128 input rows and output channel), everything else bf16.
KV cache: one sequence at the full sliding window (the ring-buffer cache never grows past it) in bf16, on each
device that holds part of it: a batch of data x fsdp sequences puts one sequence on each device group, whose KV
heads are split over "model" when they divide it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from idefics2_jax.ckpt.placement import param_specs  # noqa: E402
from idefics2_jax.ckpt.shapes import param_shapes  # noqa: E402
from idefics2_jax.config import Idefics2Config  # noqa: E402
from idefics2_jax.nn import partitioning as S  # noqa: E402
from idefics2_jax.nn import text  # noqa: E402
from idefics2_jax.quant import DEFAULT_GROUP, quantizable  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                              "idefics2-8b.config.json")
RULES = {"default": S.DEFAULT_RULES, "vision_tp": S.VISION_TENSOR_PARALLEL_RULES}
GIB = 1024**3


def abstract_mesh(data: int, fsdp: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, model), S.MESH_AXES)


def weight_bytes_per_device(config, mesh, rules, shapes) -> dict:
    """Bytes on each device for bf16 / int8 / int4 weights, and of the vision tower (bf16); shards are even, so
    every device holds the same. A quantized kernel's scales are split like its output channels."""
    out = {"bf16": 0, "int8": 0, "int4": 0, "vision": 0}
    for path, spec in param_specs(config, mesh, rules, shapes).items():
        local = S.shard_shape(shapes[path], spec, mesh)
        n = math.prod(local)
        out["bf16"] += 2 * n
        out["vision"] += 2 * n if path[0] == "vision_model" else 0
        if quantizable(path):
            out["int8"] += n + 2 * local[1]
            out["int4"] += n / 2 + 2 * local[1] * math.ceil(shapes[path][0] / DEFAULT_GROUP)
        else:
            out["int8"] += 2 * n
            out["int4"] += 2 * n
    return out


def kv_bytes_per_sequence(config, mesh, rules, window: int) -> int:
    """Bytes of one sequence's bf16 KV cache on each device that holds it."""
    sizes = dict(mesh.shape)
    batch = sizes["data"] * sizes["fsdp"]
    cache = jax.eval_shape(lambda: text.init_cache(config.text_config, batch, window, jnp.bfloat16))
    per_device = 0
    for leaf, axes in ((cache["pos"], S.CACHE_POS_AXES), (cache["valid"], S.CACHE_VALID_AXES),
                       *[(a, S.CACHE_KV_AXES) for layer in cache["layers"] for a in layer.values()]):
        spec = S.logical_to_spec(axes, mesh, rules, leaf.shape)
        per_device += math.prod(S.shard_shape(leaf.shape, spec, mesh)) * leaf.dtype.itemsize
    spec = S.logical_to_spec(("batch",), mesh, rules, (batch,))
    sequences_per_device = S.shard_shape((batch,), spec, mesh)[0]
    return per_device // sequences_per_device


def meshes_for(devices: list[int], extra: list[tuple]) -> list[tuple]:
    out = []
    for n in devices:
        out.append((1, 1, n))  # tensor parallel
        if n > 1:
            out.append((1, n, 1))  # FSDP
        if n > 8 and n % 8 == 0:
            out.append((n // 8, 1, 8))  # data x tensor parallel: the model axis no wider than the 8 KV heads
    return out + [m for m in extra if m not in out]


def table(config, devices: list[int], extra_meshes: list[tuple], rules_name: str, window: int) -> str:
    rules = RULES[rules_name]
    shapes = param_shapes(config)  # jax.eval_shape of the model's init: no memory
    n_params = sum(math.prod(s) for s in shapes.values())
    lines = [
        f"Weights: {n_params / 1e9:.2f} B parameters; rules: `{rules_name}`; KV cache: one sequence of "
        f"{window} tokens (the sliding window) in bf16.",
        "",
        "| devices | mesh (data × fsdp × model) | bf16 weights / device | int8 weights / device "
        "| int4 weights / device | of which vision tower (bf16) | KV cache / sequence / device (bf16) |",
        "|---:|:---|---:|---:|---:|---:|---:|",
    ]
    for data, fsdp, model in meshes_for(devices, extra_meshes):
        mesh = abstract_mesh(data, fsdp, model)
        b = weight_bytes_per_device(config, mesh, rules, shapes)
        kv = kv_bytes_per_sequence(config, mesh, rules, window)
        lines.append(f"| {data * fsdp * model} | {data} × {fsdp} × {model} | {b['bf16'] / GIB:.2f} GiB "
                     f"| {b['int8'] / GIB:.2f} GiB | {b['int4'] / GIB:.2f} GiB | {b['vision'] / GIB:.2f} GiB "
                     f"| {kv / 2**20:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="an Idefics2 config.json (default: idefics2-8b)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="device counts; each gets a model=N and an fsdp=N mesh (and data x model=8 past 8)")
    parser.add_argument("--mesh", action="append", default=[], metavar="DATA,FSDP,MODEL",
                        help="an extra mesh, e.g. 2,2,8 (repeatable)")
    parser.add_argument("--rules", choices=sorted(RULES), default="default")
    parser.add_argument("--window", type=int, default=None, help="KV cache length (default: the sliding window)")
    args = parser.parse_args(argv)
    config = Idefics2Config.from_json_file(args.config)
    extra = []
    for m in args.mesh:
        try:
            data, fsdp, model = (int(x) for x in m.split(","))
        except ValueError:
            parser.error(f"--mesh {m!r}: expected DATA,FSDP,MODEL, e.g. 2,2,8")
        extra.append((data, fsdp, model))
    window = args.window or config.text_config.sliding_window or config.text_config.max_position_embeddings
    print(table(config, args.devices, extra, args.rules, window))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
