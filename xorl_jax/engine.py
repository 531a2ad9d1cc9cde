"""The training engine: one model, its optimizer state and the compiled steps, built from a Config and the checked
run inputs (xorl_jax.preflight.RunInputs); no data iteration, no logging loop, no printing. The CLI loop
(xorl_jax.trainer) drives it, and so does the Tinker-compatible server (xorl_jax.server.host), with
`serving=True`: the optimizer is AdamW with each request's hyperparameters, and each tenant's adapter and state
come from `new_adapter` / `new_state` and train through `request_steps`.

    engine = TrainEngine(cfg, inputs, total_steps=100)
    metrics = engine.train_step(batch)         # one optimizer step on a device batch; metrics stay on the device
    engine.eval_loss(rows_list)                # {"eval_loss", "eval_tokens"} over host micro-batches, or None
    engine.save(step, {"data_state": ...})     # a training checkpoint (the engine adds config, counters, source)
    engine.restore(plan) -> (meta, step) | None
    engine.full_params(), engine.merged_model()  # the weights the forward pass sees (LoRA merged)
    engine.train_batch(rows)                   # [A, B, T] host rows -> a step's batch (sharded, attention layout)
    engine.make_steps(optimizer=o, state=s, merge_fn=f)  # the jitted step of another optimizer / adapter
    engine.request_steps(adapter)              # forward / forward_backward / update with per-call loss and Adam
    engine.merger(adapter)(params)             # an adapter's parameters merged into the frozen base

What the steps are made of stays public for code that builds its own:
- `graphdef` (nnx) with `state.params` (or `full_params()`) makes the model: `nnx.merge(graphdef, params)`;
- `mesh`, `rules`: trace under `rules_lib.use_mesh(mesh, rules)` (or wrap the jitted function in MeshJit);
- LoRA: `frozen` is the base, `state.params` the adapters, `merge_fn(adapters, frozen) -> (params, layer_transform)`
  the merge the steps run (pass `layer_transform` to the model call); `new_adapter(lora_cfg, seed)` makes another
  adapter over the same frozen base, and `new_state(params, optimizer)` the TrainState an optimizer starts it with
  (the server: one per tenant, `state` stays None);
- `loss_cfg` (train_step.LossConfig), `optimizer` / `schedule` (optax), `options` (models.common.ModelOptions);
- `layout_planner` (kernels.attention.LayoutPlanner, None unless attention is cuDNN): the AttentionLayout of a batch
  (`layout_planner.plan(documents, segment_ids)`), put under train_step.LAYOUT_KEY of a train batch or passed to the
  model call as `attention_layout`; a static value, so each layout compiles its own step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xorl_jax import lora as lora_lib
from xorl_jax.autotune import choose_layer_settings
from xorl_jax.checkpoint.hf import CheckpointError
from xorl_jax.checkpoint.orbax import load_model, run_source
from xorl_jax.checkpoint.training import ResumePlan, TrainCheckpointer, clean_temporaries
from xorl_jax.config import Config, config_to_dict
from xorl_jax.kernels.attention import layout_planner
from xorl_jax.lora import layer_merge_fn, merge_lora
from xorl_jax.models.loading import random_model
from xorl_jax.optim import adamw_per_request
from xorl_jax.parallel import rules as rules_lib
from xorl_jax.parallel.rules import batch_sharding
from xorl_jax.preflight import RunInputs, disk_full_error, disk_full_message
from xorl_jax.train_setup import (Experiments, MeshJit, TrainSteps, abstract_batch, loss_config_for,
                                  opt_state_shardings, optimizer_for)
from xorl_jax.train_step import (BATCH_KEYS, LAYOUT_KEY, RequestSteps, TrainState, make_eval_step,
                                 make_request_steps)

log = logging.getLogger("xorl_jax")


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def new_state(params, optimizer, mesh, *, step: int = 0, opt_state=None) -> TrainState:
    """A TrainState for `params` (trainable only) at optimizer step `step`: `opt_state` (one read back from a save)
    or a fresh one sharded as the parameters; no skipped steps."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if opt_state is None:
        opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params)
    # Separate scalars: the step donates the whole state, and one buffer may not be donated twice.
    counter = lambda value=0: jax.device_put(jnp.asarray(value, jnp.int32), replicated)  # noqa: E731
    return TrainState(step=counter(step), params=params, opt_state=opt_state, nonfinite_streak=counter(),
                      skipped_total=counter())


def device_arrays(rows: dict, mesh, *, leading_axes: int = 1) -> dict:
    """Host arrays (this process's rows) -> global arrays sharded over the mesh's data-parallel axes, after
    `leading_axes` unsharded axes ([A, B, T] train batches: 1; [B, T] eval batches: 0); only the BATCH_KEYS."""
    sharding = batch_sharding(mesh, leading_axes=leading_axes)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in rows.items() if k in BATCH_KEYS}


def train_batch(stacked: dict, mesh, planner=None, *, documents: int | None = None, whole_batch: bool = True) -> dict:
    """A train step's device batch from this process's [A, B, T] host rows, with the packed attention layout the
    host plans (`planner`: kernels.attention.LayoutPlanner, None = attention takes none) from `documents` (the most
    segments in any row of the global batch, as the data pipeline counts them) or, when this process holds the
    whole batch, from the rows' segment ids; else the device picks."""
    batch = device_arrays(stacked, mesh, leading_axes=1)
    if planner is not None:
        layout = planner.plan(documents, stacked["segment_ids"] if whole_batch else None)
        if layout is not None:
            batch[LAYOUT_KEY] = layout
    return batch


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One LoRA adapter over an engine's frozen base: what it adapts, its scale, its parameters and its merge."""
    targets: list
    scale: float
    params: Any
    merge_fn: Callable


class TrainEngine:
    def __init__(self, cfg: Config, inputs: RunInputs, *, total_steps: int = 0,
                 experiments: Experiments = Experiments(), is_main: bool = True, serving: bool = False):
        """Loads (or initialises) the model, adds the LoRA adapters the config asks for, builds the optimizer for
        `total_steps`, compiles the train step (resolving `auto` layer settings) and opens the checkpoint directory.
        `inputs.options` is used as given (apply Experiments before). `startup_s`: seconds of each part.

        `serving` (the server; `total_steps` unused): the optimizer is optim.adamw_per_request (no schedule), LoRA
        makes no adapter of the config's own (`state` is None: tenants make theirs) and full-weight training starts
        `state` on the loaded weights; layer settings stay as the options give them (no train step is compiled at
        start) and no training checkpoint directory is opened (the server saves its own way)."""
        self.cfg, self.inputs, self.experiments, self.is_main = cfg, inputs, experiments, is_main
        self.serving = serving
        self.hf_config, self.model_cls, self.model_config = inputs.hf_config, inputs.model_cls, inputs.model_config
        self.options, self.mesh, self.rules = inputs.options, inputs.mesh, inputs.rules
        self.tokenizer = inputs.tokenizer
        self.output_dir = cfg.train.output_dir
        self.total_steps = total_steps
        self._export_source = None
        self.startup_s: dict[str, float] = {}
        for name, setup in (("model", self._setup_model), ("optimizer", self._setup_optimizer),
                            ("checkpointing", self._setup_checkpointing)):
            t0 = time.perf_counter()
            setup()
            self.startup_s[name] = time.perf_counter() - t0

    # ----------------------------------------------------------------------------------------------- set-up
    def _setup_model(self):
        cfg = self.cfg
        init_from = cfg.train.init_from
        log.info("model: %s", f"random init from {cfg.model.config_path or cfg.model.model_path}"
                 if init_from == "scratch" else f"loading weights from {cfg.model.model_path}")
        with rules_lib.use_mesh(self.mesh, self.rules):
            if init_from == "scratch":
                model = random_model(self.model_cls, self.model_config, self.options, mesh=self.mesh,
                                     rules=self.rules, seed=self.cfg.train.seed)
            else:
                model = load_model(cfg.model.model_path, self.options, mesh=self.mesh, rules=self.rules,
                                   config_path=cfg.model.config_path)
        self.graphdef, params = nnx.split(model)
        self.model = model  # the module as built: its type, options and layer pattern (its arrays may be donated)
        self.param_count = count_params(params)
        self.frozen = None  # LoRA: the frozen base parameters (self.state.params holds only the adapters)
        self.lora_targets, self.lora_scale, self.merge_fn = None, None, None
        self._initial_params = params
        if cfg.lora.enable_lora:
            self.frozen, self._initial_params = params, None
        if cfg.lora.enable_lora and not self.serving:  # (the server's tenants make their own adapters)
            adapter = self.new_adapter(cfg.lora, seed=cfg.train.seed)
            self.lora_targets, self.lora_scale, self.merge_fn = adapter.targets, adapter.scale, adapter.merge_fn
            self._initial_params = adapter.params
            log.info("LoRA: %d adapter parameters on %s (base %d parameters frozen)",
                     lora_lib.count_lora_params(adapter.params),
                     ", ".join(sorted({t.hf_name for t in self.lora_targets})), self.param_count)
        self.loss_cfg = loss_config_for(cfg, self.model_config, self.options)
        # cuDNN attention: each batch's packed layout is planned on the host (None: attention takes no layout)
        self.layout_planner = layout_planner(self.options)

    def _setup_optimizer(self):
        params, self._initial_params = self._initial_params, None  # the state owns them from here on
        if self.serving:
            self.schedule, self.optimizer = None, adamw_per_request()
            self.state = None if params is None else self.new_state(params, self.optimizer)
            self.layer_choice, self.step = None, None
        else:
            self.schedule, self.optimizer = optimizer_for(self.cfg, params, self.total_steps)
            self.state = self.new_state(params, self.optimizer)
            self.layer_choice, self.step = self._choose_layer_settings()
        self.eval_step = None if self.state is None else self._bind_frozen(
            MeshJit(jax.jit(make_eval_step(self.graphdef, self.loss_cfg, merge_fn=self.merge_fn)),
                    self.mesh, self.rules))

    def _bind_frozen(self, fn):
        """LoRA: the frozen base goes in as the last argument (never a baked-in constant, never donated)."""
        if self.merge_fn is None:
            return fn
        return lambda *args: fn(*args, self.frozen)

    def _choose_layer_settings(self):
        """Resolve remat_policy / scan_layers `auto` (xorl_jax.autotune): candidates compiled fastest first on this
        mesh until one's step fits the devices. The step compiled for the choice is the one training runs (compiled
        for the usual packed attention layout: a batch that needs another compiles its own, as always)."""
        batch = abstract_batch(self.cfg, self.mesh, self.layout_planner.usual() if self.layout_planner else None)

        def compile_step(graphdef):
            steps = self.make_steps(graphdef)
            return steps.lower(self.state, batch).compile(), steps

        choice, planned = choose_layer_settings(self.cfg, self.model, compile_step)
        c = choice.candidate
        self.options = dataclasses.replace(self.options, remat_policy=c.remat_policy, scan_layers=c.scan_layers)
        self.graphdef = nnx.graphdef(self.model)
        if planned is not None:
            return choice, planned[1]
        return choice, self.make_steps(self.graphdef)

    def _setup_checkpointing(self):
        if self.serving:
            self.checkpointer = None
            return
        self.checkpointer = TrainCheckpointer(
            os.path.join(self.output_dir, "checkpoints"),
            keep=self.cfg.train.save_total_limit,
            async_save=self.cfg.train.save_async,
        )

    # ----------------------------------------------------------------------------------------------- building blocks
    def make_steps(self, graphdef=None, optimizer=None, state=None, merge_fn=None) -> TrainSteps:
        """The train step (train_setup.TrainSteps: one compile per attention layout) of this engine's model, or of
        another optimizer / state / adapter over the same base; the frozen base is bound."""
        merge_fn = merge_fn or self.merge_fn
        return TrainSteps(graphdef or self.graphdef, optimizer or self.optimizer, self.loss_cfg, state or self.state,
                          self.mesh, self.rules, merge_fn=merge_fn, frozen=self.frozen if merge_fn else None)

    def new_state(self, params, optimizer, *, step: int = 0, opt_state=None) -> TrainState:
        """A TrainState of `params` (the trainable tree) for `optimizer` on this engine's mesh, at `step`: with
        `opt_state` (read back from a save) or a fresh one."""
        return new_state(params, optimizer, self.mesh, step=step, opt_state=opt_state)

    def new_adapter(self, lora_cfg, seed: int = 0) -> Adapter:
        """A LoRA adapter (config.LoraConfig fields: rank, alpha, target modules / parameters) over the frozen base,
        initialised from `seed` (B = 0: the merged model starts as the base)."""
        if self.frozen is None:
            raise ValueError("new_adapter needs an engine built with lora.enable_lora (a frozen base)")
        targets = lora_lib.lora_targets(self.frozen, lora_cfg)
        scale = lora_lib.lora_scale(lora_cfg)
        # one device: made in place (placing them on a mesh compiles a placement per adapter pair, per adapter)
        mesh, rules = (self.mesh, self.rules) if self.mesh.size > 1 else (None, None)
        params = lora_lib.init_lora(self.frozen, targets, lora_cfg.lora_rank, seed=seed, mesh=mesh, rules=rules)
        return Adapter(targets=targets, scale=scale, params=params, merge_fn=layer_merge_fn(targets, scale))

    def request_steps(self, adapter: Adapter | None = None) -> RequestSteps:
        """The Tinker API's steps (train_step.make_request_steps) of this engine's model, or of `adapter` over its
        frozen base, jitted under the mesh with the frozen base bound:
            forward(params, batch, loss_index) -> (loss sum, logprobs)
            forward_backward(params, grads, batch, loss_index) -> (loss sum, logprobs, grads)  (grads donated)
            update(state, grads, hyperparams, clip) -> (state, grad norm)  (state and grads donated)
        `update` takes the optimizer's hyperparameters per call: it needs the serving engine's optimizer
        (optim.adamw_per_request). Each call makes new programs (each compiles on first use): keep them for every
        adapter of one shape."""
        merge_fn = self.merge_fn if adapter is None else adapter.merge_fn
        steps = make_request_steps(self.graphdef, self.optimizer, self.loss_cfg, merge_fn=merge_fn)

        def jitted(fn, donate=()):
            fn = MeshJit(jax.jit(fn, donate_argnums=donate), self.mesh, self.rules)
            return fn if merge_fn is None else (lambda *args: fn(*args, self.frozen))

        update = MeshJit(jax.jit(steps.update, donate_argnums=(0, 1)), self.mesh, self.rules)
        return RequestSteps(forward=jitted(steps.forward), forward_backward=jitted(steps.forward_backward, (1,)),
                            update=update)

    def merger(self, adapter: Adapter | None = None) -> Callable:
        """params -> the parameters the forward pass sees, jitted: LoRA (this engine's adapter, or `adapter`) merged
        whole into the frozen base (base + scale * A @ B); full-weight training's params as they are."""
        if self.frozen is None:
            return lambda params: params
        targets, scale = (self.lora_targets, self.lora_scale) if adapter is None else (adapter.targets, adapter.scale)
        merge = MeshJit(jax.jit(lambda lora, frozen: merge_lora(frozen, lora, targets, scale)), self.mesh, self.rules)
        return lambda params: merge(params, self.frozen)

    def device_batch(self, rows: dict, *, leading_axes: int = 1) -> dict:
        """device_arrays on this engine's mesh."""
        return device_arrays(rows, self.mesh, leading_axes=leading_axes)

    def train_batch(self, stacked: dict, documents: int | None = None) -> dict:
        """train_batch on this engine's mesh with its layout planner: [A, B, T] host rows -> a train step's batch."""
        return train_batch(stacked, self.mesh, self.layout_planner, documents=documents,
                           whole_batch=jax.process_count() == 1)

    # ----------------------------------------------------------------------------------------------- steps
    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a device batch ([A, B, T] arrays, plus the host's attention layout entry if any);
        the engine's state is replaced. Returns the step's metrics, still on the device (read them later so the
        next step can be dispatched first)."""
        self.state, metrics = self.step(self.state, batch)
        return metrics

    def eval_loss(self, batches) -> dict | None:
        """Mean token cross-entropy over host micro-batches ([B, T] row dicts), None without any."""
        if not batches:
            return None
        total, count = 0.0, 0
        for rows in batches:
            loss_sum, n = self.eval_step(self.state.params, self.device_batch(rows, leading_axes=0))
            total += float(loss_sum)
            count += int(n)
        return {"eval_loss": total / max(count, 1), "eval_tokens": count}

    def full_params(self):
        """The model's parameters as the forward pass sees them (LoRA: base + scale * A @ B, merged whole)."""
        return self.merger()(self.state.params)

    def merged_model(self):
        """The nnx model with the trained weights (LoRA merged): for generation and export."""
        return nnx.merge(self.graphdef, self.full_params())

    def trainable_count(self) -> int | None:
        """Trainable parameters when they are not all of them (LoRA), else None."""
        return None if self.frozen is None else count_params(self.state.params)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def export_source(self) -> dict:
        """The export source record of this run (checkpoint.orbax.run_source), kept in every checkpoint's meta so
        that `convert to-hf` of a checkpoint writes what the run's own export writes."""
        if self._export_source is None:
            m, t = self.cfg.model, self.cfg.train
            self._export_source = run_source(m.model_path, hf_config=self.hf_config, init_from=t.init_from,
                                             dtype=self.options.dtype, tokenizer_path=m.tokenizer_path,
                                             config_path=m.config_path)
        return self._export_source

    @contextlib.contextmanager
    def writing(self, what: str, path: str):
        """A full disk (or quota, or file size limit) while writing `what` to `path` becomes one CheckpointError
        line (exit 2) instead of a traceback; the main process first removes what was half written."""
        try:
            yield
        except Exception as e:
            full = disk_full_error(e)
            if full is None:
                raise
            if self.is_main:
                with contextlib.suppress(Exception):  # the save's other writers finish (or fail) first
                    self.checkpointer.wait()
                clean_temporaries(self.output_dir)
            raise CheckpointError(disk_full_message(full, path, what, cleaned=self.is_main)) from None

    def save(self, step: int, meta: dict | None = None, *, force: bool = False) -> None:
        """A training checkpoint of the state as step `step`; `meta`: the caller's entries (the loop's data
        position), stored beside the step, config, HF config, export source and skipped-step count."""
        meta = {
            "step": step,
            **(meta or {}),
            "config": config_to_dict(self.cfg),
            "hf_config": self.hf_config,
            "source": self.export_source(),  # what an export of this checkpoint stands in for (convert to-hf)
            "skipped_total": int(self.state.skipped_total),
        }
        # a save in the background reports its failure at the next save or wait: name no step then
        what = "a checkpoint" if self.cfg.train.save_async else f"the checkpoint of step {step}"
        with self.writing(what, self.checkpointer.directory):
            self.checkpointer.save(step, self.state, meta, force=force)

    def wait_for_saves(self) -> None:
        with self.writing("a checkpoint", self.checkpointer.directory):
            self.checkpointer.wait()

    def saved_steps(self):
        return self.checkpointer.manager.all_steps()

    def restore(self, plan: ResumePlan) -> tuple[dict, int] | None:
        """Restores the checkpoint `plan` picked (checkpoint.training.plan_resume) into the state: (its meta, its
        step), or None when there is none to restore."""
        restored = self.checkpointer.restore(plan, self.state)
        if restored is None:
            return None
        self.state, meta, step = restored
        return meta, int(step)

