"""Decode speed of weight-only quantized idefics2-jax against its float model, side by side in one process.

For each scheme: greedy tokens/s of `generate` (the time of n + 1 new tokens minus the time of 1, so prefill and
dispatch cancel), the weight bytes one decode step reads, and how many greedy tokens agree with the float model.

    python benchmarks/bench_quant.py --size small --batch 1 8 --schemes int8 int4:64 --json quant.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def weight_bytes(params) -> int:
    """`common.decode_weight_bytes` with int4 counted as half a byte."""
    import jax
    import jax.numpy as jnp

    int4 = sum(x.size for x in jax.tree.leaves(params["text_model"]) if x.dtype == jnp.int4)
    return common.decode_weight_bytes(params) - int4 // 2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=common.SIZES, default="small")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--schemes", nargs="+", default=["int8", "int4:64"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    common.setup_platform(args.device)
    from idefics2_jax import generate, quant

    model, params = common.load_ours(args.size, args.dtype)
    variants = {"float": params, **{s: quant.quantize_params(params, s) for s in args.schemes}}
    rows = []
    for b in args.batch:
        ids = common.text_prompts(b, args.prompt_len)
        mask = np.ones_like(ids)

        def run(p, n):
            return generate(model, p, ids, mask, max_new_tokens=n, eos_token_id=[], pad_token_id=0, bad_words_ids=[])

        fns = {}
        for name, p_ in variants.items():
            fns[f"{name}_1"] = lambda p_=p_: run(p_, 1)
            fns[f"{name}_n"] = lambda p_=p_: run(p_, args.new_tokens + 1)
        outs = {name: np.asarray(run(p_, args.new_tokens + 1))[:, args.prompt_len:] for name, p_ in variants.items()}
        times = {k: common.median(v) for k, v in common.interleaved(fns, repeats=args.repeats).items()}
        for name, p_ in variants.items():
            tps = b * args.new_tokens / max(times[f"{name}_n"] - times[f"{name}_1"], 1e-9)
            rows.append({"batch": b, "scheme": name, "tok_s": tps, "weight_bytes_per_step": weight_bytes(p_),
                         "tokens_agree_with_float": float((outs[name] == outs["float"]).mean())})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["batch"]: r["tok_s"] for r in rows if r["scheme"] == "float"}
    table = [[r["batch"], r["scheme"], f"{r['tok_s']:.1f}", f"{r['tok_s'] / base[r['batch']]:.2f}x",
              f"{r['weight_bytes_per_step'] / 2**20:.1f}", f"{r['tokens_agree_with_float']:.2f}"] for r in rows]
    print(f"\n{args.size}, {args.dtype} compute, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print(common.table(table, ["batch", "scheme", "tok/s", "vs float", "weight MiB / step", "tokens = float"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "versions": common.versions(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
