"""`python -m convert`: checkpoint conversion CLI (see --help)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time

from tqdm import tqdm

from idefics2_jax.ckpt.convert import ConversionError, convert_hf_to_orbax, plan_conversion
from idefics2_jax.ckpt.orbax import is_orbax_dir
from idefics2_jax.loading import export_hf

DESCRIPTION = """\
Convert an Idefics2 checkpoint between formats.

  python -m convert --from hf SRC DST [--dtype float32|bfloat16|float16] [--quantize int8|int4|int4:G] [--overwrite]
  python -m convert --from orbax|hf --to hf SRC DST [--adapter PEFT_DIR] [--dtype ...] [--overwrite]

--from hf: SRC is a local Hugging Face directory (config.json plus model.safetensors, or shards with
model.safetensors.index.json). DST becomes a self-contained directory: the weights as an Orbax checkpoint in
Flax layout (DST/params), config.json, generation_config.json, the tokenizer and the processor / preprocessor
configs (chat template included) copied from SRC. Load it with idefics2_jax.load_model(DST, dtype=, mesh=) and
Idefics2Processor.from_pretrained(DST).

Tensors are read one at a time and written in slabs of at most 32 MiB, cast to --dtype on the way, so memory
stays around half a GiB whatever the size of the model. The output is written to a temporary directory beside DST
and renamed at the end: if the conversion fails or is interrupted (Ctrl-C, SIGTERM) the temporary directory is
removed and DST is as it was (absent, or the previous one with --overwrite). A run killed with SIGKILL leaves its
temporary directory, which the next conversion to the same DST removes.

--to hf: DST becomes a Hugging Face directory that transformers loads (safetensors, config.json,
generation_config.json, the processor files of SRC); with --adapter a PEFT LoRA adapter is merged in (W + scale * A B
in float32, modules_to_save from the adapter). The params are held in memory once (not streamed) while DST is
written beside itself and renamed into place.

Exit status: 0 success, 1 bad input or destination (one line on stderr naming the file or tensor),
130 / 143 interrupted by SIGINT / SIGTERM.
"""


class _Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source_format", required=True, choices=["hf", "orbax"],
                   help="format of SRC: 'hf' = Hugging Face safetensors directory, 'orbax' = converted by this tool")
    p.add_argument("--to", dest="target_format", default="orbax", choices=["orbax", "hf"],
                   help="format of DST (default: orbax, the self-contained idefics2-jax directory)")
    p.add_argument("--quantize", metavar="SCHEME", default=None,
                   help="with --to orbax: write the decoder and connector kernels as int8 / int4 / int4:GROUP "
                        "(weight-only; vision, embeddings and lm_head stay in --dtype)")
    p.add_argument("--adapter", metavar="PEFT_DIR", default=None,
                   help="with --to hf: merge this PEFT LoRA adapter into the exported weights")
    p.add_argument("src", metavar="SRC", help="source checkpoint directory")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype to store the params in (default: the source's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once the new one is "
                                                            "complete)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress on stderr (the one-line summary is still printed on stdout)")
    return p


class Progress:
    """A tqdm bar on stderr counting tensors, with bytes and throughput (redrawn on a terminal, a line every few
    seconds otherwise). Called from Orbax's writer thread after each tensor is on disk."""

    def __init__(self, total_tensors: int, total_bytes: int, stream=None):
        stream = stream or sys.stderr  # looked up now: a caller may have redirected sys.stderr since import
        self.total_bytes, self.bytes = total_bytes, 0
        self.lock = threading.Lock()
        self.bar = tqdm(total=total_tensors, file=stream, mininterval=0.2 if stream.isatty() else 5.0,
                        bar_format="[{n_fmt}/{total_fmt} tensors] {postfix} {bar:20} {elapsed}<{remaining}",
                        dynamic_ncols=True)
        self.start = time.monotonic()

    def __call__(self, leaf) -> None:
        with self.lock:
            self.bytes += leaf.source_nbytes or leaf.nbytes
            rate = self.bytes / 1e6 / max(time.monotonic() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB ({rate:.0f} MB/s) "
                                     f"{leaf.name}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _signals_raise():
    """SIGINT and SIGTERM (a scheduler, `timeout`, a notebook's stop button) raise `_Interrupted` in the main
    thread, so both take the same cleanup path; the previous handlers are restored afterwards."""

    def on_signal(signum, frame):
        raise _Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Orbax logs through absl / `logging`, including a traceback per writer thread when a save is cancelled; a
    # failure that matters reaches the main thread as an exception anyway, so the CLI shows only its own lines.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    with _signals_raise():
        return _run(args)


def _export(args) -> int:
    if args.source_format == "orbax" and not is_orbax_dir(args.src):
        raise ValueError(f"{args.src} is not a converted (Orbax) checkpoint; use --from hf for an HF directory")
    if args.source_format == "hf" and is_orbax_dir(args.src):
        raise ValueError(f"{args.src} is a converted (Orbax) checkpoint; use --from orbax")
    bar = []

    def on_start(n_tensors, total_bytes):
        if not args.quiet:
            print(f"exporting {os.path.abspath(args.src)} ({n_tensors} tensors, {total_bytes / 1e9:.2f} GB) -> "
                  f"{os.path.abspath(args.dst)} (HF safetensors)", file=sys.stderr, flush=True)
            bar.append(Progress(n_tensors, total_bytes))

    try:
        files = export_hf(args.src, args.dst, adapter=args.adapter, dtype=args.dtype, overwrite=args.overwrite,
                          on_start=on_start, on_leaf=lambda leaf: bar and bar[0](leaf))
    finally:
        if bar:
            bar[0].close()
    merged = f", adapter {args.adapter} merged" if args.adapter else ""
    print(f"wrote {os.path.abspath(args.dst)} ({len(files)} files, HF layout{merged})", flush=True)
    return 0


def _run(args) -> int:
    if args.target_format == "hf" and args.quantize is not None:
        print("convert: error: --quantize writes a quantized Orbax checkpoint; it does not combine with --to hf",
              file=sys.stderr)
        return 1
    if args.target_format != "hf" and (args.adapter is not None or args.source_format != "hf"):
        print("convert: error: --adapter and --from orbax need --to hf (the Orbax output is made from an HF "
              "source, without merging)", file=sys.stderr)
        return 1
    progress = None
    try:
        if args.target_format == "hf":
            return _export(args)
        plan = plan_conversion(args.src, args.dtype, args.quantize)
        if not args.quiet:
            print(f"converting {plan.src} ({len(plan.leaves)} tensors, {plan.source_bytes / 1e9:.2f} GB "
                  f"{plan.source_dtype.name}) -> {os.path.abspath(args.dst)} as {plan.dtype.name}",
                  file=sys.stderr, flush=True)
            progress = Progress(len(plan.leaves), plan.source_bytes)
        try:
            summary = convert_hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                          on_leaf=progress, plan=plan)
        finally:
            if progress is not None:
                progress.close()
    except (ConversionError, ValueError, FileExistsError, FileNotFoundError, NotImplementedError) as e:
        print(f"convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except _Interrupted as e:
        print(f"\nconvert: interrupted by {e}; the partial output was removed", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\nconvert: interrupted; the partial output was removed", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as e:
        if e.errno is not None and e.filename is not None:  # disk full, permissions: the environment, not a bug
            print(f"convert: error: {e.filename}: {e.strerror}", file=sys.stderr)
            return 1
        raise
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
