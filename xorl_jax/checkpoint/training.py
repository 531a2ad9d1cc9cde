"""Training checkpoints with Orbax's CheckpointManager: params, optimizer state, counters and a JSON item (step,
data position, config, HF config). Orbax writes each step under a temporary name and renames it once complete, so a
crash mid-save never leaves a step that looks complete; `latest_step` only sees finished ones.

Layout: <output_dir>/checkpoints/<step>/{params, opt_state, meta}. `params` uses the same Orbax layout as
`checkpoint.orbax.save_params`, so `convert to-hf --checkpoint <output_dir>/checkpoints/<step>` reads it.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from xorl_jax.train_step import TrainState


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class TrainCheckpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> None:
        if step in (self.manager.all_steps() or []):
            return
        counters = {"step": state.step, "nonfinite_streak": state.nonfinite_streak,
                    "skipped_total": state.skipped_total}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave({"opt_state": state.opt_state, "counters": counters}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _locate(self, path: str):
        """(manager, step) for 'auto', a checkpoints directory, or one step directory; None if nothing is there."""
        if path == "auto":
            step = self.manager.latest_step()
            return (self.manager, step) if step is not None else None
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            return None
        base = os.path.basename(path.rstrip("/"))
        if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
            return ocp.CheckpointManager(os.path.dirname(path)), int(base)
        manager = ocp.CheckpointManager(path)
        step = manager.latest_step()
        return (manager, step) if step is not None else None

    def restore(self, path: str, like: TrainState):
        """(state, meta) restored onto the shardings of `like`, or None when no complete checkpoint exists."""
        found = self._locate(path)
        if found is None:
            return None
        manager, step = found
        counters = {"step": like.step, "nonfinite_streak": like.nonfinite_streak, "skipped_total": like.skipped_total}
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(like.params)),
                opt_state=ocp.args.StandardRestore(_abstract({"opt_state": like.opt_state, "counters": counters})),
                meta=ocp.args.JsonRestore(),
            ),
        )
        c = restored.opt_state["counters"]
        plain = TrainState(step=c["step"], params=restored.params, opt_state=restored.opt_state["opt_state"],
                           nonfinite_streak=c["nonfinite_streak"], skipped_total=c["skipped_total"])
        # Orbax may hand back plain tuples for optax's NamedTuples: rebuild the exact tree structure of `like`.
        leaves = jax.tree.leaves(plain)
        if len(leaves) != len(jax.tree.leaves(like)):
            raise ValueError(f"checkpoint step {step} does not match this run's model/optimizer (different tree)")
        state = jax.tree.unflatten(jax.tree.structure(like), leaves)
        return state, restored.meta
