"""Command line: `python -m idefics2_jax generate ...` (chat with images), `python -m idefics2_jax demo` (the same on
a tiny random-weight checkpoint it builds itself, without torch or transformers).

    python -m idefics2_jax generate --model DIR --image photo.jpg --prompt "What is in this image?"
    python -m idefics2_jax demo
    python -m idefics2_jax bench --model DIR      # decode tokens/s, with and without streaming
    python -m idefics2_jax finetune --model DIR --data train.jsonl --output OUT --steps 100   # LoRA (PEFT adapter)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .ckpt.shapes import param_shapes
from .ckpt.table import checkpoint_entries, hf_shape
from .config import Idefics2Config
from .finetune import command as finetune_command
from .finetune.train import TrainingDiverged
from .generation import GenerationConfig, TextStreamer, generate
from .generation.api import check_options
from .generation.loop import enable_compilation_cache
from .loading import load_model
from .processing import DEFAULT_CHAT_TEMPLATE, Idefics2Processor, load_image_file

RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"
DEFAULT_DEMO_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                "idefics2_jax", "tiny-random-idefics2")
DEMO_PROMPT = "What do you see in this image?"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


# ------------------------------------------------------------------------------------------- tiny checkpoint
def tiny_config_dict(vocab_size: int = 32000) -> dict:
    """A tiny Idefics2 with `vocab_size` ordinary tokens followed by the three Idefics2 special tokens, the real
    patch size and 70x70 position grid."""
    return {
        "model_type": "idefics2",
        "image_token_id": vocab_size + 1,
        "tie_word_embeddings": False,
        "dtype": "float32",
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "patch_size": 14, "image_size": 980},
        "perceiver_config": {"hidden_size": 64, "rms_norm_eps": 1e-6, "resampler_n_latents": 64,
                             "resampler_depth": 2, "resampler_n_heads": 4, "resampler_head_dim": 16,
                             "num_key_value_heads": 2},
        "text_config": {"model_type": "mistral", "vocab_size": vocab_size + 3, "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
                        "rms_norm_eps": 1e-5, "sliding_window": 256, "pad_token_id": 0, "bos_token_id": 1,
                        "eos_token_id": 2, "rope_theta": 10000.0},
    }


SPECIAL_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")

# What the demo's tokenizer is trained on: English the demo prompts use, and enough variety for a few hundred
# merges. Deterministic (one thread, fixed text), so every machine builds the same tokenizer.
_DEMO_CORPUS = """\
What do you see in this image? What is in this picture? Describe the photo in one sentence.
There is a red circle, a blue square and a green triangle on a white background.
The cat sits on the mat next to a cup of coffee. A rocket is launching into the sky at night.
How many shapes are there? Is there a yellow square? Which image has more shapes, the first or the second?
The astronaut floats in space above the earth. A motorcycle is parked on the street in front of the house.
Colours: red, green, blue, yellow, orange, purple, black, white, grey, brown, pink. Numbers: 0 1 2 3 4 5 6 7 8 9.
Shapes: circle, square, triangle, rectangle, line, point. Left, right, top, bottom, middle, above, below.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
I think the answer is yes. No, it is not. The picture shows a person, an animal, a plant and a building.
"""


def train_demo_tokenizer() -> bytes:
    """A Llama-style SentencePiece BPE model (byte fallback, `<unk>` `<s>` `</s>` as ids 0-2) trained here on a
    small built-in text: the demo needs no tokenizer download and no test-only package. Returns the model's bytes."""
    import io

    import sentencepiece as spm

    lines = [line for line in _DEMO_CORPUS.splitlines() if line.strip()] * 4
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=512, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=1.0, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return out.getvalue()


def build_tiny_random_checkpoint(directory: str, seed: int = 0) -> str:
    """Write an HF-layout Idefics2 checkpoint with random O(1) weights: config.json, model.safetensors,
    generation_config.json, a tokenizer.model trained here (`train_demo_tokenizer`) with the three Idefics2 special
    tokens after its vocabulary, and the preprocessor / processor configs. Needs no torch or transformers."""
    import numpy as np
    import sentencepiece as spm
    from safetensors.numpy import save_file

    tokenizer_model = train_demo_tokenizer()
    vocab = spm.SentencePieceProcessor(model_proto=tokenizer_model).get_piece_size()
    fake, image, end_of_utterance = vocab, vocab + 1, vocab + 2
    added = {0: "<unk>", 1: "<s>", 2: "</s>", **{vocab + i: t for i, t in enumerate(SPECIAL_TOKENS)}}
    os.makedirs(directory, exist_ok=True)
    config = Idefics2Config.from_dict(tiny_config_dict(vocab))
    shapes = param_shapes(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, entry in checkpoint_entries(config).items():
        shape = hf_shape(shapes[entry.path], entry.transform)
        if key.endswith("latents") or "embed_tokens" in key or "position_embedding" in key:
            x = rng.standard_normal(shape)
        elif len(shape) == 1:  # norm weights around 1, biases around 0
            x = (1.0 if "norm" in key and key.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        else:  # [out, in, ...]: 1/sqrt(fan_in) keeps activations and logits O(1)
            x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        tensors[key] = np.ascontiguousarray(x, np.float32)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(tokenizer_model)
    files = {
        "config.json": config.to_dict(),
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": [2, end_of_utterance], "pad_token_id": 0,
                                   "bad_words_ids": [[fake], [image]]},
        "tokenizer_config.json": {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
            "padding_side": "left", "clean_up_tokenization_spaces": False,
            "additional_special_tokens": list(SPECIAL_TOKENS),
            "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                     for i, c in added.items()},
        },
        # The hub's image processor settings at a smaller size (the demo's vision tower runs on a CPU in seconds).
        "preprocessor_config.json": {
            "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
            "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "Idefics2ImageProcessor", "processor_class": "Idefics2Processor", "resample": 2,
            "rescale_factor": 1 / 255, "size": {"longest_edge": 448, "shortest_edge": 224},
        },
        "processor_config.json": {"processor_class": "Idefics2Processor", "image_seq_len": 64},
    }
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(DEFAULT_CHAT_TEMPLATE)
    for name, content in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    with open(os.path.join(directory, RANDOM_WEIGHTS_MARKER), "w", encoding="utf-8") as f:
        f.write("The weights in this directory are random (built by `python -m idefics2_jax demo`): answers are "
                "noise. It exists to run the whole pipeline without downloading a model.\n")
    return directory


def write_demo_image(path: str) -> str:
    """A synthetic 640x480 picture (sky, sun, hills) so the demo needs no image file."""
    import numpy as np
    from PIL import Image

    h, w = 480, 640
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float32)
    img[...] = np.stack([0.35 + 0.3 * y / h, 0.6 + 0.2 * y / h, np.full_like(y, 0.95, dtype=np.float32)], -1)
    sun = (x - 480) ** 2 + (y - 110) ** 2 < 55 ** 2
    img[sun] = (1.0, 0.85, 0.2)
    hill = y > 330 + 40 * np.sin(x / 70.0)
    img[hill] = np.stack([0.2 + 0.1 * np.sin(x / 13.0), 0.55 + 0.1 * np.cos(y / 17.0), 0.2 + 0 * x], -1)[hill]
    Image.fromarray((img * 255).clip(0, 255).astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------------- generate
def _check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise CliError(f"model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{path} is not an Idefics2 checkpoint: it has no config.json")
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.isfile(os.path.join(path, name)):
            return
    raise CliError(f"{path} has no tokenizer (tokenizer.model or tokenizer.json): the chat prompt cannot be built")


def _open_images(paths):
    images = []
    for p in paths:
        try:
            images.append(load_image_file(p))
        except (ValueError, OSError) as e:
            raise CliError(f"cannot read image {p}: {e}") from None
    return images


class _TimedStreamer:
    """Wraps the text streamer and records when the first and the last new tokens arrived."""

    def __init__(self, inner):
        self.inner = inner
        self.prompt = True
        self.first = self.last = None
        self.count = 0

    def put(self, value):
        if not self.prompt:
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.count += 1
        self.prompt = False
        self.inner.put(value)

    def end(self):
        self.inner.end()


def run_generate(args) -> int:
    model_dir = os.path.expanduser(args.model)
    _check_model_dir(model_dir)
    random_weights = os.path.isfile(os.path.join(model_dir, RANDOM_WEIGHTS_MARKER))
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        config = Idefics2Config.from_pretrained(model_dir)
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except (ValueError, OSError, NotImplementedError) as e:  # invalid JSON, another model_type, ...
        raise CliError(f"cannot read the configs in {model_dir}: {e}") from None
    try:  # the checks `generate` makes, before anything heavy is loaded
        check_options(config, generation_config, do_sample=args.sample, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    except ValueError as e:
        raise CliError(f"invalid sampling option: {e}") from None
    images = _open_images(args.image or [])

    try:
        processor = Idefics2Processor.from_pretrained(model_dir)
    except (ValueError, OSError) as e:
        raise CliError(f"cannot load the processor from {model_dir}: {e}") from None
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, images=images or None, return_tensors="np")

    n_prompt = inputs["input_ids"].shape[1]
    limit = args.max_length or config.text_config.max_position_embeddings
    if n_prompt + args.max_new_tokens > limit:
        n_image = int((inputs["input_ids"] == config.image_token_id).sum())
        raise CliError(
            f"the prompt does not fit: {n_prompt} tokens ({n_image} of them for {len(images)} image(s)) + "
            f"--max-new-tokens {args.max_new_tokens} = {n_prompt + args.max_new_tokens} > {limit} positions "
            f"({'--max-length' if args.max_length else 'the model maximum, max_position_embeddings'}); "
            "shorten the prompt, use fewer or smaller images, or lower --max-new-tokens")

    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache if args.compilation_cache != "default" else None)
    if random_weights:
        print("note: this checkpoint has RANDOM weights (built for the demo): the answer below is noise",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        model, params = load_model(model_dir, dtype=args.dtype)
    except (ValueError, OSError, KeyError) as e:
        raise CliError(f"cannot load the model from {model_dir}: {e}") from None
    t_load = time.perf_counter() - t0
    streamer = _TimedStreamer(TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                           file=sys.stdout))
    t0 = time.perf_counter()
    out = generate(
        model, params, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
        inputs.get("pixel_attention_mask"), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, streamer=streamer,
        stream_every=args.stream_every, compilation_cache=False)
    t_total = time.perf_counter() - t0
    if args.timing:
        n_new = streamer.count
        decode = (streamer.last - streamer.first) if n_new > 1 else 0.0
        rate = f"{(n_new - 1) / decode:.1f} tokens/s" if decode > 0 else "n/a"
        print(f"timing: load {t_load:.2f} s, prompt {n_prompt} tokens, first token after "
              f"{streamer.first - t0:.2f} s (compilation included on a first run), {n_new} new tokens, "
              f"decode {rate}, total {t_total:.2f} s", file=sys.stderr)
    if args.print_ids:
        print("ids: " + " ".join(str(int(i)) for i in out[0, n_prompt:]), file=sys.stderr)
    return 0


def run_demo(args) -> int:
    directory = os.path.expanduser(args.dir)
    if args.rebuild or not os.path.isfile(os.path.join(directory, "config.json")):
        print(f"building a tiny random-weight Idefics2 checkpoint in {directory} (no download; the weights are "
              "random, so answers are noise)", file=sys.stderr, flush=True)
        build_tiny_random_checkpoint(directory)
    if args.build_only:
        print(directory)
        return 0
    image = args.image or [write_demo_image(os.path.join(directory, "demo.png"))]
    gen_args = argparse.Namespace(
        model=directory, image=image, prompt=args.prompt, max_new_tokens=args.max_new_tokens, sample=args.sample,
        temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=args.seed, dtype=None,
        max_length=None, stream_every=None, compilation_cache=args.compilation_cache, timing=args.timing,
        print_ids=False)
    return run_generate(gen_args)


class _NullStreamer:
    def put(self, value):
        pass

    def end(self):
        pass


def run_bench(args) -> int:
    """Decode throughput of the compiled loop, without a streamer and with one (what streaming costs)."""
    import numpy as np

    model_dir = os.path.expanduser(args.model)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CliError(f"model directory not found or without config.json: {model_dir}")

    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache if args.compilation_cache != "default" else None)
    model, params = load_model(model_dir, dtype=args.dtype)
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.ones((args.batch, 1), np.int64),
                          rng.integers(3, min(32000, model.config.image_token_id - 1),
                                       (args.batch, args.prompt_len - 1))], axis=1)
    modes = [("no streamer", None, None), ("streamer, adaptive chunks", _NullStreamer, None),
             ("streamer, 1 token per call", _NullStreamer, 1)]

    def timed(n, streamer, every):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            generate(model, params, ids, max_new_tokens=n, eos_token_id=[], streamer=streamer and streamer(),
                     stream_every=every, compilation_cache=False)
            best = min(best, time.perf_counter() - t0)
        return best

    print(f"model {model_dir} ({model.dtype.__name__ if hasattr(model.dtype, '__name__') else model.dtype}), "
          f"batch {args.batch}, prompt {args.prompt_len}, new {args.new_tokens}, best of {args.repeat}, "
          f"{jax_device()}")
    base = None
    for name, streamer, every in modes:
        timed(1, streamer, every), timed(args.new_tokens, streamer, every)  # compile
        t1, tn = timed(1, streamer, every), timed(args.new_tokens, streamer, every)
        rate = args.batch * (args.new_tokens - 1) / max(tn - t1, 1e-9)
        base = base or rate
        print(f"  {name:28s} {rate:10.1f} tokens/s  ({(base / rate - 1) * 100:+.1f}% time vs no streamer; "
              f"prefill + first token {t1 * 1e3:.1f} ms)")
    return 0


def run_finetune(args) -> int:
    try:
        result = finetune_command.run(args)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, NotImplementedError, OSError) as e:
        raise CliError(str(e)) from None
    finetune_command.report(result, os.path.expanduser(args.output))
    return 0


def jax_device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


# ------------------------------------------------------------------------------------------------------ main
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--timing", action="store_true", help="print load / first-token / decode timings to stderr")
    p.add_argument("--compilation-cache", default="default", metavar="DIR",
                   help="persistent XLA compilation cache directory ('' to disable; default "
                        "$IDEFICS2_JAX_COMPILATION_CACHE or ~/.cache/idefics2_jax/jax_compilation_cache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m idefics2_jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images, streaming the answer to stdout")
    g.add_argument("--model", required=True, help="checkpoint directory (HF layout or converted)")
    g.add_argument("--image", action="append", metavar="PATH", help="an image file (repeat for several)")
    g.add_argument("--prompt", required=True, help="the user message")
    _add_common(g)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="with --sample (default: the checkpoint's, else 50)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    g.add_argument("--max-length", type=int, default=None,
                   help="limit on prompt + new tokens (default: the model's max_position_embeddings)")
    g.add_argument("--stream-every", type=int, default=None,
                   help="tokens per compiled call while streaming (default: adaptive, ~20 updates/s)")
    g.add_argument("--print-ids", action="store_true", help="print the new token ids to stderr")
    g.set_defaults(func=run_generate)

    d = sub.add_parser("demo", help="build a tiny random-weight checkpoint (no torch, no download) and run generate")
    d.add_argument("--dir", default=DEFAULT_DEMO_DIR, help=f"where to build it (default {DEFAULT_DEMO_DIR})")
    d.add_argument("--image", action="append", metavar="PATH", help="an image (default: a synthetic picture)")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint even if it exists")
    d.add_argument("--build-only", action="store_true", help="only build the checkpoint and print its directory")
    _add_common(d)
    d.set_defaults(func=run_demo, max_new_tokens=24)

    b = sub.add_parser("bench", help="decode tokens/s of the compiled loop, with and without a streamer")
    b.add_argument("--model", required=True, help="checkpoint directory")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=256)
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    b.add_argument("--compilation-cache", default="default", metavar="DIR")
    b.set_defaults(func=run_bench)

    f = sub.add_parser("finetune", help="LoRA (PEFT adapter) or full fine-tuning on a JSONL of TRL-format chats")
    finetune_command.add_arguments(f)
    f.set_defaults(func=run_finetune)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "compilation_cache", None) == "":
        args.compilation_cache = None
    try:
        return args.func(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
