"""Shared benchmark helpers: model sizes, identical random weights for both implementations, timing, the
memory-bandwidth probe and peak-memory measurement.

Sizes (HF config dicts, so transformers and idefics2-jax read the very same config.json):
  tiny   the test suite's 2-layer model (tests/reference.py);
  small  ~75 M parameters in Idefics2's proportions (text 512 wide, 8 layers, 8 heads / 2 KV heads, MLP 1792;
         vision 192 wide, 4 layers; perceiver 64 latents, depth 3), real vocabulary and 70 x 70 position grid;
  8b     the real geometry (tests/data/idefics2-8b.config.json), for an accelerator.

tiny / small are written once as fp32 safetensors checkpoints (with a processor: the Mistral tokenizer from
mistral-common and the hub's preprocessor config) under $IDEFICS2_BENCH_CACHE (default /tmp/idefics2_jax_bench).
8b is never written: the torch model is built directly on the device in bf16 and its state dict is converted in
memory (`build_8b`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CACHE_ENV = "IDEFICS2_BENCH_CACHE"
FORMAT = 2  # bump to rebuild cached checkpoints
SIZES = ("tiny", "small", "8b")
PHOTO = "astronaut.png"  # 512 x 512, from scikit-image's wheel


# ------------------------------------------------------------------------------------------------- platform
def setup_platform(device: str, threads: int | None = None) -> None:
    """Call before importing jax / torch. device: "cpu" or "gpu"."""
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    else:
        # torch and JAX share the GPU in one process: JAX must not grab 75% of it up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


def versions() -> dict:
    import platform

    out = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.processor() or
           platform.machine()}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    try:
        import jax

        out["jax_device"] = str(jax.devices()[0].device_kind)
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            out["torch_device"] = torch.cuda.get_device_name()
    except Exception:
        pass
    return out


# ---------------------------------------------------------------------------------------------------- sizes
def config_dict(size: str) -> dict:
    if size == "tiny":
        import reference

        return reference.tiny_config_dict()
    if size == "small":
        text = dict(model_type="mistral", vocab_size=32003, hidden_size=512, intermediate_size=1792,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
                    rms_norm_eps=1e-5, sliding_window=4096, pad_token_id=0, rope_theta=10000.0)
        return dict(
            model_type="idefics2", image_token_id=32001, tie_word_embeddings=False,
            vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                               patch_size=14, image_size=980),
            perceiver_config=dict(hidden_size=512, rms_norm_eps=1e-6, resampler_n_latents=64, resampler_depth=3,
                                  resampler_n_heads=8, resampler_head_dim=32, num_key_value_heads=2),
            text_config=text,
        )
    if size == "8b":
        with open(os.path.join(TESTS, "data", "idefics2-8b.config.json"), encoding="utf-8") as f:
            return json.load(f)
    raise ValueError(f"size {size!r}: choose from {SIZES}")


def hf_config(size: str):
    import transformers

    d = config_dict(size)
    return transformers.Idefics2Config(**{k: v for k, v in d.items() if k != "model_type"})


def _cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "idefics2_jax_bench")


def _key(size: str) -> str:
    blob = json.dumps(config_dict(size), sort_keys=True).encode()
    return f"{size}-v{FORMAT}-{hashlib.sha1(blob).hexdigest()[:10]}"


def write_processor_files(directory: str, size: str) -> None:
    """tokenizer.model (Mistral-7B v0.1, shipped in mistral-common) + the hub's processor configs, with
    image_seq_len = the model's latents (64 except for tiny)."""
    import preprocessing_fixtures

    preprocessing_fixtures.write_reference_dir(directory)
    latents = config_dict(size).get("perceiver_config", {}).get("resampler_n_latents", 64)
    file = os.path.join(directory, "processor_config.json")
    with open(file, encoding="utf-8") as f:
        processor_config = json.load(f)
    processor_config["image_seq_len"] = latents
    with open(file, "w", encoding="utf-8") as f:
        json.dump(processor_config, f, indent=2)


def checkpoint_dir(size: str) -> str:
    """An fp32 HF checkpoint (config.json + model.safetensors + processor files) of `size`, built once."""
    if size == "8b":
        raise ValueError("8b is built in memory on the device (build_8b), never written")
    path = os.path.join(_cache_root(), _key(size))
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch

    os.makedirs(_cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=_cache_root(), prefix=".build-")
    model = build_torch(size, "cpu", torch.float32)
    model.save_pretrained(tmp)
    write_processor_files(tmp, size)
    try:
        os.rename(tmp, path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def processor_dir(size: str) -> str:
    """A directory with the processor files and config.json (no weights needed: 8b)."""
    if size != "8b":
        return checkpoint_dir(size)
    path = os.path.join(_cache_root(), _key(size) + "-processor")
    if not os.path.isfile(os.path.join(path, "config.json")):
        os.makedirs(path, exist_ok=True)
        write_processor_files(path, size)
        hf_config(size).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------- weights
def randomize_(model, seed: int = 0) -> None:
    """tests/reference.py's O(1) random weights (so logits are not all near-ties), drawn on the params' device."""
    import torch

    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if name.endswith("latents") or "embed_tokens" in name or "position_embedding" in name:
                p.copy_(r)
            elif p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.1 * r)
            else:
                p.copy_(r / math.sqrt(int(np.prod(p.shape[1:]))))
            del r


def build_torch(size: str, device: str = "cpu", dtype=None, attn: str = "sdpa", seed: int = 0):
    """transformers' model with random O(1) weights, built directly on `device` ("cpu"/"cuda") in `dtype`."""
    import torch
    import transformers

    dtype = dtype or torch.float32
    config = hf_config(size)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.Idefics2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    randomize_(model, seed)
    return model


def load_hf(size: str, device: str, dtype: str):
    """transformers model (sdpa) from the checkpoint of `size` (8b: built on the device)."""
    import torch
    import transformers

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if size == "8b":
        return build_torch(size, torch_device(device), tdtype)
    model = transformers.Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint_dir(size), attn_implementation="sdpa", dtype=tdtype)
    return model.to(torch_device(device)).eval()


def params_from_torch(model, config, dtype):
    """Convert a transformers state dict in memory (one tensor at a time) with the project's weight table."""
    import jax.numpy as jnp
    import ml_dtypes
    import torch
    from flax.traverse_util import unflatten_dict

    from idefics2_jax.ckpt.table import checkpoint_entries, to_flax

    state = model.state_dict()
    flat = {}
    for key, entry in checkpoint_entries(config).items():
        t = state[key].detach()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
        else:
            arr = t.float().cpu().numpy()
        flat[entry.path] = jnp.asarray(to_flax(arr, entry.transform), dtype=dtype)
        del arr
    return unflatten_dict(flat)


def load_ours(size: str, dtype: str, attention_impl: str | None = None, torch_model=None):
    """(model, params) for idefics2-jax. 8b: converted from `torch_model` in memory."""
    import jax.numpy as jnp

    from idefics2_jax import Idefics2Config, Idefics2ForConditionalGeneration, load_model

    if size != "8b":
        return load_model(checkpoint_dir(size), dtype=dtype, attention_impl=attention_impl)
    if torch_model is None:
        import torch

        torch_model = build_torch(size, "cuda", torch.bfloat16)
    config = Idefics2Config.from_dict(config_dict(size))
    jdtype = jnp.dtype(dtype)
    params = params_from_torch(torch_model, config, jdtype)
    return Idefics2ForConditionalGeneration(config, dtype=jdtype, attention_impl=attention_impl), params


def count_params(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def decode_weight_bytes(params) -> int:
    """Bytes of weights one decode step must read: the text decoder's layers, final norm and lm_head (the
    embedding lookup reads one row; the vision tower and connector do not run)."""
    import jax

    text = params["text_model"]
    n = 0
    for name, sub in text.items():
        leaves = jax.tree_util.tree_leaves(sub)
        if name == "embed_tokens":
            n += sum(x.shape[-1] * x.dtype.itemsize for x in leaves)
        else:
            n += sum(x.size * x.dtype.itemsize for x in leaves)
    if "lm_head" in params:
        n += sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params["lm_head"]))
    else:  # tied: the whole embedding is read by the logits matmul
        n += sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(text["embed_tokens"]))
    return int(n)


def kv_bytes_per_position(config, dtype_bytes: int) -> int:
    t = config.text_config
    return t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * dtype_bytes


# ------------------------------------------------------------------------------------------------- timing
def sync(x):
    """Block until JAX / torch work behind `x` is done (numpy results are already synchronous)."""
    if "jax" in sys.modules:
        sys.modules["jax"].block_until_ready(x)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def interleaved(fns: dict[str, Callable], repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call for each fn: `warmup` untimed calls each, then `repeats` rounds, one call of each fn per
    round (so machine noise hits every implementation alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            sync(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------------------- memory bandwidth
def memory_bandwidth(dtype: str = "float32", nbytes: float = 512e6, repeats: int = 10) -> dict:
    """Bytes/s of a jitted matrix-vector product y = W x with W of `nbytes` (>> the caches) in `dtype`: the
    bound a batch-1 decode step (which reads every weight once) can reach. Also torch's, for reference."""
    import jax
    import jax.numpy as jnp

    jdtype = jnp.dtype(dtype)
    cols = 4096
    rows = max(1, int(nbytes // (cols * jdtype.itemsize)))
    w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32).astype(jdtype)
    x = jnp.ones((cols,), jdtype)
    matvec = jax.jit(lambda w, x: w @ x)
    size = rows * cols * jdtype.itemsize
    fns = {"jax": lambda: matvec(w, x)}
    try:
        import torch

        tw = torch.from_numpy(np.array(w.astype(jnp.float32))).to(
            {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
        if jax.devices()[0].platform == "gpu" and torch.cuda.is_available():
            tw = tw.cuda()
        tx = torch.ones(cols, dtype=tw.dtype, device=tw.device)
        fns["torch"] = lambda: torch.mv(tw, tx)
    except Exception:
        pass
    times = interleaved(fns, repeats=repeats, warmup=2)
    out = {f"{k}_GBps": size / median(v) / 1e9 for k, v in times.items()}
    out["bytes"] = size
    out["dtype"] = dtype
    out["GBps"] = max(v for k, v in out.items() if k.endswith("_GBps"))
    return out


# ------------------------------------------------------------------------------------------ peak memory
# Linux carries a process's peak RSS across fork + exec (exec keeps the larger of the old and new address spaces'
# high-water marks), so a child forked straight from a benchmark that holds a model would report at least the
# benchmark's own RSS. A small launcher in a fresh interpreter spawns the measured command instead.
_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
               "seconds": time.perf_counter() - start}, f)
"""


def measure_process(cmd: list[str], env: dict | None = None, capture: bool = False) -> dict:
    """Run `cmd` (argv[0] a path) as a fresh process through the launcher: {"rc", "peak_rss_bytes", "seconds",
    "stdout" (when `capture`, else it goes to ours)}."""
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, out.name, *cmd], cwd=ROOT,
                              env={**os.environ, **(env or {})}, stdout=subprocess.PIPE if capture else None,
                              check=True)
        with open(out.name, encoding="utf-8") as f:
            result = json.load(f)
    return {"rc": result["rc"], "peak_rss_bytes": result["maxrss_kib"] * 1024, "seconds": result["seconds"],
            "stdout": proc.stdout.decode(errors="replace") if capture else None}


def run_child(argv: list[str], env: dict | None = None) -> tuple[int, float, str]:
    """Run a fresh Python process; returns (exit code, its peak RSS in MiB, its stdout)."""
    r = measure_process([sys.executable, *argv], env=env, capture=True)
    return r["rc"], r["peak_rss_bytes"] / 2**20, r["stdout"]


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON result in child output:\n{text[-2000:]}")


def gpu_peak_bytes(impl: str) -> float | None:
    try:
        if impl == "hf":
            import torch

            return float(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------- inputs
def photo(name: str = PHOTO, longest_edge: int | None = None):
    import skimage
    from PIL import Image

    image = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name)).convert("RGB")
    image.load()
    if longest_edge is not None:
        w, h = image.size
        s = longest_edge / max(w, h)
        image = image.resize((round(w * s), round(h * s)), Image.BICUBIC)
    return image


def text_prompts(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Random ordinary token ids [batch, length] starting with BOS (no image or special tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 32000, (batch, length))
    ids[:, 0] = 1
    return ids.astype(np.int64)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c) for c in r]
                        for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
