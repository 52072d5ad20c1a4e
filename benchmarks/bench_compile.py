"""Benchmark: first-call latency in a fresh process, with and without JAX's persistent compilation cache.

Each case runs in its own fresh Python process, which loads the model and then serves the e2e request of
bench_model.py (one photo, default settings with splitting -> 64 new tokens) twice. Reported per case:
  load    seconds from process start to a loaded model (imports included)
  first   seconds for the first request (idefics2-jax: tracing + XLA compilation or cache reads + the work)
  second  seconds for the identical second request (everything compiled)
  compile first - second: the one-off cost a user pays per fresh process

Cases:
  ours, cache off     IDEFICS2_JAX_COMPILATION_CACHE=0
  ours, cache cold    an empty cache directory (compiles and writes the cache)
  ours, cache warm    the directory the cold run filled (reads compiled programs instead of compiling)
  transformers        torch eager (nothing to compile): its first vs second request, for reference

Examples:
  python benchmarks/bench_compile.py --size small
  python benchmarks/bench_compile.py --size tiny --impl ours --json compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--impl", choices=("ours", "hf", "both"), default="both")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per case (median reported)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> int:
    common.setup_platform("cpu")
    import bench_model

    bargs = bench_model.parse_args(["--size", args.size, "--impl", args.child])
    impl = bench_model.build(bargs, [args.child])[args.child]
    image = common.photo()
    impl.processor  # noqa: B018  (loaded with the model, not timed as compilation)
    t_load = time.perf_counter() - _START
    times, texts = [], []
    for _ in range(2):
        start = time.perf_counter()
        texts.append(impl.request(image, bench_model.E2E_NEW_TOKENS))
        times.append(time.perf_counter() - start)
    assert texts[0] == texts[1], texts
    print(json.dumps({"load_s": t_load, "first_s": times[0], "second_s": times[1]}))
    return 0


def run_case(args, impl: str, env: dict) -> dict:
    rc, rss, out = common.run_child([os.path.abspath(__file__), "--size", args.size, "--child", impl], env=env)
    if rc != 0:
        raise RuntimeError(f"child {impl} failed (exit {rc}):\n{out[-3000:]}")
    res = common.last_json_line(out)
    res["compile_s"] = res["first_s"] - res["second_s"]
    res["peak_rss_mib"] = rss
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    common.checkpoint_dir(args.size)  # build the checkpoint outside the timed processes
    cases = []
    cache = tempfile.mkdtemp(prefix="idefics2_jax_compile_bench_")
    try:
        for _ in range(args.repeats):
            if args.impl in ("ours", "both"):
                shutil.rmtree(cache, ignore_errors=True)
                os.makedirs(cache)
                for name, value in (("cache off", "0"), ("cache cold (empty dir)", cache), ("cache warm", cache)):
                    cases.append((f"idefics2-jax, {name}",
                                  run_case(args, "ours", {"IDEFICS2_JAX_COMPILATION_CACHE": value})))
            if args.impl in ("hf", "both"):
                cases.append(("transformers (eager)", run_case(args, "hf", {})))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    merged: dict[str, list[dict]] = {}
    for name, res in cases:
        merged.setdefault(name, []).append(res)
    rows = []
    for name, runs in merged.items():
        row = {"case": name}
        for key in ("load_s", "first_s", "second_s", "compile_s", "peak_rss_mib"):
            row[key] = common.median([r[key] for r in runs])
        rows.append(row)
    print(f"size={args.size}, fresh process per case, e2e request (photo, splitting on -> 64 tokens) twice")
    print(common.table([[r["case"], f"{r['load_s']:.2f}", f"{r['first_s']:.2f}", f"{r['second_s']:.2f}",
                         f"{r['compile_s']:.2f}", f"{r['peak_rss_mib']:.0f}"] for r in rows],
                       ["case", "load s", "first request s", "second request s", "first - second s", "peak RSS MiB"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows, "versions": common.versions()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
