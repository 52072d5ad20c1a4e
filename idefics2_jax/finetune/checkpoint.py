"""Train checkpoints with Orbax: trainable weights, optimizer state and step, plus the run's description (seed,
batch size, accumulation, example count: the data position and RNG follow from them and the step).

Orbax writes each step to a temporary directory and renames it when complete, so a checkpoint is either whole or
absent; the two newest are kept.
"""

from __future__ import annotations

import os

import jax
import numpy as np

KEEP = 2
_MUST_MATCH = ("seed", "batch_size", "grad_accum", "examples", "total_steps", "full")


class TrainCheckpoints:
    def __init__(self, directory: str, keep: int = KEEP):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: dict, meta: dict) -> None:
        ocp = self._ocp
        tree = {"trainable": state["trainable"], "opt_state": state["opt_state"],
                "step": np.asarray(state["step"], np.int64)}
        self._manager.save(state["step"], args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                                  meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, fresh: dict, run: dict) -> tuple[dict, dict]:
        """The newest checkpoint, restored into the structure (and shardings) of `fresh`; checks the run matches."""
        ocp = self._ocp
        step = self.latest()
        if step is None:
            raise ValueError(f"--resume: no training checkpoint in {self.directory}")
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        changed = {k: (meta.get(k), run[k]) for k in _MUST_MATCH if meta.get(k) != run[k]}
        if changed:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(f"--resume: the checkpoint in {self.directory} was made by a different run ({detail}); "
                             "resume with the same data, seed, batch size, accumulation and length.")
        target = {"trainable": fresh["trainable"], "opt_state": fresh["opt_state"],
                  "step": np.asarray(0, np.int64)}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        tree = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        return {"step": int(tree["step"]), "trainable": tree["trainable"], "opt_state": tree["opt_state"]}, meta

    def close(self) -> None:
        self._manager.close()
