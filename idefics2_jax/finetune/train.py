"""Training: optax AdamW on LoRA adapters (or on every parameter), gradient accumulation, Orbax train checkpoints.

    trainer = Trainer(model, params, TrainConfig(steps=100), lora_config)      # lora_config=None: full training
    history = trainer.fit(processor, examples, "out/")                           # writes out/checkpoints/<step>

What is trained is `trainable` (float32): the adapters (the "lora" collection, with the modules_to_save copies), or
with full training a float32 master copy of the params, cast to the model's dtype in the forward pass. Frozen
weights keep their dtype (bfloat16 base, float32 adapters and optimizer state).

The loss of a step is the token-weighted mean over all its micro-batches (summed NLL / labelled tokens, as
transformers' `num_items_in_batch`), so gradient accumulation, batch size and data-parallel shards only change how
the same sum is computed. HF Trainer's defaults: AdamW (0.9, 0.999, eps 1e-8), weight decay on everything but
biases and norm scales, gradient clipping by global norm before the update, linear warm-up from 0.

The data order is a pure function of (seed, example count, position): example `p` of the stream is
`permutation(seed, epoch = p // n)[p % n]`, and step `s` uses positions `[s * B * A, (s + 1) * B * A)`. A resumed
run therefore sees the same batches (and the same dropout keys, `fold_in(seed, step)`) as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ..ckpt.placement import shard_params
from ..nn.model import IGNORE_INDEX, causal_lm_nll, token_nll, validate_inputs
from ..nn.partitioning import shard_batch, use_mesh
from .checkpoint import TrainCheckpoints
from .data import collate
from .lora import LoraConfig, merge
from .lora import init as lora_init

SCHEDULES = ("linear", "cosine", "constant")
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
STATE_FILE = "trainer_state.json"


# With remat the loss runs over chunks of this many positions, each chunk's logits recomputed in the backward pass:
# the [batch, length, vocab] float32 logits (and their log-softmax and gradient) never exist at once.
LOSS_CHUNK = 32


def chunked_nll(model, variables, hidden, labels, chunk: int = LOSS_CHUNK):
    """`causal_lm_nll` of `model.logits(hidden)` computed chunk by chunk (lax.map of a rematerialised chunk):
    the same sums, with one chunk's logits alive at a time in the forward and the backward pass."""
    h, y = hidden[:, :-1], labels[:, 1:]
    b, t, d = h.shape
    n = -(-t // chunk)
    h = jnp.pad(h, ((0, 0), (0, n * chunk - t), (0, 0)))
    y = jnp.pad(y, ((0, 0), (0, n * chunk - t)), constant_values=IGNORE_INDEX)
    h = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    y = y.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def piece(args):
        h_c, y_c = args
        return token_nll(model.apply(variables, h_c, method="logits"), y_c)

    sums, counts = jax.lax.map(piece, (h, y))
    return jnp.sum(sums), jnp.sum(counts)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps; or
    epochs: float | None = None  # passes over the data (rounded up to whole steps)
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int | None = None
    pad_to_multiple_of: int | None = 64  # fewer distinct lengths, fewer compilations
    save_every: int | None = None
    do_image_splitting: bool | None = None

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("Give exactly one of steps and epochs.")
        for name in ("steps", "batch_size", "grad_accum", "save_every", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}.")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive (or None), got {self.max_grad_norm!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_examples / self.examples_per_step))


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """HF's schedules: linear warm-up 0 -> lr over warmup_steps, then linear / cosine decay to 0 at total_steps,
    or constant."""
    decay = max(total_steps - config.warmup_steps, 1)
    main = {"constant": optax.constant_schedule(config.lr),
            "linear": optax.linear_schedule(config.lr, 0.0, decay),
            "cosine": optax.cosine_decay_schedule(config.lr, decay)}[config.schedule]
    if not config.warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, config.warmup_steps), main],
                                [config.warmup_steps])


def _decay_mask(tree):
    """Weight decay on matrices and LoRA factors; not on biases, norm scales (as HF Trainer) or scalars."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: np.ndim(x) >= 2 and getattr(path[-1], "key", None) not in ("bias", "scale"), tree)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [] if config.max_grad_norm is None else [optax.clip_by_global_norm(config.max_grad_norm)]
    parts.append(optax.adamw(make_schedule(config, total_steps), b1=0.9, b2=0.999, eps=1e-8,
                             weight_decay=config.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Examples at stream positions [start, start + count): a fresh permutation of the n examples per epoch."""
    out, cache = [], {}
    for p in range(start, start + count):
        epoch = p // n
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(cache[epoch][p % n]))
    return out


def _float32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


class Trainer:
    """One jitted gradient function per batch shape (the length is bucketed by `pad_to_multiple_of`) and one
    jitted update. On a mesh, frozen params (and full-training params) are placed by the logical-axis rules,
    adapters replicated, batches split over ("data", "fsdp")."""

    def __init__(self, model, params, config: TrainConfig, lora_config: LoraConfig | None = None, *,
                 mesh=None, rules=None, total_steps: int | None = None):
        self.model, self.config, self.lora_config = model, config, lora_config
        self.full = lora_config is None
        self.mesh, self.rules = mesh, rules
        self.total_steps = total_steps
        if mesh is not None:
            params = shard_params(params, mesh, rules)
        self.params = params
        self.dropout = (not self.full) and lora_config.lora_dropout > 0
        self.optimizer = None
        self._grad = jax.jit(jax.value_and_grad(self._loss, has_aux=True))
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
        self._update = jax.jit(self._apply, donate_argnums=(0, 1))
        self._eval = jax.jit(self._loss)

    # ------------------------------------------------------------------------------------------- state
    def init_state(self, n_examples: int) -> dict:
        """{"step", "trainable", "opt_state"} for a new run (the optimizer needs the run's length for its schedule)."""
        total = self.total_steps or self.config.total_steps(n_examples)
        self.total_steps = total
        self.optimizer = make_optimizer(self.config, total)
        if self.full:
            trainable = _float32(self.params)
        else:
            trainable = lora_init(self.model, self.params, self.lora_config, jax.random.key(self.config.seed))
            if self.mesh is not None:
                replicated = NamedSharding(self.mesh, PartitionSpec())
                trainable = jax.tree.map(lambda x: jax.device_put(x, replicated), trainable)
        with self._context():
            opt_state = jax.jit(self.optimizer.init)(trainable)
        return {"step": 0, "trainable": trainable, "opt_state": opt_state}

    def _context(self):
        return use_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    # -------------------------------------------------------------------------------------------- math
    def variables(self, trainable, params=None) -> dict:
        params = self.params if params is None else params
        if self.full:
            return {"params": jax.tree.map(lambda t, p: t.astype(p.dtype), trainable, params)}
        return {"params": params, "lora": trainable}

    def _loss(self, trainable, params, batch, key):
        variables = self.variables(trainable, params)
        rngs = {"dropout": key} if self.dropout else {}
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if not self.model.remat:
            return causal_lm_nll(self.model.apply(variables, **inputs, rngs=rngs).logits, batch["labels"])
        hidden = self.model.apply(variables, **inputs, rngs=rngs, return_hidden=True).hidden_states
        return chunked_nll(self.model, variables, hidden, batch["labels"], LOSS_CHUNK)

    def _apply(self, trainable, opt_state, grads, count):
        grads = jax.tree.map(lambda g: g / count, grads)
        norm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, norm

    def _place(self, batch):
        batch = {k: np.asarray(v) for k, v in batch.items()}
        # The model's input checks only run on concrete values: run them here, not silently inside jit.
        validate_inputs(self.model.config, batch["input_ids"], batch.get("attention_mask"),
                        batch.get("pixel_values"), batch.get("pixel_attention_mask"))
        return shard_batch(batch, self.mesh, self.rules) if self.mesh is not None else batch

    def step(self, state: dict, microbatches: Sequence[dict]) -> tuple[dict, dict]:
        """One optimizer step over `microbatches` (collated). Returns (new state, metrics). A non-finite loss
        raises TrainingDiverged before anything is updated."""
        base = jax.random.fold_in(jax.random.key(self.config.seed), state["step"])
        total, count, grads = 0.0, 0, None
        with self._context():
            for m, batch in enumerate(microbatches):
                (s, c), g = self._grad(state["trainable"], self.params, self._place(batch), jax.random.fold_in(base, m))
                total, count = total + s, count + c
                grads = g if grads is None else self._add(grads, g)
            loss = float(total) / max(int(count), 1)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"the loss is {loss} at step {state['step'] + 1}")
            lr = float(make_schedule(self.config, self.total_steps)(state["step"]))
            trainable, opt_state, norm = self._update(state["trainable"], state["opt_state"], grads,
                                                      jnp.asarray(count, jnp.float32))
        return ({"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state},
                {"loss": loss, "learning_rate": lr, "grad_norm": float(norm), "tokens": int(count)})

    def evaluate(self, state: dict, batches) -> float:
        """Token-weighted mean loss over `batches` (no dropout)."""
        total, count = 0.0, 0
        with self._context():
            for batch in batches:
                s, c = self._eval(state["trainable"], self.params, self._place(batch), jax.random.key(0))
                total, count = total + float(s), count + int(c)
        return total / max(count, 1)

    def merged_params(self, state: dict):
        """Plain params with the training applied (LoRA merged; full: the float32 master cast back)."""
        if self.full:
            return self.variables(state["trainable"])["params"]
        return merge(self.params, state["trainable"], self.lora_config)

    # -------------------------------------------------------------------------------------------- loop
    def batches_for_step(self, processor, examples, step: int) -> list[dict]:
        cfg = self.config
        idx = stream_indices(len(examples), cfg.seed, step * cfg.examples_per_step, cfg.examples_per_step)
        return [collate(processor, [examples[i] for i in idx[k:k + cfg.batch_size]], cfg.max_length,
                        do_image_splitting=cfg.do_image_splitting, pad_to_multiple_of=cfg.pad_to_multiple_of)
                for k in range(0, len(idx), cfg.batch_size)]

    def fit(self, processor, examples: Sequence[dict], output_dir, *, eval_examples: Sequence[dict] | None = None,
            resume: bool = False, progress: bool = True, on_step: Callable | None = None,
            stop_after: int | None = None) -> dict:
        """Train to `total_steps`, checkpointing to `output_dir/checkpoints` every `save_every` steps and at the end.

        resume: continue from the newest checkpoint there (same seed, data, batch size and accumulation).
        Ctrl-C saves a checkpoint of the last finished step and returns (state["interrupted"] = True).
        stop_after: stop (with a checkpoint) after this many steps of this call (for tests and time-boxed jobs).
        Returns {"state", "history", "interrupted"}; `history` is also written to output_dir/trainer_state.json.
        """
        cfg = self.config
        state = self.init_state(len(examples))
        run = {"seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
               "examples": len(examples), "total_steps": self.total_steps, "full": self.full}
        checkpoints = TrainCheckpoints(os.path.join(os.fspath(output_dir), "checkpoints"))
        history: dict[str, Any] = {"log_history": [], **run}
        if resume:
            state, saved = checkpoints.restore(state, run)
            history["log_history"] = saved.get("log_history", [])
        elif checkpoints.latest() is not None:
            raise ValueError(f"{checkpoints.directory} already holds training checkpoints; pass resume=True "
                             "(--resume) to continue them, or use a new output directory.")
        eval_batches = None
        if eval_examples:
            eval_batches = [collate(processor, list(eval_examples[k:k + cfg.batch_size]), cfg.max_length,
                                    do_image_splitting=cfg.do_image_splitting,
                                    pad_to_multiple_of=cfg.pad_to_multiple_of)
                            for k in range(0, len(eval_examples), cfg.batch_size)]
        bar = _progress(self.total_steps, state["step"], progress)
        interrupted, done_here = False, 0
        last_saved = state["step"] if resume else None

        def save(state):
            nonlocal last_saved
            history["global_step"] = state["step"]
            checkpoints.save(state, {**run, "log_history": history["log_history"]})
            last_saved = state["step"]
            _write_json(os.path.join(os.fspath(output_dir), STATE_FILE), history)

        try:
            while state["step"] < self.total_steps and (stop_after is None or done_here < stop_after):
                started = time.perf_counter()
                batches = self.batches_for_step(processor, examples, state["step"])
                try:
                    state, metrics = self.step(state, batches)
                except TrainingDiverged as e:
                    where = (f"the last good checkpoint is step {last_saved} in {checkpoints.directory}"
                             if last_saved is not None else "no checkpoint was saved yet")
                    raise TrainingDiverged(f"{e}; stopped ({where}). Lower --lr or check the data.") from None
                seconds = time.perf_counter() - started
                real = sum(int(b["attention_mask"].sum()) for b in batches)
                record = {"step": state["step"], **metrics, "tokens_per_second": real / seconds,
                          "seconds": seconds}
                done_here += 1
                last = state["step"] == self.total_steps
                if eval_batches is not None and (last or (cfg.save_every and state["step"] % cfg.save_every == 0)):
                    record["eval_loss"] = self.evaluate(state, eval_batches)
                history["log_history"].append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{real / seconds:.0f}")
                if on_step is not None:
                    on_step(state, record)
                if cfg.save_every and state["step"] % cfg.save_every == 0 and not last:
                    save(state)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
        if last_saved != state["step"]:
            save(state)
        checkpoints.close()
        return {"state": state, "history": history, "interrupted": interrupted}


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="finetune", dynamic_ncols=True)


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
