"""Benchmark: Idefics2 image preprocessing, ours (numpy + Pillow) vs transformers' processors.

Processes the 8 photographs shipped in scikit-image's wheel (skimage/data) at the hub's default settings
(longest_edge 980, shortest_edge 378, image splitting on) as one batch of 8 single-image samples, and reports the
median wall time per call and the speed-up. transformers' `Idefics2ImageProcessorPil` is the reference; its
torchvision backend (`Idefics2ImageProcessor`) is timed too when torchvision is installed.

    python benchmarks/bench_preprocess.py [--repeats 10] [--threads N] [--no-split] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
          "retina.jpg", "rocket.jpg"]
CONFIG = {"do_image_splitting": True, "size": {"longest_edge": 980, "shortest_edge": 378}, "resample": 2,
          "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def load_photos():
    import skimage
    from PIL import Image

    images = []
    for name in PHOTOS:
        image = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name))
        image.load()  # decoding is not part of what is timed
        images.append(image)
    return images


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per processor (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="our processor's worker threads (default: auto)")
    parser.add_argument("--no-split", action="store_true", help="turn image splitting off")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    from idefics2_jax.processing import Idefics2ImageProcessor

    config = {**CONFIG, "do_image_splitting": not args.no_split}
    images = load_photos()
    batch = [[image] for image in images]

    ours = Idefics2ImageProcessor(**config, num_threads=args.threads)
    candidates = {f"idefics2_jax (threads={ours.num_threads})": lambda: ours(batch)}
    ours_1 = Idefics2ImageProcessor(**config, num_threads=1)
    if ours.num_threads != 1:
        candidates["idefics2_jax (threads=1)"] = lambda: ours_1(batch)

    reference_name = "transformers Idefics2ImageProcessorPil"
    try:
        from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

        hf_pil = Idefics2ImageProcessorPil(**config)
        candidates[reference_name] = lambda: hf_pil(batch, return_tensors="np")
    except ImportError as e:
        print(f"transformers not importable ({e}); timing ours only", file=sys.stderr)
        reference_name = None
    try:
        from transformers.models.idefics2.image_processing_idefics2 import Idefics2ImageProcessor as HFTorchvision

        hf_tv = HFTorchvision(**config)
        candidates["transformers Idefics2ImageProcessor (torchvision)"] = lambda: hf_tv(batch, return_tensors="np")
    except ImportError:
        pass  # torchvision not installed: the PIL backend is transformers' default then

    if reference_name is not None:
        a, b = ours(batch)["pixel_values"], hf_pil(batch, return_tensors="np")["pixel_values"]
        max_diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("nan")
    else:
        max_diff = None

    results = {}
    for name, fn in candidates.items():
        times = timed(fn, args.repeats)
        results[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": len(times)}
    ref_ms = results[reference_name]["median_ms"] if reference_name else None
    for r in results.values():
        r["speedup_vs_reference"] = ref_ms / r["median_ms"] if ref_ms else None

    shape = tuple(ours(batch)["pixel_values"].shape)
    print(f"{len(images)} photographs from skimage/data, splitting={'off' if args.no_split else 'on'}, "
          f"pixel_values {shape}, {os.cpu_count()} CPUs, median of {args.repeats} calls")
    if max_diff is not None:
        print(f"max |ours - reference| = {max_diff:.3g}")
    print(f"{'processor':<52} {'median ms':>10} {'min ms':>9} {'ms/image':>9} {'speed-up':>9}")
    for name, r in results.items():
        speedup = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-"
        print(f"{name:<52} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['median_ms'] / len(images):>9.1f} "
              f"{speedup:>9}")

    if args.json:
        import PIL

        payload = {"photos": PHOTOS, "config": config, "pixel_values_shape": shape, "max_abs_diff": max_diff,
                   "results": results, "python": platform.python_version(), "pillow": PIL.__version__,
                   "numpy": np.__version__, "cpus": os.cpu_count()}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
