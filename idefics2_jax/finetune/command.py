"""`python -m idefics2_jax finetune`: the flags and the job (the parser in `__main__` adds these arguments).

    python -m idefics2_jax finetune --model DIR --data train.jsonl --output OUT --steps 200 --lr 1e-4

OUT receives the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), or with `--full` a checkpoint
in the input's format in OUT/model (HF in, HF out; Orbax in, Orbax out), `trainer_state.json` (loss, learning
rate, tokens/s and eval loss per step) and `checkpoints/` (Orbax train state every `--save-every` steps, for
`--resume`).
Errors in the flags or the data are ValueErrors raised before any weights are loaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from ..ckpt.convert import convert_hf_to_orbax
from ..ckpt.orbax import is_orbax_dir
from ..config import Idefics2Config
from ..loading import load_model, save_pretrained
from ..nn.partitioning import make_mesh
from ..processing import Idefics2Processor
from .. import quant
from . import lora
from .data import read_jsonl
from .lora import LoraConfig
from .train import SCHEDULES, Trainer, TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout or converted Orbax)")
    p.add_argument("--data", required=True, help="JSONL, one TRL-format example per line (image paths relative "
                                                 "to the file)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--eval-data", help="JSONL evaluated at every save and at the end")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", choices=SCHEDULES, default="linear")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--max-length", type=int, default=None, help="longer samples are an error (never truncated)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--target-modules", default=None,
                   help="a regex (re.fullmatch on HF module names) or a comma-separated list of name suffixes "
                        "(default: the Idefics2 tutorial's regex)")
    p.add_argument("--modules-to-save", default=None, help="comma-separated modules trained in full, e.g. connector")
    p.add_argument("--full", action="store_true", help="train every parameter (no adapter)")
    p.add_argument("--remat", action="store_true", help="recompute vision, perceiver and decoder layers in the "
                                                        "backward pass (less memory, ~1 extra forward)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the frozen weights and the compute (default: the checkpoint's); adapters and "
                        "optimizer state are float32")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="QLoRA: quantize the frozen base (int8, int4, int4:GROUP); LoRA only")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=4 (default: one device)")
    p.add_argument("--image-splitting", choices=["on", "off"], default=None,
                   help="split images into 4 crops + the whole (default: the processor's setting)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _mesh(spec: str | None):
    if not spec:
        return None
    sizes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in ("data", "fsdp", "model") or not value.strip().isdigit():
            raise ValueError(f"--mesh must look like data=2,fsdp=4 (axes data, fsdp, model), got {spec!r}")
        sizes[name.strip()] = int(value)

    return make_mesh(**sizes)


def lora_config_from(args):

    targets = args.target_modules
    if targets is not None and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    modules = [m.strip() for m in args.modules_to_save.split(",")] if args.modules_to_save else None
    kwargs = {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "modules_to_save": modules}
    if targets is not None:
        kwargs["target_modules"] = targets
    return LoraConfig(**kwargs)


def run(args) -> dict:
    """The job. Returns Trainer.fit's result plus "output" (what was written)."""

    model_dir = os.path.expanduser(args.model)
    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir!r} is not a directory")
    if args.full and (args.modules_to_save or args.target_modules):
        raise ValueError("--full trains every parameter: --target-modules and --modules-to-save do not apply")
    if args.quantize is not None:
        if args.full:
            raise ValueError("--quantize freezes a quantized base for LoRA (QLoRA); it does not combine with --full")
        quant.parse_scheme(args.quantize)
    config = TrainConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule,
                         weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
                         max_length=args.max_length, save_every=args.save_every,
                         do_image_splitting=None if args.image_splitting is None else args.image_splitting == "on")
    lora_config = None if args.full else lora_config_from(args)
    mesh = _mesh(args.mesh)
    processor = Idefics2Processor.from_pretrained(model_dir)
    latents = Idefics2Config.from_pretrained(model_dir).perceiver_config.resampler_n_latents
    if processor.image_seq_len != latents:
        raise ValueError(f"the processor in {model_dir} expands each image to {processor.image_seq_len} tokens but "
                         f"the model's perceiver makes {latents}; fix image_seq_len in its processor config")
    if config.do_image_splitting is not None:
        processor.image_processor.do_image_splitting = config.do_image_splitting
    examples = read_jsonl(args.data, processor, config.max_length)  # every data error, before weights load
    eval_examples = read_jsonl(args.eval_data, processor, config.max_length) if args.eval_data else None
    out_dir = os.path.expanduser(args.output)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not args.resume:
        raise ValueError(f"--output {out_dir} is not empty; use a new directory, or --resume to continue a run")
    os.makedirs(out_dir, exist_ok=True)

    model, params = load_model(model_dir, dtype=args.dtype, mesh=mesh, quantize=args.quantize)
    if args.remat:
        model = model.clone(remat=True)
    if lora_config is not None:
        lora.plan(model.config, lora_config)  # unknown or unsupported targets fail here
    trainer = Trainer(model, params, config, lora_config, mesh=mesh)
    result = trainer.fit(processor, examples, out_dir, eval_examples=eval_examples, resume=args.resume,
                         progress=not args.quiet)
    state = result["state"]
    if lora_config is not None:
        lora.save(out_dir, state["trainable"], lora_config)
        result["output"] = "a PEFT adapter"
    else:
        _save_full(out_dir, model, trainer.merged_params(state), processor, orbax=is_orbax_dir(model_dir))
        result["output"] = ("an Orbax" if is_orbax_dir(model_dir) else "an HF") + " checkpoint (model/)"
    return result


def _save_full(out_dir, model, params, processor, orbax: bool) -> None:
    """HF in, HF out; Orbax in, Orbax out (the HF checkpoint converted by the converter, then removed)."""

    if not orbax:
        save_pretrained(os.path.join(out_dir, "model"), model, params, processor, overwrite=True)
        return
    tmp = tempfile.mkdtemp(prefix=".hf-", dir=out_dir)
    try:
        save_pretrained(tmp, model, params, processor, overwrite=True)
        convert_hf_to_orbax(tmp, os.path.join(out_dir, "model"), overwrite=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(result, out_dir: str) -> None:
    history = result["history"]["log_history"]
    step = result["state"]["step"]
    if result["interrupted"]:
        print(f"interrupted: saved step {step} in {out_dir}/checkpoints; continue with --resume", file=sys.stderr)
    if history:
        first, last = history[0], history[-1]
        eval_part = f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""
        print(f"step {step}: loss {first['loss']:.4f} -> {last['loss']:.4f}{eval_part}; wrote {result['output']} "
              f"to {out_dir}", file=sys.stderr)
