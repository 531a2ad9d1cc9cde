"""The training loop (python -m xorl_jax.train): data, metrics, eval cadence, saves, stop signals and the run's
summary, driving a TrainEngine (xorl_jax.engine: model, optimizer state, steps, checkpoints); exports and sample
answers at the end (xorl_jax.run_export, xorl_jax.samples).

The trainer knows no model family: everything family-specific comes through the registry and the model object
(its config, `hf_key_map`, `head_weight`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import time

import jax
import numpy as np

from xorl_jax import run_export, samples
from xorl_jax.checkpoint.training import clean_temporaries, plan_resume
from xorl_jax.config import Config, ConfigError
from xorl_jax.data import build_eval_batches, build_train_iterator
from xorl_jax.data.pipeline import MAX_DOCUMENTS_KEY, row_length
from xorl_jax.data.prefetch import Prefetcher
from xorl_jax.engine import TrainEngine, train_batch
from xorl_jax.kernels.attention import layout_planner
from xorl_jax.metrics import (CompletionClock, MetricsLogger, estimate_memory_per_device, peak_flops_per_device,
                              peak_memory_gib)
from xorl_jax.optim import params_with_path
from xorl_jax.parallel import distributed
from xorl_jax.parallel.rules import data_parallel_size
from xorl_jax.preemption import StopSignals
from xorl_jax.preflight import check_run
from xorl_jax.train_setup import Experiments, backend_summary, request_determinism, use_compilation_cache
from xorl_jax.train_step import stack_micro_batches

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
        t0 = time.perf_counter()
        self._setup_data()
        self.startup_s["data"] = time.perf_counter() - t0
        self.engine = TrainEngine(cfg, self.inputs, total_steps=self.total_steps, experiments=experiments,
                                  is_main=self.is_main)
        self.startup_s.update(self.engine.startup_s)  # model, optimizer, checkpointing

    # What tests, benchmarks and the loop read of the engine (the engine owns them).
    state = property(lambda self: self.engine.state, lambda self, value: setattr(self.engine, "state", value))
    model = property(lambda self: self.engine.model)
    graphdef = property(lambda self: self.engine.graphdef)
    frozen = property(lambda self: self.engine.frozen)
    lora_targets = property(lambda self: self.engine.lora_targets)
    param_count = property(lambda self: self.engine.param_count)
    loss_cfg = property(lambda self: self.engine.loss_cfg)
    optimizer = property(lambda self: self.engine.optimizer)
    schedule = property(lambda self: self.engine.schedule)
    checkpointer = property(lambda self: self.engine.checkpointer)
    layer_choice = property(lambda self: self.engine.layer_choice)
    train_step = property(lambda self: self.engine.step)  # (state, batch) -> (state, metrics), frozen base bound

    @property
    def options(self):
        """The model options: the engine's (layer settings resolved) once it exists, the checks' before."""
        engine = self.__dict__.get("engine")
        return self.inputs.options if engine is None else engine.options

    def full_params(self):
        return self.engine.full_params()

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
        self.inputs = dataclasses.replace(inputs, options=self.experiments.model_options(inputs.options))
        self.hf_config, self.model_config = inputs.hf_config, inputs.model_config
        self.mesh, self.rules = inputs.mesh, inputs.rules
        self.tokenizer, self.vocab_size = inputs.tokenizer, inputs.vocab_size
        # cuDNN's packed attention layout is fixed per batch on the host (every process alike: the data pipeline
        # counts the documents of the whole global batch) instead of being picked in every layer on the device;
        # set here: the data prefetch thread may shape batches before the model exists
        self.layout_planner = layout_planner(self.inputs.options)

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

    # ----------------------------------------------------------------------------------------------- pieces
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len

    def _memory_estimate(self) -> float:
        # LoRA: the base is frozen (no gradients, no state)
        return estimate_memory_per_device(self.param_count, self.mesh.size, self.cfg.train,
                                          param_dtype=self.options.param_dtype,
                                          trainable=self.engine.trainable_count())

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
        # the whole global batch's document count from the data pipeline; rows from elsewhere: counted here when
        # this process holds them all
        return train_batch(stack_micro_batches(rows, self.accum), self.mesh, self.layout_planner,
                           documents=rows.get(MAX_DOCUMENTS_KEY), whole_batch=self.process_count == 1)

    def evaluate(self) -> dict | None:
        return self.engine.eval_loss(self.eval_batches)

    def save(self, step: int, *, force: bool = False):
        self.engine.save(step, {"data_state": self.train_iter.get_state()}, force=force)

    def _wait_for_saves(self):
        self.engine.wait_for_saves()

    def maybe_resume(self) -> int:
        """The step this run starts after: restores the checkpoint `resume_plan` picked (state and data position)."""
        plan = self.resume_plan
        restored = self.engine.restore(plan)
        if restored is None:
            if plan.setting == "auto":
                log.info("no checkpoint in %s yet: starting from step 0", self.checkpointer.directory)
            return 0
        meta, step = restored
        self.train_iter.set_state(meta["data_state"])
        log.info("resumed from step %d (%s)", step, os.path.join(plan.root, str(step)))
        return step

    def export_hf(self, step: int) -> str:
        return run_export.export_run(self.engine, step)

    def print_samples(self, n: int) -> list[tuple[str, str, str]]:
        return samples.print_samples(self.engine, n)

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
                    metrics = self.engine.train_step(batch)
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
                    with self.engine.writing(f"the HF export of step {step}",
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


def run(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    result = trainer.train()
    return result

