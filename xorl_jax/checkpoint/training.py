"""Training checkpoints with Orbax's CheckpointManager: params, optimizer state, counters and a JSON item (step,
data position, config, HF config). Orbax writes each step under a temporary name and renames it once complete, so a
crash mid-save never leaves a step that looks complete; `latest_step` only sees finished ones.

Layout: <output_dir>/checkpoints/<step>/{params, opt_state, meta}. `params` uses the same Orbax layout as
`checkpoint.orbax.save_params`, so `convert to-hf --checkpoint <output_dir>/checkpoints/<step>` reads it.

Resume rules (`train.load_checkpoint_path`, see docs/CHECKPOINTS.md), decided by `plan_resume` from the files alone,
before the model is built:
- `auto` (the default): the newest readable step in this run's own checkpoints directory, if any. A newest step that
  cannot be read is skipped with a warning and, once an older one has been restored, renamed aside
  (`<step>.unreadable-<time>`, nothing is deleted) so this run's own save of that step does not collide with it.
- `none` (or null / ""): a fresh start, refused when the output directory already holds checkpoints.
- a path (a step directory, a checkpoints directory or another run's output_dir): that checkpoint; refused when this
  run's own checkpoints directory holds checkpoints it would mix with (a different run, or later steps).
A checkpoint of a different model (config.json) or of a different training state (parameter or optimizer shapes:
LoRA, optimizer) is an error, found from its metadata before any array is read. Since the checkpoints directory only
ever holds one run's steps, `train.save_total_limit` only deletes steps of that run.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field

import jax
import orbax.checkpoint as ocp

from xorl_jax.checkpoint.hf import CheckpointError
from xorl_jax.train_step import TrainState

log = logging.getLogger("xorl_jax")

ITEMS = ("params", "opt_state", "meta")
FRESH = ("", "none")  # load_checkpoint_path values (with None) that mean "start from step 0"
# Clearly temporary names: Orbax's unfinished step directories and the converter's / exporter's unfinished outputs
# (checkpoint.convert_ops.temp_dir_for; not its `.old` siblings, which may hold the only complete copy).
ORBAX_TMP = re.compile(r"^\d+\.orbax-checkpoint-tmp(-\d+)?$")  # no suffix in some Orbax versions
EXPORT_TMP = re.compile(r"^\..+\.incomplete-[0-9a-f]{8}$")
# config.json keys that name or describe the file rather than the model
_NOT_MODEL = {"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures", "output_attentions",
              "output_hidden_states", "return_dict"}


def is_fresh(setting) -> bool:
    return setting is None or str(setting).strip().lower() in FRESH


def step_dirs(root: str) -> list[int]:
    """Steps (directory names that are numbers) under a checkpoints directory, ascending; [] if it does not exist."""
    if not root or not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def read_meta(step_dir: str) -> dict:
    """The step's JSON item (step, data position, config, hf_config); raises OSError/ValueError if unreadable."""
    meta_dir = os.path.join(step_dir, "meta")
    for name in sorted(os.listdir(meta_dir)):
        p = os.path.join(meta_dir, name)
        if os.path.isfile(p) and not name.startswith(("_", ".")) and name != "commit_success.txt":
            with open(p) as f:
                data = json.load(f)
            if isinstance(data, dict) and "step" in data:
                return data
    raise ValueError("its meta item holds no step record")


def _unreadable(step_dir: str) -> str | None:
    """Why a step directory cannot be a checkpoint to resume from (missing items, unreadable meta), or None."""
    missing = [i for i in ITEMS if not os.path.isdir(os.path.join(step_dir, i))]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        read_meta(step_dir)
    except (OSError, ValueError) as e:
        return f"meta unreadable ({type(e).__name__}: {e})"
    return None


def model_difference(saved: dict | None, current: dict | None) -> str | None:
    """'hidden_size 64 in the checkpoint, 128 here, ...' when two config.json dicts describe different models."""
    if not saved or not current:
        return None
    keys = sorted(k for k in set(saved) | set(current) if not k.startswith("_") and k not in _NOT_MODEL
                  and saved.get(k) != current.get(k))
    if not keys:
        return None
    shown = ", ".join(f"{k} {saved.get(k)!r} in the checkpoint, {current.get(k)!r} here" for k in keys[:3])
    return shown + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")


@dataclass
class ResumePlan:
    """Where a run starts: `root` None = step 0; else the checkpoint steps of `root` to try, newest first."""
    setting: str | None
    root: str | None = None
    steps: list = field(default_factory=list)
    own: bool = False  # root is this run's own checkpoints directory
    skipped: list = field(default_factory=list)  # [(step, reason)] newer steps found unreadable, newest first

    def describe_skipped(self) -> str:
        return "; ".join(f"{os.path.join(self.root, str(s))} ({why})" for s, why in self.skipped)


def plan_resume(setting, own_root: str, *, hf_config: dict | None = None) -> ResumePlan:
    """Which checkpoint a run resumes from, from the files only; CheckpointError (one line) when the setting cannot
    be followed without mixing two runs' checkpoints, or points at nothing readable or at a different model."""
    own_root = os.path.abspath(own_root)
    own_steps = step_dirs(own_root)
    out_dir = os.path.dirname(own_root)
    where = f"train.output_dir {out_dir}"
    if is_fresh(setting):
        if own_steps:
            raise CheckpointError(
                f"{where} already holds checkpoints (steps {_list(own_steps)}) and train.load_checkpoint_path is "
                f"{setting!r} (start fresh): pick a new train.output_dir, or move {own_root} away; leave "
                "load_checkpoint_path at auto to resume from them")
        return ResumePlan(setting)
    if setting == "auto":
        if not own_steps:
            return ResumePlan(setting)
        plan = ResumePlan(setting, own_root, own_steps[::-1], own=True)
    else:
        path = os.path.abspath(os.path.expanduser(str(setting)))
        name = os.path.basename(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"train.load_checkpoint_path {setting}: no such directory; give a step directory "
                                  "(<output_dir>/checkpoints/<step>), a checkpoints directory, auto or none")
        if name.isdigit() and any(os.path.isdir(os.path.join(path, i)) for i in ITEMS):
            root, steps = os.path.dirname(path), [int(name)]
        elif not step_dirs(path) and os.path.isdir(os.path.join(path, "checkpoints")):
            root = os.path.join(path, "checkpoints")  # a run's output_dir
            steps = step_dirs(root)[::-1]
        else:
            root, steps = path, step_dirs(path)[::-1]
        if not steps:
            raise CheckpointError(f"train.load_checkpoint_path {setting} holds no checkpoint; give a step directory "
                                  "(<output_dir>/checkpoints/<step>) or a checkpoints directory")
        plan = ResumePlan(setting, root, steps, own=os.path.realpath(root) == os.path.realpath(own_root))
        if own_steps and not plan.own:
            raise CheckpointError(
                f"{where} already holds checkpoints of another run (steps {_list(own_steps)}); resuming from "
                f"{setting} there would mix the two: pick a new train.output_dir, or move {own_root} away")
        if own_steps and plan.own and len(steps) == 1 and steps[0] != own_steps[-1]:
            later = [s for s in own_steps if s > steps[0]]
            raise CheckpointError(
                f"train.load_checkpoint_path picks step {steps[0]}, but {where} holds later checkpoints "
                f"(steps {_list(later)}) that the resumed run would collide with: pick a new train.output_dir "
                "(keeping load_checkpoint_path), or move the later steps away")
    single = len(plan.steps) == 1 and setting != "auto"
    for step in list(plan.steps):
        why = _unreadable(os.path.join(plan.root, str(step)))
        if why is None:
            break
        if single:
            raise CheckpointError(f"train.load_checkpoint_path {setting} cannot be read: {why}")
        log.warning("checkpoint %s cannot be read (%s): skipped", os.path.join(plan.root, str(step)), why)
        plan.skipped.append((step, why))
        plan.steps.remove(step)
    if not plan.steps:
        raise CheckpointError(f"no readable checkpoint in {plan.root}: {plan.describe_skipped()}; move them away "
                              "(or pick a new train.output_dir) to start fresh")
    newest = os.path.join(plan.root, str(plan.steps[0]))
    diff = model_difference(read_meta(newest).get("hf_config"), hf_config)
    if diff:
        raise CheckpointError(f"{newest} is a checkpoint of a different model ({diff}): pick a new "
                              "train.output_dir, or set train.load_checkpoint_path to a checkpoint of this model")
    return plan


def _list(steps) -> str:
    steps = list(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def clean_temporaries(output_dir: str) -> list[str]:
    """Remove what an interrupted run left half-written: Orbax's `<step>.orbax-checkpoint-tmp-*` directories in
    `checkpoints/` and exporters' `.<name>.incomplete-<id>` directories in `global_step_*/`. Main process only."""
    removed = []
    ckpt = os.path.join(output_dir, "checkpoints")
    candidates = [os.path.join(ckpt, n) for n in (os.listdir(ckpt) if os.path.isdir(ckpt) else ())
                  if ORBAX_TMP.match(n)]
    for d in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
        sub = os.path.join(output_dir, d)
        if d.startswith("global_step_") and os.path.isdir(sub):
            candidates += [os.path.join(sub, n) for n in os.listdir(sub) if EXPORT_TMP.match(n)]
    for p in candidates:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _keyname(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree) -> dict:
    """{path of names: shape} of a state or of Orbax's stored metadata of it."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_keyname(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def _stored_shapes(item_dir: str) -> dict:
    """{path: shape} from an Orbax item's metadata (no array is read)."""
    from etils import epath

    md = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
    tree = getattr(md, "item_metadata", md)
    return _shapes(getattr(tree, "tree", tree))


def _agree(ok: bool) -> bool:
    """True only when every process says True (one tiny all-gather with several processes)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _counters(state: TrainState) -> dict:
    return {"step": state.step, "nonfinite_streak": state.nonfinite_streak, "skipped_total": state.skipped_total}


class TrainCheckpointer:
    def __init__(self, directory: str, *, keep: int | None = 3, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )
        self.restored_step: int | None = None
        self._saved: set[int] = set()

    def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> None:
        if step in (self.manager.all_steps() or []):
            if step == self.restored_step or step in self._saved:
                return  # this very state is already on disk
            raise CheckpointError(f"{os.path.join(self.directory, str(step))} already exists and is not this run's "
                                  "checkpoint; move it away or pick a new train.output_dir")
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave({"opt_state": state.opt_state, "counters": _counters(state)}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        self._saved.add(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    @staticmethod
    def _check_fits(step_dir: str, like: TrainState, stored: dict):
        """CheckpointError when the stored parameter or optimizer-state shapes differ from this run's."""
        want, have = _shapes(like.params), stored["params"]
        for path in sorted(set(want) | set(have)):
            if want.get(path) != have.get(path):
                name = ".".join(p for p in path if p != "value")
                raise CheckpointError(
                    f"{step_dir} does not fit this run: parameter {name} is "
                    f"{have.get(path, 'absent')} there, {want.get(path, 'absent')} here (a different model, or "
                    "LoRA settings changed); pick a new train.output_dir or another train.load_checkpoint_path")
        want, have = _shapes({"opt_state": like.opt_state, "counters": _counters(like)}), stored["opt_state"]
        if sorted(want.values()) != sorted(have.values()):
            raise CheckpointError(
                f"{step_dir} does not fit this run: its optimizer state has {len(have)} arrays, this run's "
                f"{len(want)} with other shapes (train.optimizer or LoRA settings changed?); pick a new "
                "train.output_dir or another train.load_checkpoint_path")

    def restore(self, plan: ResumePlan, like: TrainState):
        """(state, meta, step) of the newest step of `plan` that reads back, onto the shardings of `like`. A step
        that cannot be read is skipped with a warning; shapes that do not fit raise before any array is read."""
        if plan.root is None:
            return None
        manager = self.manager if plan.own else ocp.CheckpointManager(
            plan.root, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
        for step in list(plan.steps):
            step_dir = os.path.join(plan.root, str(step))
            try:
                stored = {item: _stored_shapes(os.path.join(step_dir, item)) for item in ("params", "opt_state")}
            except Exception as e:  # noqa: BLE001 - any failure to read the metadata makes the step unusable
                self._skip(plan, step, f"metadata unreadable ({type(e).__name__}: {_short(e)})")
                continue
            self._check_fits(step_dir, like, stored)
            error = None
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(_abstract(like.params)),
                    opt_state=ocp.args.StandardRestore(_abstract({"opt_state": like.opt_state,
                                                                  "counters": _counters(like)})),
                    meta=ocp.args.JsonRestore(),
                ))
            except Exception as e:  # noqa: BLE001 - shapes fit (checked above): what fails now is the data
                error = f"{type(e).__name__}: {_short(e)}"
            if not _agree(error is None):
                self._skip(plan, step, error or "unreadable on another process")
                continue
            state = self._rebuild(restored, like, step_dir)
            self._set_aside(plan)
            self.restored_step = step
            return state, restored.meta, step
        raise CheckpointError(f"no readable checkpoint in {plan.root}: {plan.describe_skipped()}; move them away "
                              "(or pick a new train.output_dir) to start fresh")

    def _skip(self, plan: ResumePlan, step: int, why: str):
        log.warning("checkpoint %s cannot be read (%s): skipped", os.path.join(plan.root, str(step)), why)
        plan.skipped.append((step, why))
        plan.steps.remove(step)

    def _set_aside(self, plan: ResumePlan):
        """Rename this run's unreadable newer steps to `<step>.unreadable-<time>` (kept, out of the way of the
        resumed run's saves of the same step numbers)."""
        if not (plan.own and plan.skipped):
            return
        if jax.process_index() == 0:
            stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
            for s, _ in plan.skipped:
                src = os.path.join(plan.root, str(s))
                if os.path.isdir(src):
                    dst = f"{src}.unreadable-{stamp}"
                    os.replace(src, dst)
                    log.warning("renamed %s to %s (kept for inspection; delete it when no longer needed)", src, dst)
        _barrier("xorl_jax_set_aside_unreadable")
        self.manager.reload()

    @staticmethod
    def _rebuild(restored, like: TrainState, step_dir: str) -> TrainState:
        c = restored.opt_state["counters"]
        plain = TrainState(step=c["step"], params=restored.params, opt_state=restored.opt_state["opt_state"],
                           nonfinite_streak=c["nonfinite_streak"], skipped_total=c["skipped_total"])
        # Orbax may hand back plain tuples for optax's NamedTuples: rebuild the exact tree structure of `like`.
        leaves = jax.tree.leaves(plain)
        if len(leaves) != len(jax.tree.leaves(like)):
            raise CheckpointError(f"{step_dir} does not match this run's model/optimizer (different tree)")
        return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _short(e: Exception, limit: int = 160) -> str:
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
