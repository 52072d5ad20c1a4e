"""Benchmark: idefics2-jax vs transformers (torch eager, attn_implementation="sdpa") on identical random weights.

Measures, in one process with the two implementations interleaved (ratios matter, not absolute times):
  preprocess  image preprocessing of 8 photos (delegates to benchmarks/bench_preprocess.py)
  prefill     time to first token for one 980-px photo, with and without image splitting (identical inputs)
  decode      greedy decode tokens/s at each --batch (text prompt of --prompt-len tokens, --new-tokens forced new
              tokens, no early EOS): (time(1 + N tokens) - time(1 token)) per token
  roofline    weight bytes read per decode step, the machine's memory bandwidth (matrix-vector product of the same
              dtype), and the fraction of that bound each implementation reaches at batch 1
  e2e         one request end to end: each implementation's own processor on a chat prompt with a photo (default
              settings, splitting on) -> 64 new tokens -> decoded text
  memory      peak RSS (and peak device memory on an accelerator) of a fresh process per implementation that loads
              the model and serves the e2e request plus a prefill with splitting

Examples:
  python benchmarks/bench_model.py --size tiny --impl both
  python benchmarks/bench_model.py --size small --impl both --repeats 7 --json small.json
  python benchmarks/bench_model.py --size 8b --device gpu --dtype bfloat16 --batch 1 16 --what prefill decode \
      roofline memory --json 8b.json           # on an accelerator (random weights built on the device)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

WHAT = ("preprocess", "prefill", "decode", "roofline", "e2e", "memory")
PROMPT = "User:<image>Describe this image in detail.<end_of_utterance>\nAssistant:"
E2E_NEW_TOKENS = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=common.SIZES, default="tiny")
    p.add_argument("--impl", choices=("ours", "hf", "both"), default="both")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and compute dtype for both (default: float32 on cpu, bfloat16 on gpu)")
    p.add_argument("--attention", default=None,
                   help="our attention implementation (jax.nn.dot_product_attention: xla / cudnn; default xla)")
    p.add_argument("--what", nargs="+", default=["prefill", "decode", "roofline", "e2e", "memory"],
                   choices=WHAT + ("all",))
    p.add_argument("--batch", type=int, nargs="+", default=None, help="decode batch sizes (default 1 8; gpu 1 16)")
    p.add_argument("--prompt-len", type=int, default=64, help="decode: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=None, help="decode: timed new tokens (default 128; tiny 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as XLA:CPU uses)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", choices=("memory", "baseline"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "all" in args.what:
        args.what = list(WHAT)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.batch = args.batch or ([1, 8] if args.device == "cpu" else [1, 16])
    args.new_tokens = args.new_tokens or (64 if args.size == "tiny" else 128)
    args.threads = args.threads or os.cpu_count()
    return args


# ------------------------------------------------------------------------------------------ implementations
class Ours:
    name = "idefics2-jax"

    def __init__(self, args, torch_model=None):
        self.model, self.params = common.load_ours(args.size, args.dtype, args.attention, torch_model)
        self._processor = None
        self.dir = common.processor_dir(args.size)

    def generate(self, inputs: dict, new_tokens: int):
        from idefics2_jax import generate

        return generate(self.model, self.params, inputs["input_ids"], inputs.get("attention_mask"),
                        inputs.get("pixel_values"), inputs.get("pixel_attention_mask"), max_new_tokens=new_tokens,
                        eos_token_id=[], pad_token_id=0, bad_words_ids=[])

    @property
    def processor(self):
        if self._processor is None:
            from idefics2_jax import Idefics2Processor

            self._processor = Idefics2Processor.from_pretrained(self.dir)
        return self._processor

    def inputs(self, image) -> dict:
        return self.processor(text=PROMPT, images=[image], return_tensors="np")

    def request(self, image, new_tokens: int) -> str:
        inputs = self.inputs(image)
        out = self.generate(inputs, new_tokens)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


class HF:
    name = "transformers"

    def __init__(self, args, model=None):
        import torch

        torch.set_num_threads(args.threads)
        self.torch = torch
        self.device = common.torch_device(args.device)
        self.model = model if model is not None else common.load_hf(args.size, args.device, args.dtype)
        self.dtype = next(self.model.parameters()).dtype
        # Forced length: no EOS stopping (ours gets eos_token_id=[]), greedy.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.bad_words_ids = None
        self._processor = None
        self.dir = common.processor_dir(args.size)

    def _tensors(self, inputs: dict) -> dict:
        out = {}
        for k, v in inputs.items():
            t = self.torch.as_tensor(v)
            if k == "pixel_values":
                t = t.to(self.dtype)
            out[k] = t.to(self.device)
        return out

    def generate(self, inputs: dict, new_tokens: int):
        with self.torch.inference_mode():
            out = self.model.generate(**self._tensors(inputs), max_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=0)
        return out.cpu().numpy()

    @property
    def processor(self):
        if self._processor is None:
            import preprocessing_fixtures

            self._processor = preprocessing_fixtures.reference_processor(self.dir)
        return self._processor

    def inputs(self, image) -> dict:
        return dict(self.processor(text=PROMPT, images=[image], return_tensors="pt"))

    def request(self, image, new_tokens: int) -> str:
        inputs = self.inputs(image)
        out = self.generate(inputs, new_tokens)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def build(args, impls):
    out = {}
    torch_model = None
    if args.size == "8b":  # built once on the device; ours converts it in memory
        import torch

        torch_model = common.build_torch(args.size, common.torch_device(args.device),
                                         {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    if "ours" in impls:
        out["ours"] = Ours(args, torch_model)
    if "hf" in impls:
        out["hf"] = HF(args, torch_model)
    elif torch_model is not None:
        del torch_model
        import torch

        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------- inputs
def image_inputs(split: bool, size: str) -> dict:
    """Our processor's arrays for PROMPT with one 980-px photo (identical inputs for both implementations)."""
    from idefics2_jax import Idefics2Processor

    processor = Idefics2Processor.from_pretrained(common.processor_dir(size))
    return processor(text=PROMPT, images=[common.photo(longest_edge=980)], do_image_splitting=split,
                     return_tensors="np")


# --------------------------------------------------------------------------------------------------- phases
def ratio_row(name, t_ours, t_hf, unit="s"):
    return {"case": name, f"ours_{unit}": t_ours, f"hf_{unit}": t_hf,
            "speedup": (t_hf / t_ours) if t_ours and t_hf else None}


def run_prefill(args, impls) -> list[dict]:
    rows = []
    for split in (False, True):
        inputs = image_inputs(split, args.size)
        fns = {k: (lambda impl=impl: impl.generate(inputs, 1)) for k, impl in impls.items()}
        times = common.interleaved(fns, repeats=args.repeats)
        med = {k: common.median(v) for k, v in times.items()}
        row = ratio_row(f"980px photo, splitting {'on' if split else 'off'} ({inputs['input_ids'].shape[1]} tokens, "
                        f"{inputs['pixel_values'].shape[1]} image(s))", med.get("ours"), med.get("hf"))
        rows.append(row)
    return rows


def run_decode(args, impls) -> list[dict]:
    import numpy as np

    rows = []
    n = args.new_tokens
    for b in args.batch:
        inputs = {"input_ids": common.text_prompts(b, args.prompt_len),
                  "attention_mask": np.ones((b, args.prompt_len), np.int64)}
        fns = {}
        for k, impl in impls.items():
            fns[f"{k}_1"] = lambda impl=impl: impl.generate(inputs, 1)
            fns[f"{k}_n"] = lambda impl=impl: impl.generate(inputs, n + 1)
        outputs = {k: impl.generate(inputs, n + 1) for k, impl in impls.items()}
        for k, o in outputs.items():
            assert o.shape == (b, args.prompt_len + n + 1), f"{k}: stopped early ({o.shape})"
        times = common.interleaved(fns, repeats=args.repeats)
        med = {k: common.median(v) for k, v in times.items()}
        tps = {k: b * n / max(med[f"{k}_n"] - med[f"{k}_1"], 1e-9) for k in impls}
        row = {"batch": b, "prompt": args.prompt_len, "new_tokens": n,
               "ours_tok_s": tps.get("ours"), "hf_tok_s": tps.get("hf"),
               "speedup": tps["ours"] / tps["hf"] if len(tps) == 2 else None,
               "ours_ms_per_step": 1e3 * b / tps["ours"] if "ours" in tps else None,
               "hf_ms_per_step": 1e3 * b / tps["hf"] if "hf" in tps else None}
        if len(outputs) == 2:
            new = [o[:, args.prompt_len:] for o in outputs.values()]
            row["greedy_tokens_agree"] = float((new[0] == new[1]).mean())
        rows.append(row)
    return rows


def run_roofline(args, impls, decode_rows) -> dict:
    ours = impls.get("ours") or Ours(args)
    config = ours.model.config
    weight_bytes = common.decode_weight_bytes(ours.params)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    kv_pos = common.kv_bytes_per_position(config, itemsize)
    bw = common.memory_bandwidth(args.dtype, nbytes=512e6 if args.device == "cpu" else 4e9)
    out = {"weight_bytes_per_token": weight_bytes, "kv_bytes_per_position": kv_pos, "bandwidth": bw}
    row = next((r for r in decode_rows if r["batch"] == 1), None)
    if row is not None:
        context = row["prompt"] + row["new_tokens"] / 2  # mean KV length read per step
        step_bytes = weight_bytes + kv_pos * context
        out["bytes_per_step_b1"] = step_bytes
        out["roofline_tok_s"] = bw["GBps"] * 1e9 / step_bytes
        for k in ("ours", "hf"):
            if row.get(f"{k}_tok_s"):
                out[f"{k}_fraction"] = row[f"{k}_tok_s"] * step_bytes / (bw["GBps"] * 1e9)
    return out


def run_e2e(args, impls) -> dict:
    image = common.photo()
    fns = {k: (lambda impl=impl: impl.request(image, E2E_NEW_TOKENS)) for k, impl in impls.items()}
    texts = {k: fn() for k, fn in fns.items()}
    times = common.interleaved(fns, repeats=args.repeats, warmup=0)
    med = {k: common.median(v) for k, v in times.items()}
    row = ratio_row(f"{common.PHOTO} (512x512, splitting on) -> {E2E_NEW_TOKENS} tokens", med.get("ours"),
                    med.get("hf"))
    row["ratio_ours_over_hf"] = med["ours"] / med["hf"] if len(med) == 2 else None
    row["same_text"] = (len(set(texts.values())) == 1) if len(texts) == 2 else None
    return row


def run_memory(args, impls) -> list[dict]:
    rows = []
    base = [os.path.abspath(__file__), "--size", args.size, "--device", args.device, "--dtype", args.dtype,
            "--threads", str(args.threads)] + (["--attention", args.attention] if args.attention else [])
    for impl in impls:
        for kind in ("baseline", "memory"):
            rc, rss, out = common.run_child(base + ["--child", kind, "--impl", impl])
            if rc != 0:
                raise RuntimeError(f"{kind} child for {impl} failed (exit {rc}):\n{out[-3000:]}")
            res = common.last_json_line(out) if kind == "memory" else {}
            label = {"ours": "idefics2-jax", "hf": "transformers"}[impl]
            label += ": imports only" if kind == "baseline" else ": load + e2e request + split prefill"
            rows.append({"impl": impl, "process": label, "peak_rss_mib": rss, **res})
    return rows


def child(args) -> int:
    """A fresh process: load one implementation and serve the e2e request and a split prefill; report device peak."""
    if args.child == "baseline":
        if args.impl == "hf":
            import torch  # noqa: F401
            import transformers  # noqa: F401
        else:
            import idefics2_jax  # noqa: F401
        return 0
    # Each implementation with its own processor only (the transformers process never imports JAX).
    impl = build(args, [args.impl])[args.impl]
    impl.request(common.photo(), E2E_NEW_TOKENS)
    impl.generate(impl.inputs(common.photo(longest_edge=980)), 1)  # default settings: splitting on
    peak = common.gpu_peak_bytes(args.impl) if args.device == "gpu" else None
    print(json.dumps({"device_peak_gib": None if peak is None else peak / 2**30}))
    return 0


def run_preprocess(args) -> dict:
    import tempfile

    import bench_preprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        bench_preprocess.main(["--repeats", str(args.repeats), "--json", f.name])
        with open(f.name, encoding="utf-8") as g:
            return json.load(g)


# ----------------------------------------------------------------------------------------------------- main
def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_platform(args.device, args.threads)
    if args.child:
        return child(args)
    impls_wanted = ["ours", "hf"] if args.impl == "both" else [args.impl]
    results: dict = {"args": vars(args), "versions": None}
    t0 = time.perf_counter()
    if "preprocess" in args.what:
        results["preprocess"] = run_preprocess(args)
    model_phases = {"prefill", "decode", "roofline", "e2e"} & set(args.what)
    impls = build(args, impls_wanted) if model_phases else {}
    results["versions"] = common.versions()
    if impls:
        ours = impls.get("ours")
        params = common.count_params(ours.params) if ours else None
        print(f"size={args.size} dtype={args.dtype} device={args.device} params={fmt(params and params / 1e6)}M "
              f"threads={args.threads} repeats={args.repeats} ({results['versions'].get('jax_device', '')})")
    if "prefill" in args.what:
        rows = results["prefill"] = run_prefill(args, impls)
        print("\nPrefill (time to first token, generate(max_new_tokens=1), s)")
        print(common.table([[r["case"], fmt(r["ours_s"]), fmt(r["hf_s"]), fmt(r["speedup"], ".2f") + "x"]
                            for r in rows], ["case", "ours", "transformers", "speed-up"]))
    decode_rows = []
    if "decode" in args.what:
        decode_rows = results["decode"] = run_decode(args, impls)
        print(f"\nDecode (greedy, prompt {args.prompt_len} tokens, {args.new_tokens} timed new tokens, tok/s)")
        print(common.table([[str(r["batch"]), fmt(r["ours_tok_s"], ".1f"), fmt(r["hf_tok_s"], ".1f"),
                             fmt(r["speedup"], ".2f") + "x", fmt(r["ours_ms_per_step"], ".2f"),
                             fmt(r["hf_ms_per_step"], ".2f"), fmt(r.get("greedy_tokens_agree"), ".2f")]
                            for r in decode_rows],
                           ["batch", "ours tok/s", "hf tok/s", "speed-up", "ours ms/step", "hf ms/step",
                            "tokens agree"]))
    if "roofline" in args.what:
        r = results["roofline"] = run_roofline(args, impls, decode_rows)
        bw = r["bandwidth"]
        print(f"\nDecode roofline (batch 1): {r['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token "
              f"+ {r['kv_bytes_per_position'] / 1e3:.1f} kB of KV per cached position; bandwidth "
              f"{bw['GBps']:.1f} GB/s ({args.dtype} matrix-vector product of {bw['bytes'] / 1e6:.0f} MB: "
              + ", ".join(f"{k[:-5]} {v:.1f}" for k, v in bw.items() if k.endswith("_GBps") and k != "GBps") + ")")
        if "roofline_tok_s" in r:
            print(f"  bound {r['roofline_tok_s']:.0f} tok/s; ours reaches {fmt(r.get('ours_fraction'), '.0%')}, "
                  f"transformers {fmt(r.get('hf_fraction'), '.0%')}")
    if "e2e" in args.what:
        r = results["e2e"] = run_e2e(args, impls)
        print("\nEnd-to-end request (processor -> generate -> decoded text, s)")
        print(common.table([[r["case"], fmt(r["ours_s"]), fmt(r["hf_s"]), fmt(r["ratio_ours_over_hf"], ".2f")]],
                           ["case", "ours", "transformers", "ours / hf"]))
    if "memory" in args.what:
        del impls  # the children measure themselves; free ours first
        rows = results["memory"] = run_memory(args, impls_wanted)
        print("\nPeak memory (fresh process: load + e2e request + split prefill)")
        print(common.table([[r["process"], fmt(r["peak_rss_mib"], ".0f"), fmt(r.get("device_peak_gib"), ".2f")]
                            for r in rows], ["process", "peak RSS MiB", "device peak GiB"]))
    if "preprocess" in args.what:
        res = results["preprocess"]["results"]
        print("\nPreprocessing (bench_preprocess.py: 8 photos, default settings)")
        print(common.table([[k, fmt(v["median_ms"], ".1f"), fmt(v["speedup_vs_reference"], ".2f") + "x"]
                            for k, v in res.items()], ["processor", "median ms", "speed-up"]))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
