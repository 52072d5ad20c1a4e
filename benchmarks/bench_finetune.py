"""Fine-tuning step time and peak memory: idefics2-jax (`finetune.Trainer`) against transformers + peft (the
same LoRA config, batch, AdamW and gradient clipping), LoRA and full training, remat / gradient checkpointing
on and off.

Each (implementation, mode, remat) runs in a fresh process so its peak RSS is its own: it builds the model from the
same checkpoint, runs `--warmup` untimed steps (compilation for ours) and `--steps` timed ones, and reports the
median step time. For ours it also reports XLA's compiled temp (activation) bytes of the gradient function, which
is what remat changes; peak device memory on an accelerator.

    python benchmarks/bench_finetune.py --size small --json finetune.json
    python benchmarks/bench_finetune.py --size 8b --device gpu --modes lora --dtype bfloat16 --batch 4 --image-px 980
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=common.SIZES, default="small")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="frozen weights / compute")
    p.add_argument("--impls", nargs="+", choices=("ours", "hf"), default=["ours", "hf"])
    p.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    p.add_argument("--remat", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-len", type=int, default=128, help="text tokens per sample (plus one image)")
    p.add_argument("--image-px", type=int, default=378, help="image side (splitting off)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", nargs=3, metavar=("IMPL", "MODE", "REMAT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


LORA = dict(r=8, lora_alpha=8, lora_dropout=0.0)


def batch_arrays(args, config):
    """One image per sample (its tokens expanded as the processor does) then random text; labels on the text."""
    rng = np.random.default_rng(0)
    n_img = config["perceiver_config"]["resampler_n_latents"]
    image_id, fake = config["image_token_id"], 32000
    rows = []
    for _ in range(args.batch):
        text = rng.integers(3, 32000, args.text_len).tolist()
        rows.append([1, fake] + [image_id] * n_img + [fake] + text)
    ids = np.asarray(rows, np.int64)
    labels = ids.copy()
    labels[:, : 3 + n_img] = -100
    px = args.image_px
    pixels = rng.standard_normal((args.batch, 1, 3, px, px)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels,
            "pixel_attention_mask": np.ones((args.batch, 1, px, px), np.int64), "labels": labels}


def run_ours(args, mode, remat, batch):
    import jax

    import idefics2_jax
    from idefics2_jax.finetune.train import Trainer, TrainConfig

    model, params = common.load_ours(args.size, args.dtype)
    model = model.clone(remat=remat)
    trainer = Trainer(model, params, TrainConfig(steps=10**6, lr=1e-5, max_grad_norm=1.0),
                      None if mode == "full" else idefics2_jax.LoraConfig(**LORA))
    state = trainer.init_state(1)
    compiled = trainer._grad.lower(state["trainable"], trainer.params, batch, jax.random.key(0)).compile()
    analysis = compiled.memory_analysis()
    temp = None if analysis is None else int(analysis.temp_size_in_bytes)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = trainer.step(state, [batch])
        jax.block_until_ready(state["trainable"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "xla_temp_mib": None if temp is None else temp / 2**20,
            "loss": metrics["loss"], "trainable": common.count_params(state["trainable"])}


def run_hf(args, mode, remat, batch):
    import peft
    import torch

    model = common.load_hf(args.size, args.device, args.dtype)
    device = common.torch_device(args.device)
    if mode == "lora":
        from idefics2_jax.finetune.lora import DEFAULT_TARGET_MODULES

        model = peft.get_peft_model(model, peft.LoraConfig(target_modules=DEFAULT_TARGET_MODULES, **LORA))
    if remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, eps=1e-8, weight_decay=0.0)
    tensors = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    if args.dtype == "bfloat16":
        tensors["pixel_values"] = tensors["pixel_values"].to(torch.bfloat16)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        common.sync(loss)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "loss": float(loss), "trainable": sum(p.numel() for p in trainable)}


def child(args):
    impl, mode, remat = args.child
    common.setup_platform(args.device)
    batch = batch_arrays(args, common.config_dict(args.size))
    result = (run_ours if impl == "ours" else run_hf)(args, mode, remat == "on", batch)
    peak = common.gpu_peak_bytes(impl) if args.device == "gpu" else None
    result["device_peak_gib"] = None if peak is None else peak / 2**30
    print(json.dumps(result))


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.size != "8b":
        common.checkpoint_dir(args.size)  # build once, outside the measured processes
    base = [os.path.abspath(__file__), "--size", args.size, "--device", args.device, "--dtype", args.dtype,
            "--batch", str(args.batch), "--text-len", str(args.text_len), "--image-px", str(args.image_px),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    rows = []
    for mode in args.modes:
        for remat in args.remat:
            for impl in args.impls:
                rc, rss, out = common.run_child(base + ["--child", impl, mode, remat])
                if rc:
                    raise SystemExit(f"{impl} {mode} remat {remat} failed:\n{out[-3000:]}")
                rows.append({"impl": impl, "mode": mode, "remat": remat, "peak_rss_mib": rss,
                             **common.last_json_line(out)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.size}, {args.dtype}, batch {args.batch} x (1 image {args.image_px}px + {args.text_len} text "
          f"tokens), median of {args.steps} steps after {args.warmup}")
    table = []
    for r in rows:
        ratio = ""
        if r["impl"] == "ours":
            hf = next((h for h in rows if h["impl"] == "hf" and h["mode"] == r["mode"] and h["remat"] == r["remat"]),
                      None)
            ratio = f"{r['step_s'] / hf['step_s']:.2f}x" if hf else ""
        table.append([r["impl"], r["mode"], r["remat"], f"{r['step_s'] * 1e3:.0f} ms", ratio,
                      f"{r['peak_rss_mib']:.0f}", "" if r.get("xla_temp_mib") is None else f"{r['xla_temp_mib']:.0f}",
                      "" if r.get("device_peak_gib") is None else f"{r['device_peak_gib']:.2f}", f"{r['loss']:.3f}"])
    print(common.table(table, ["impl", "mode", "remat", "step", "ours/hf", "peak RSS MiB", "XLA temp MiB",
                               "device peak GiB", "loss"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "versions": common.versions(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
