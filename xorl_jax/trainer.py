"""The training loop: model + data + optimizer + mesh from a Config; steps, eval, checkpoints, resume, metrics.

The trainer knows no model family: everything family-specific comes through the registry and the model object
(its config, `hf_key_map`, `head_weight`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xorl_jax import lora as lora_lib
from xorl_jax.autotune import choose_layer_settings
from xorl_jax.checkpoint.hf import CheckpointError
from xorl_jax.checkpoint.export import export_hf, host_array
from xorl_jax.checkpoint.orbax import _root_for, load_model, run_source
from xorl_jax.checkpoint.training import TrainCheckpointer, clean_temporaries, plan_resume
from xorl_jax.config import Config, ConfigError, config_to_dict
from xorl_jax.data import build_eval_batches, build_train_iterator
from xorl_jax.data.chat import resolve_template
from xorl_jax.data.pipeline import MAX_DOCUMENTS_KEY, row_length
from xorl_jax.data.prefetch import Prefetcher
from xorl_jax.data.sources import iter_rows
from xorl_jax.generate import greedy_generate
from xorl_jax.kernels.attention import SMALL_SEGMENTS, document_slots, resolve_attn_implementation, slots_for
from xorl_jax.lora import layer_merge_fn, merge_lora
from xorl_jax.metrics import (CompletionClock, MetricsLogger, estimate_memory_per_device, peak_flops_per_device,
                              peak_memory_gib)
from xorl_jax.models.loading import abstract_model
from xorl_jax.optim import params_with_path
from xorl_jax.parallel import distributed
from xorl_jax.parallel import rules as rules_lib
from xorl_jax.parallel.rules import batch_sharding, data_parallel_size, param_shardings
from xorl_jax.preemption import StopSignals
from xorl_jax.preflight import check_run, disk_full_error, disk_full_message
from xorl_jax.train_setup import (DOC_SLOTS_KEY, Experiments, MeshJit, TrainSteps, abstract_batch, backend_summary,
                                  loss_config_for, opt_state_shardings, optimizer_for, request_determinism,
                                  use_compilation_cache)
from xorl_jax.train_step import TrainState, make_eval_step, stack_micro_batches

log = logging.getLogger("xorl_jax")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): start-up, loading and compilation
    included, the time a user waits for the first step."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the comm field
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite steps); the last good checkpoint is intact."""


class Preempted(TrainingStopped):
    """SIGTERM/SIGUSR1 arrived (pre-emption, time limit): a checkpoint of the last step was saved."""


def _count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


class Trainer:
    def __init__(self, cfg: Config, experiments: Experiments = Experiments()):
        """experiments: benchmarks' switches (train_setup.Experiments); the default is every run's."""
        self.experiments = experiments
        if cfg.train.enable_full_determinism:
            request_determinism()
        distributed.initialize()
        self.compilation_cache = use_compilation_cache(cfg.train.compilation_cache_dir)
        self.cfg = cfg
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.is_main = self.process_index == 0
        self.output_dir = cfg.train.output_dir
        # where the time to first step goes, for the summary: before the trainer (imports, JAX start), then each part
        self.startup_s = {"process start": process_age_s()}
        t0 = time.perf_counter()
        self._check_inputs()  # seconds: a wrong path or a mismatched file is reported before anything expensive
        self.resume_plan = self._plan_resume()  # before any expensive set-up: a refusal comes at once
        self.startup_s["checks"] = time.perf_counter() - t0
        # the data before the weights: a bad row is reported before a model load, and no setting of either needs
        # the other (the mesh and the vocabulary size come from the checks)
        for name, setup in (("data", self._setup_data), ("model", self._setup_model),
                            ("optimizer", self._setup_optimizer), ("checkpointing", self._setup_checkpointing)):
            t0 = time.perf_counter()
            setup()
            self.startup_s[name] = time.perf_counter() - t0

    def _nonfinite_culprits(self, metrics) -> str:
        """'loss nan, non-finite gradients in 3 of 120 parameters: a.b.c, ...' for a skipped step's log line (a
        parameter is named when its gradient holds a NaN or inf, or is so large that its squared norm overflows)."""
        parts = [f"loss {float(metrics['loss']):g}"]
        flags = metrics.get("nonfinite_grads")
        if flags is not None:
            names = [".".join(path) for path, _, _ in params_with_path(self.state.params)]
            bad = [n for n, f in zip(names, flags) if f]
            if bad:
                shown = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
                parts.append(f"non-finite gradients in {len(bad)} of {len(names)} parameters: {shown}")
            else:
                parts.append("every parameter's gradient finite (their total norm overflowed)" if not np.isfinite(
                    float(metrics["grad_norm"])) else "all gradients finite")
        return ", ".join(parts)

    # ----------------------------------------------------------------------------------------------- setup
    def _check_inputs(self):
        """xorl_jax.preflight's checks of every input (output_dir, data paths, config.json, mesh, the weights'
        headers, tokenizer); keeps what they read: config, mesh, options, tokenizer, vocabulary size."""
        inputs = check_run(self.cfg, is_main=self.is_main)
        self.hf_config, self.model_cls, self.model_config = inputs.hf_config, inputs.model_cls, inputs.model_config
        self.options, self.mesh, self.rules = self.experiments.model_options(inputs.options), inputs.mesh, inputs.rules
        self.tokenizer, self.vocab_size = inputs.tokenizer, inputs.vocab_size
        # as the model resolves it (set here: the data prefetch thread may shape batches before the model exists)
        self.host_attention_layout = resolve_attn_implementation(self.options.attn_implementation,
                                                                 self.options.dtype) == "cudnn"

    def _setup_model(self):
        cfg = self.cfg
        init_from = cfg.train.init_from
        log.info("model: %s", f"random init from {cfg.model.config_path or cfg.model.model_path}"
                 if init_from == "scratch" else f"loading weights from {cfg.model.model_path}")
        with rules_lib.use_mesh(self.mesh, self.rules):
            if init_from == "scratch":
                model = self._init_scratch()
            else:
                model = load_model(cfg.model.model_path, self.options, mesh=self.mesh, rules=self.rules,
                                   config_path=cfg.model.config_path)
        self.graphdef, params = nnx.split(model)
        self.model = model
        self.params = params
        self.param_count = _count_params(params)
        self.frozen = None  # LoRA: the frozen base parameters (self.state.params holds only the adapters)
        if cfg.lora.enable_lora:
            self.lora_targets = lora_lib.lora_targets(params, cfg.lora)
            self.lora_scale = lora_lib.lora_scale(cfg.lora)
            self.frozen = params
            self.params = lora_lib.init_lora(params, self.lora_targets, cfg.lora.lora_rank, seed=cfg.train.seed,
                                             mesh=self.mesh, rules=self.rules)
            log.info("LoRA: %d adapter parameters on %s (base %d parameters frozen)",
                     lora_lib.count_lora_params(self.params),
                     ", ".join(sorted({t.hf_name for t in self.lora_targets})), self.param_count)
        self.loss_cfg = loss_config_for(cfg, self.model_config, self.options)
        # cuDNN's packed attention layout is fixed per batch on the host (every process alike: the data pipeline
        # counts the documents of the whole global batch) instead of being picked in every layer on the device.
        self.host_attention_layout = model.options.attn_implementation == "cudnn"

    def _init_scratch(self):
        abstract = abstract_model(self.model_cls, self.model_config, self.options)
        shardings = param_shardings(abstract, self.mesh, self.rules)
        graphdef = nnx.graphdef(abstract)
        seed = self.cfg.train.seed
        cls, mcfg, opts = self.model_cls, self.model_config, self.options

        @jax.jit
        def init():
            state = nnx.state(cls(mcfg, opts, rngs=nnx.Rngs(seed)))
            state = jax.tree.map(lambda x: x.astype(opts.param_dtype), state)
            return jax.lax.with_sharding_constraint(state, shardings)

        return nnx.merge(graphdef, init())

    def _setup_data(self):
        cfg = self.cfg
        self.dp_size = data_parallel_size(self.mesh)
        self.micro_rows = cfg.train.micro_batch_size * self.dp_size  # rows of one global micro-batch
        self.accum = cfg.train.gradient_accumulation_steps
        self.rows_per_step = self.micro_rows * self.accum
        self.seq_len = row_length(cfg.data)  # sample_packing_sequence_len padded to pad_to_multiple_of
        self.train_iter = build_train_iterator(
            cfg.data, self.tokenizer, global_batch_size=self.rows_per_step,
            process_index=self.process_index, process_count=self.process_count, seed=cfg.data.seed,
            micro_batches=self.accum, vocab_size=self.vocab_size,
        )
        self.batches_on_device = cfg.data.dataloader_num_workers > 0
        if self.batches_on_device:  # one thread packs and copies to the devices; the count sets how far ahead
            depth = cfg.data.dataloader_num_workers * (cfg.data.dataloader_prefetch_factor or 2)
            self.train_iter = Prefetcher(self.train_iter, depth, transform=self._device_batch)
        self.eval_batches = None
        if cfg.data.eval_datasets:
            self.eval_batches = list(build_eval_batches(
                cfg.data, self.tokenizer, global_batch_size=self.micro_rows,
                process_index=self.process_index, process_count=self.process_count, vocab_size=self.vocab_size,
            ))
        rows_per_epoch = getattr(self.train_iter, "rows_per_epoch", None)
        if cfg.train.max_steps and cfg.train.max_steps > 0:
            self.total_steps = cfg.train.max_steps
        elif rows_per_epoch:
            self.total_steps = max(1, math.ceil(cfg.train.num_train_epochs * rows_per_epoch / self.rows_per_step))
        else:
            raise ConfigError("train.max_steps is not set and the dataset size is unknown; set train.max_steps")

    def _setup_optimizer(self):
        self.schedule, self.optimizer = optimizer_for(self.cfg, self.params, self.total_steps)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_state_shardings(self.optimizer, self.params,
                                                                                   self.mesh))(self.params)
        # Separate scalars: the step donates the whole state, and one buffer may not be donated twice.
        counter = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)  # noqa: E731
        self.state = TrainState(step=counter(), params=self.params, opt_state=opt_state,
                                nonfinite_streak=counter(), skipped_total=counter())
        self.params = None  # the state owns them from here on
        merge_fn = self._merge_fn()
        self.layer_choice, self.train_step = self._choose_layer_settings(merge_fn)
        self.eval_step = MeshJit(jax.jit(make_eval_step(self.graphdef, self.loss_cfg, merge_fn=merge_fn)),
                                 self.mesh, self.rules)
        if merge_fn is not None:  # the frozen base goes in as an argument (never a baked-in constant, never donated)
            step_jit, eval_jit = self.train_step, self.eval_step
            self.train_step = lambda state, batch: step_jit(state, batch, self.frozen)
            self.eval_step = lambda params, micro: eval_jit(params, micro, self.frozen)

    def _choose_layer_settings(self, merge_fn):
        """Resolve remat_policy / scan_layers `auto` (xorl_jax.autotune): candidates compiled fastest first on this
        mesh until one's step fits the devices. The step compiled for the choice is the one training runs (compiled
        for the usual packed attention layout: a batch that needs another compiles its own, as always)."""
        extra = () if merge_fn is None else (self.frozen,)
        sizes = self.options.attn_slot_sizes
        batch = abstract_batch(self.cfg, self.mesh,
                               slots_for(SMALL_SEGMENTS, sizes=sizes) if self.host_attention_layout else None)

        def compile_step(graphdef):
            steps = TrainSteps(graphdef, self.optimizer, self.loss_cfg, self.state, self.mesh, self.rules,
                               merge_fn=merge_fn)
            return steps.lower(self.state, batch, *extra).compile(), steps

        choice, planned = choose_layer_settings(self.cfg, self.model, compile_step)
        c = choice.candidate
        self.options = dataclasses.replace(self.options, remat_policy=c.remat_policy, scan_layers=c.scan_layers)
        self.graphdef = nnx.graphdef(self.model)
        if planned is not None:
            return choice, planned[1]
        return choice, TrainSteps(self.graphdef, self.optimizer, self.loss_cfg, self.state, self.mesh, self.rules,
                                  merge_fn=merge_fn)

    def _merge_fn(self):
        """LoRA: (adapters, frozen base) -> (base, per-layer merge run inside the layer scan); None without LoRA."""
        if self.frozen is None:
            return None

        return layer_merge_fn(self.lora_targets, self.lora_scale)

    def full_params(self):
        """The model's parameters as the forward pass sees them (LoRA: base + scale * A @ B, merged whole)."""
        if self.frozen is None:
            return self.state.params

        targets, scale = self.lora_targets, self.lora_scale
        return jax.jit(lambda lora, frozen: merge_lora(frozen, lora, targets, scale))(self.state.params, self.frozen)

    def _plan_resume(self):
        """Which checkpoint this run starts from (checkpoint.training.plan_resume), from the files alone; then the
        main process removes what an interrupted run left half-written."""
        # the checks' config.json, compared with the checkpoint's before the model is built
        plan = plan_resume(self.cfg.train.load_checkpoint_path, os.path.join(self.output_dir, "checkpoints"),
                           hf_config=self.hf_config)
        if self.is_main:
            for path in clean_temporaries(self.output_dir):
                log.info("removed %s (left half-written by an interrupted run)", path)
        return plan

    def _setup_checkpointing(self):
        self.checkpointer = TrainCheckpointer(
            os.path.join(self.output_dir, "checkpoints"),
            keep=self.cfg.train.save_total_limit,
            async_save=self.cfg.train.save_async,
        )

    # ----------------------------------------------------------------------------------------------- pieces
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len

    def _memory_estimate(self) -> float:
        trainable = None
        if self.frozen is not None:  # LoRA: the base is frozen (no gradients, no state)
            trainable = _count_params(self.params)
        return estimate_memory_per_device(self.param_count, self.mesh.size, self.cfg.train,
                                          param_dtype=self.options.param_dtype, trainable=trainable)

    def summary(self) -> str:
        lines = [
            f"model     {self.hf_config.get('model_type')} ({type(self.model).__name__}), "
            f"{self.param_count / 1e6:.1f}M parameters, init_from={self.cfg.train.init_from}",
            f"backends  {backend_summary(self.options)}, dtype={self.options.dtype}, "
            f"remat={self.options.remat_policy}, layers={'scanned' if self.options.scan_layers else 'unrolled'}",
            *filter(None, [self.layer_choice.line()]),
            f"mesh      {dict(self.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
            f"{self.process_count} process(es)",
            f"batch     {self.cfg.train.micro_batch_size} rows/device x {self.dp_size} data-parallel x "
            f"{self.accum} accumulation x {self.seq_len} tokens = {self.tokens_per_step():,} tokens/step",
            f"steps     {self.total_steps} (lr {self.cfg.train.lr:g}, {self.cfg.train.lr_decay_style})",
            f"memory    ~{self._memory_estimate() / 2**30:.2f} "
            f"GiB/device for params + optimizer state (activations extra)",
            f"output    {os.path.abspath(self.output_dir)}"
            + (f" (compilation cache {self.compilation_cache})" if self.compilation_cache else ""),
            "startup   " + ", ".join(f"{k} {v:.1f}s" for k, v in self.startup_s.items() if v is not None),
        ]
        return "\n".join(lines)

    def _device_batch(self, rows: dict):
        stacked = stack_micro_batches(rows, self.accum)
        sharding = batch_sharding(self.mesh, leading_axes=1)
        batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in stacked.items()}
        if self.host_attention_layout:
            documents = rows.get(MAX_DOCUMENTS_KEY)  # the whole global batch's, from the data pipeline
            if documents is not None:
                batch[DOC_SLOTS_KEY] = slots_for(int(documents), sizes=self.options.attn_slot_sizes)
            elif self.process_count == 1:  # rows from elsewhere: this process holds them all
                batch[DOC_SLOTS_KEY] = document_slots(stacked["segment_ids"], sizes=self.options.attn_slot_sizes)
        return batch

    def evaluate(self) -> dict | None:
        if not self.eval_batches:
            return None

        sharding = batch_sharding(self.mesh, leading_axes=0)
        total, count = 0.0, 0
        for rows in self.eval_batches:
            micro = {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                     for k, v in rows.items() if k in ("input_ids", "labels", "positions", "segment_ids")}
            loss_sum, n = self.eval_step(self.state.params, micro)
            total += float(loss_sum)
            count += int(n)
        return {"eval_loss": total / max(count, 1), "eval_tokens": count}

    @contextlib.contextmanager
    def _writing(self, what: str, path: str):
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

    def _wait_for_saves(self):
        with self._writing("a checkpoint", self.checkpointer.directory):
            self.checkpointer.wait()

    def save(self, step: int, *, force: bool = False):
        meta = {
            "step": step,
            "data_state": self.train_iter.get_state(),
            "config": config_to_dict(self.cfg),
            "hf_config": self.hf_config,
            "source": self.export_source(),  # what an export of this checkpoint stands in for (convert to-hf)
            "skipped_total": int(self.state.skipped_total),
        }
        # a save in the background reports its failure at the next save or wait: name no step then
        what = "a checkpoint" if self.cfg.train.save_async else f"the checkpoint of step {step}"
        with self._writing(what, self.checkpointer.directory):
            self.checkpointer.save(step, self.state, meta, force=force)

    def maybe_resume(self) -> int:
        """The step this run starts after: restores the checkpoint `resume_plan` picked (state and data position)."""
        plan = self.resume_plan
        restored = self.checkpointer.restore(plan, self.state)
        if restored is None:
            if plan.setting == "auto":
                log.info("no checkpoint in %s yet: starting from step 0", self.checkpointer.directory)
            return 0
        self.state, meta, step = restored
        self.train_iter.set_state(meta["data_state"])
        log.info("resumed from step %d (%s)", step, os.path.join(plan.root, str(step)))
        return int(step)

    # ----------------------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        t = self.cfg.train
        if self.is_main:
            print(self.summary(), flush=True)
        start_step = self.maybe_resume()
        logger = MetricsLogger(self.output_dir, log_steps=t.log_steps, total_steps=self.total_steps,
                               process_index=self.process_index, use_tensorboard=t.use_tensorboard,
                               resume_step=start_step)  # lines of steps after it are redone: dropped
        if start_step >= self.total_steps:
            logger.info(f"the checkpoint of step {start_step} already completes this run's {self.total_steps} steps: "
                        "nothing to train (raise train.max_steps to go on)")
        fpt = self.model_config.flops_per_token(self.seq_len)
        peak = peak_flops_per_device()
        step = start_step  # the last step whose metrics the host has read
        last_metrics, eval_metrics = {}, None
        age = None
        clock = CompletionClock()  # step times from when each step finished, not from when the loop read it
        t_last = time.perf_counter()
        t_first = None
        # One step runs ahead: step N+1 is dispatched before step N's metrics are fetched, so the GPU does not idle
        # while the host reads metrics, logs and prepares the next batch. Before a save, an eval, the last step or a
        # stop, nothing is left in flight (the saved state is exactly the step it is named after).
        pending: collections.deque = collections.deque()
        acted_at = start_step  # the step whose eval/save ran last (a skipped update leaves the step as it was)

        def boundary(s: int) -> bool:
            return s >= self.total_steps or any(n and s % n == 0 for n in (t.eval_steps, t.save_steps))

        def read(entry):
            nonlocal step, t_first, t_last, age, last_metrics
            metrics_on_device, finished = entry
            metrics = jax.device_get(metrics_on_device)
            done = finished.result()
            dt, t_last = done - t_last, done
            if t_first is None:
                t_first = dt
                age = process_age_s()
                logger.info(f"first step (compile included): {t_first:.1f}s"
                            + (f"; {age:.1f}s since the process started" if age is not None else ""))
            step = int(metrics["step"])
            if not metrics["finite"]:
                streak = int(metrics["nonfinite_streak"])
                logger.info(f"non-finite loss or gradients: update skipped ({streak} in a row); "
                            + self._nonfinite_culprits(metrics))
                if streak >= t.max_nonfinite_steps:
                    raise TrainingStopped(
                        f"{streak} non-finite steps in a row; stopping with the last good checkpoint intact "
                        "(lower train.lr or check the data)"
                    )
                return
            tokens_s = self.tokens_per_step() / max(dt, 1e-9)
            last_metrics = {
                "loss": float(metrics["loss"]),
                "aux_loss": float(metrics["aux_loss"]),
                "grad_norm": float(metrics["grad_norm"]),
                "lr": float(self.schedule(step - 1)),
                "tokens_per_s": tokens_s,
                "tokens_per_s_per_device": tokens_s / jax.device_count(),
                "step_time_s": dt,
                "skipped_steps": int(metrics["skipped_total"]),
                "peak_memory_gib": peak_memory_gib(),  # the largest on any of this process's devices
            }
            if peak:
                last_metrics["mfu"] = tokens_s * fpt / (jax.device_count() * peak)
            logger.log_train(step, last_metrics)

        with StopSignals() as signals:  # SIGTERM/SIGUSR1 -> save and stop between steps
            try:
                while True:
                    stop = signals.should_stop()
                    if pending and (stop or boundary(step + len(pending))):
                        while pending:
                            read(pending.popleft())
                        if step != acted_at and step < self.total_steps:
                            acted_at = step
                            if t.eval_steps and step % t.eval_steps == 0:
                                eval_metrics = self.evaluate()
                                if eval_metrics:
                                    logger.log_eval(step, eval_metrics)
                            if t.save_steps and step % t.save_steps == 0:
                                self.save(step)
                            t_last = time.perf_counter()  # the next step's time leaves the eval / save out
                        continue
                    if stop:
                        self._stop_for_signal(signals.received, step)
                    if step >= self.total_steps:
                        break
                    rows = next(self.train_iter)
                    batch = rows if self.batches_on_device else self._device_batch(rows)
                    self.state, metrics = self.train_step(self.state, batch)
                    pending.append((metrics, clock.watch(metrics)))
                    if len(pending) > 1:
                        read(pending.popleft())
                if step > start_step or not start_step:  # else a rerun of a finished run: its eval is logged
                    eval_metrics = self.evaluate() or eval_metrics
                if eval_metrics:
                    logger.log_eval(step, eval_metrics)
                if t.save_at_end:
                    self.save(step, force=True)
                self._wait_for_saves()
                if t.save_hf_weights:
                    with self._writing(f"the HF export of step {step}",
                                       os.path.join(self.output_dir, f"global_step_{step}")):
                        self.export_hf(step)
                if t.sample_eval_prompts:
                    self.print_samples(t.sample_eval_prompts)
            finally:
                clock.close()
                self._wait_for_saves()
                logger.close()
                if hasattr(self.train_iter, "close"):
                    self.train_iter.close()
        return {"step": step, **last_metrics, **(eval_metrics or {}), "time_to_first_step_s": t_first,
                "process_age_at_first_step_s": age}

    def _stop_for_signal(self, name: str | None, step: int):
        if step not in self.checkpointer.manager.all_steps():  # nothing to save when resumed or saved right here
            self.save(step, force=True)
        self._wait_for_saves()
        how = ("the same command resumes from it" if self.cfg.train.load_checkpoint_path == "auto" else
               "rerun with train.load_checkpoint_path=auto (the default) to resume from it")
        raise Preempted(f"{name or 'a stop signal'} received: stopped after step {step} with its checkpoint saved in "
                        f"{self.checkpointer.directory}; {how}")

    def print_samples(self, n: int) -> list[tuple[str, str, str]]:
        """Greedy answers to the first `n` held-out conversations: (question, expected, answer) triples."""
        ds = next((d for d in self.cfg.data.eval_datasets if d.type == "messages"), None)
        if ds is None:
            log.info("train.sample_eval_prompts: no messages-type eval dataset to take prompts from")
            return []
        convs = []
        for _, row in iter_rows(ds.path, split=ds.split, data_files=ds.data_files):
            msgs = row.get("messages") if isinstance(row, dict) else None
            if msgs and msgs[-1].get("role") == "assistant":
                convs.append(msgs)
            if len(convs) == n:
                break
        model = nnx.merge(self.graphdef, self.full_params())
        template = resolve_template(ds.chat_template, self.tokenizer) if ds.chat_template else None
        answers = greedy_generate(model, self.tokenizer, [c[:-1] for c in convs], chat_template=template,
                                  chat_template_kwargs=ds.chat_template_kwargs)
        out = [(c[-2]["content"], c[-1]["content"], a) for c, a in zip(convs, answers)]
        if self.is_main:
            print("held-out questions, greedy answers:", flush=True)
            for q, want, got in out:
                mark = "ok " if got == want else "   "
                print(f"  {mark}{q!r} -> {got!r} (reference {want!r})", flush=True)
        return out

    def export_source(self) -> dict:
        """The export source record of this run (checkpoint.orbax.run_source), kept in every checkpoint's meta so
        that `convert to-hf` of a checkpoint writes what the run's own export writes."""
        if getattr(self, "_export_source", None) is None:
            m, t = self.cfg.model, self.cfg.train
            self._export_source = run_source(m.model_path, hf_config=self.hf_config, init_from=t.init_from,
                                             dtype=self.options.dtype, tokenizer_path=m.tokenizer_path,
                                             config_path=m.config_path)
        return self._export_source

    def export_hf(self, step: int) -> str:
        """`global_step_N/hf_ckpt`: a drop-in replacement of model.model_path (checkpoint.export.export_hf: tensors
        the run did not train copied from the source, trained ones in the source's dtypes; LoRA merged), or with
        lora.save_lora_only a PEFT adapter directory."""
        out = os.path.join(self.output_dir, f"global_step_{step}", "hf_ckpt")
        if self.frozen is not None and self.cfg.lora.save_lora_only:
            return self.export_lora_adapter(step)  # every adapter, routed experts included, has a PEFT layout
        model = nnx.merge(self.graphdef, self.full_params())
        export_hf(model, out, source_dir_or_metadata={"hf_config": self.hf_config, "source": self.export_source()},
                  overwrite=True)
        if self.is_main:
            self._carry_training_chat_template(out)
            print(f"exported HF weights to {out}", flush=True)
        return out

    def _carry_training_chat_template(self, out: str) -> None:
        """The model learnt the chat format of its messages datasets: where they name their own `chat_template`, the
        export serves with that one (chat_template.jinja, which transformers, vLLM and SGLang read before
        tokenizer_config.json's), not the source's. Several different templates: the source's stays, with a warning."""
        specs = [d.chat_template for d in self.cfg.data.datasets if d.type == "messages"]
        if not any(specs):
            return
        texts = {resolve_template(spec, self.tokenizer) for spec in specs}
        if len(texts) > 1:
            names = sorted({spec or "the tokenizer's own" for spec in specs})
            log.warning("export: the messages datasets use %d different chat templates (%s); the export keeps the "
                        "source's, put the one to serve with in %s/chat_template.jinja", len(texts),
                        ", ".join(names), out)
            return
        specs = [spec for spec in specs if spec]
        path = os.path.join(out, "chat_template.jinja")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(texts.pop())
        os.replace(tmp, path)
        log.info("export: chat_template.jinja is the training data's template (%s)", specs[0])

    def export_lora_adapter(self, step: int) -> str:
        """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for the HF base model."""
        out = os.path.join(self.output_dir, f"global_step_{step}", "lora_adapter")
        lo = self.cfg.lora
        host = jax.tree.map(host_array, self.state.params)  # every process takes part in the gathers
        if self.is_main:
            prefix = type(self.model).hf_key_map(self.model_config, root=_root_for(self.hf_config)).layer_prefix
            lora_lib.export_peft_adapter(
                out, host, self.lora_targets, rank=lo.lora_rank, alpha=lo.lora_alpha,
                period=len(self.model.layers.pattern), repeats=self.model.layers.repeats, layer_prefix=prefix,
                base_model_name_or_path=self.cfg.model.model_path)
            print(f"exported the LoRA adapter (PEFT) to {out}", flush=True)
        return out


def run(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    result = trainer.train()
    return result

