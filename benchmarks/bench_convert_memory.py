"""Peak resident memory of `python -m convert --from hf` on random-weight checkpoints of different sizes.

Builds Idefics2 checkpoints of the same width and different depth (so the largest tensor is the same and only the
checkpoint size changes), written as sharded fp32 safetensors with an index like the hub's, converts each in a
fresh process and reads that process's peak RSS from `os.wait4`. Streaming means the peak stays flat as the
checkpoint grows; the target is `1 GiB + 2 x largest tensor`.

    python benchmarks/bench_convert_memory.py                      # 0.5 GB and 2 GB, to float32 and bfloat16
    python benchmarks/bench_convert_memory.py --sizes-gb 0.5 2 --json results.json
    python benchmarks/bench_convert_memory.py --width 8b --sizes-gb 3      # idefics2-8b's 500 MiB tensors
    python benchmarks/bench_convert_memory.py --dtypes bfloat16 --quantize int8     # quantized while streaming

Needs about 2.5 x the largest size in free space under --workdir; everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

WIDTHS = ("narrow", "8b")


def bench_config(text_layers: int, width: str = "narrow") -> dict:
    """An Idefics2 config.json dict with the real vocab and structure, `text_layers` deep.

    narrow: 1024 wide (largest tensor: the 32003 x 1024 embedding, 125 MiB). 8b: idefics2-8b's widths (largest
    tensor 500 MiB, as in the real checkpoint) with a 1-layer perceiver and 2 vision layers.
    """
    if width == "8b":
        hidden, inter, heads, kv, vision = 4096, 14336, 32, 8, (1152, 4304, 16)
        perceiver = dict(resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4)
    else:
        hidden, inter, heads, kv, vision = 1024, 3584, 8, 2, (384, 1536, 6)
        perceiver = dict(resampler_n_heads=16, resampler_head_dim=64, num_key_value_heads=4)
    return dict(
        model_type="idefics2", image_token_id=32001, tie_word_embeddings=False, dtype="float32",
        vision_config=dict(hidden_size=vision[0], intermediate_size=vision[1], num_hidden_layers=2,
                           num_attention_heads=vision[2], patch_size=14, image_size=980),
        perceiver_config=dict(hidden_size=hidden, rms_norm_eps=1e-6, resampler_n_latents=64, resampler_depth=1,
                              **perceiver),
        text_config=dict(model_type="mistral", vocab_size=32003, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv,
                         head_dim=128, rms_norm_eps=1e-5, pad_token_id=0),
    )


def hf_shapes(config_dict: dict) -> dict[str, tuple]:
    """{HF key: HF shape} from the project's weight table (no torch, no memory)."""
    from idefics2_jax.config import Idefics2Config
    from idefics2_jax.ckpt.shapes import param_shapes
    from idefics2_jax.ckpt.table import checkpoint_entries, hf_shape

    config = Idefics2Config.from_dict(config_dict)
    shapes = param_shapes(config)
    return {k: hf_shape(shapes[e.path], e.transform) for k, e in checkpoint_entries(config).items()}


def layers_for(size_bytes: float, width: str) -> int:
    one_layer = sum(4 * math.prod(s) for s in hf_shapes(bench_config(1, width)).values())
    per_layer = sum(4 * math.prod(s) for s in hf_shapes(bench_config(2, width)).values()) - one_layer
    return max(1, 1 + round((size_bytes - one_layer) / per_layer))


def write_checkpoint(path: str, config_dict: dict, shard_bytes: int = 1 << 30, seed: int = 0) -> dict:
    """Write random fp32 safetensors shards + index + config.json, one tensor in memory at a time."""
    import numpy as np

    from idefics2_jax.ckpt.safetensors import plan_shards

    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
    shapes = hf_shapes(config_dict)
    shards = plan_shards({key: 4 * math.prod(shape) for key, shape in shapes.items()}, shard_bytes)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for key in keys:
            n = 4 * math.prod(shapes[key])
            header[key] = {"dtype": "F32", "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, name), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for key in keys:
                f.write(rng.standard_normal(shapes[key], dtype=np.float32).tobytes())
        total += offset
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return {"bytes": total, "tensors": len(shapes), "shards": len(shards),
            "largest_tensor": max(4 * math.prod(s) for s in shapes.values())}


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of `cmd`, measured in a fresh process (common.measure_process)."""
    result = common.measure_process(cmd)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {result['rc']}")
    return result["peak_rss_bytes"], result["seconds"]


_LOAD = "import sys, jax, idefics2_jax; jax.block_until_ready(idefics2_jax.load_model(sys.argv[1])[1])"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.0],
                   help="fp32 checkpoint sizes (GB); the depth is chosen to match (at least 1 text layer)")
    p.add_argument("--width", choices=WIDTHS, default="narrow", help="narrow (1024) or idefics2-8b widths")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"],
                   help="--dtype values to convert to")
    p.add_argument("--workdir", default=None, help="where to write checkpoints (default: a new dir under $TMPDIR)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="pass --quantize SCHEME to the converter (int8, int4, int4:G)")
    p.add_argument("--export", action="store_true",
                   help="also measure `python -m convert --from orbax --to hf` of each converted checkpoint")
    p.add_argument("--load", action="store_true",
                   help="also measure the peak RSS of load_model(DST) (CPU: the params themselves live in RAM)")
    args = p.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir)
    rows = []
    try:
        base, _ = peak_rss([sys.executable, "-c", "import jax, orbax.checkpoint, idefics2_jax.ckpt.convert"])
        for gb in args.sizes_gb:
            layers = layers_for(gb * 1e9, args.width)
            src = os.path.join(workdir, f"src_{gb:g}gb")
            info = write_checkpoint(src, bench_config(layers, args.width))
            for dtype in args.dtypes:
                dst = os.path.join(workdir, f"dst_{gb:g}gb_{dtype}")
                quantize = ["--quantize", args.quantize] if args.quantize else []
                rss, seconds = peak_rss([sys.executable, "-m", "convert", "--from", "hf", src, dst, "--quiet",
                                         "--dtype", dtype, *quantize])
                export_rss = None
                if args.export:
                    back = dst + "_hf"
                    export_rss, _ = peak_rss([sys.executable, "-m", "convert", "--from", "orbax", "--to", "hf", dst,
                                              back, "--quiet"])
                    shutil.rmtree(back)
                load_rss = None
                if args.load:
                    load_rss, _ = peak_rss([sys.executable, "-c", _LOAD, dst])
                target = (1 << 30) + 2 * info["largest_tensor"]
                rows.append(dict(width=args.width, size_bytes=info["bytes"], tensors=info["tensors"],
                                 shards=info["shards"], text_layers=layers, largest_tensor=info["largest_tensor"],
                                 dtype=dtype + (f" + {args.quantize}" if args.quantize else ""), peak_rss=rss,
                                 baseline_rss=base, target=target, seconds=seconds,
                                 mb_per_s=info["bytes"] / 1e6 / seconds, ok=rss < target,
                                 load_peak_rss=load_rss, export_peak_rss=export_rss))
                shutil.rmtree(dst)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    mib = 1 << 20
    print(f"baseline (python + jax + orbax + idefics2_jax imported): {base / mib:.0f} MiB peak RSS")
    print("| checkpoint (fp32) | tensors | largest tensor | --dtype | peak RSS | target 1 GiB + 2x largest | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size_bytes'] / 1e9:.2f} GB ({r['width']}, {r['shards']} shards, {r['text_layers']} text layers) "
              f"| {r['tensors']} | {r['largest_tensor'] / mib:.0f} MiB | {r['dtype']} | {r['peak_rss'] / mib:.0f} MiB "
              f"| {r['target'] / mib:.0f} MiB {'ok' if r['ok'] else 'EXCEEDED'} "
              f"| {r['seconds']:.1f} s ({r['mb_per_s']:.0f} MB/s) |")
    if args.export:
        print("\n`--from orbax --to hf` of DST, peak RSS (target: the same 1 GiB + 2x largest):")
        for r in rows:
            print(f"  {r['size_bytes'] / 1e9:.2f} GB {r['width']} ({r['dtype']}): {r['export_peak_rss'] / mib:.0f} MiB "
                  f"({'ok' if r['export_peak_rss'] < r['target'] else 'EXCEEDED'})")
    if args.load:
        print("\nload_model(DST) peak RSS (CPU, so the params themselves are in RAM):")
        for r in rows:
            params = r["size_bytes"] * (2 if r["dtype"] != "float32" else 4) // 4
            print(f"  {r['size_bytes'] / 1e9:.2f} GB {r['width']} -> {r['dtype']}: params {params / mib:.0f} MiB, "
                  f"peak {r['load_peak_rss'] / mib:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline_rss": base, "rows": rows, "python": sys.version.split()[0]}, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
