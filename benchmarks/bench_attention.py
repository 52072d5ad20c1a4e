"""Benchmark: the one attention function (idefics2_jax.nn.attention.dot_product_attention) against torch's
scaled_dot_product_attention (what transformers' sdpa path calls, after `repeat_kv`) at the shapes Idefics2 runs.

Cases: vision tower self-attention (patches per image, `small`'s 3 heads of 64 and the real 16 heads of 72), the
perceiver's latents-over-patches attention, a text prefill and a decode step over the KV cache (GQA 32/8 and
small's 8/2). Masks shaped as the model builds them (key padding [B, 1, S]; causal [B, T, S]). Prints a table of
milliseconds; --json writes it.

  python benchmarks/bench_attention.py [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# name: (batch, q_len, kv_len, heads, kv_heads, head_dim, causal)
CASES = {
    "vision small 1x1296 (512 px)": (1, 1296, 1296, 3, 3, 64, False),
    "vision small 4x400 (4 crops)": (4, 400, 400, 3, 3, 64, False),
    "vision small 1x4900 (980 px)": (1, 4900, 4900, 3, 3, 64, False),
    "vision 8b 1x1296": (1, 1296, 1296, 16, 16, 72, False),
    "perceiver 64 latents over 1x4900": (1, 64, 4964, 16, 4, 96, False),
    "text prefill 512 (GQA 8/2)": (1, 512, 512, 8, 2, 64, True),
    "decode b8 over 1024 (GQA 32/8)": (8, 1, 1024, 32, 8, 128, False),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    common.setup_platform("cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from idefics2_jax.nn.attention import dot_product_attention

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name, (b, t, s, n, kv, h, causal) in CASES.items():
        rng = np.random.default_rng(0)
        q = rng.standard_normal((b, t, n, h), np.float32)
        k = rng.standard_normal((b, s, kv, h), np.float32)
        v = rng.standard_normal((b, s, kv, h), np.float32)
        # As the model builds them: a key-padding mask [B, 1, S] (vision, perceiver, decode), or [B, T, S] causal.
        mask = rng.random((b, 1, s)) < 0.9
        mask[..., 0] = True
        if causal:
            mask = mask & np.tril(np.ones((t, s), bool), s - t)[None]
        jq, jk, jv, jm = map(jnp.asarray, (q, k, v, mask))
        ours = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m, scale=h**-0.5))
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        tm = torch.from_numpy(mask)[:, None]

        def theirs():
            kk, vv = tk.repeat_interleave(n // kv, 1), tv.repeat_interleave(n // kv, 1)
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(tq, kk, vv, attn_mask=tm, scale=h**-0.5)

        diff = float(np.abs(np.asarray(ours(jq, jk, jv, jm)) - theirs().transpose(1, 2).numpy()).max())
        times = common.interleaved({"ours": lambda: ours(jq, jk, jv, jm), "torch": theirs}, repeats=args.repeats)
        med = {k: common.median(x) * 1e3 for k, x in times.items()}
        rows.append({"case": name, "ours_ms": med["ours"], "torch_ms": med["torch"],
                     "speedup": med["torch"] / med["ours"], "max_abs_diff": diff})
    print(common.table([[r["case"], f"{r['ours_ms']:.2f}", f"{r['torch_ms']:.2f}", f"{r['speedup']:.2f}x",
                         f"{r['max_abs_diff']:.1e}"] for r in rows],
                       ["case (fp32, CPU)", "ours ms", "torch sdpa ms", "speed-up", "max |diff|"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"versions": common.versions(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
