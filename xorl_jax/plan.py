"""Dry run: check a training config against a mesh without weights, data or accelerators.

    python -m xorl_jax.train --config configs/qwen3_30b_a3b_ep8.yaml --dry-run --fake-devices 8

Builds the mesh and the sharding rules, the model's shapes (no memory), parameter and optimizer shardings, and
lowers and compiles the real train step for the configured batch. Reports bytes per device of parameters,
gradients and optimizer state (exact, from the shardings) and the compiler's memory estimate of the step (on the
platform it compiled for: on fake CPU devices the GPU kernels are replaced by their jnp references, so the
temporary-buffer figure is indicative only). Fails the way a real run would fail: an impossible mesh, a missing
sharding rule (large replicated parameter), a shape that does not partition.

`remat_policy` / `scan_layers` left at `auto` are resolved as a run resolves them (xorl_jax.autotune), against the
devices' memory limit; fake CPU devices report none, so the plan assumes an 80 GiB H100 unless
`--device-memory-gib N` names the GPU's memory (either times JAX's memory fraction), and says which.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xorl_jax import autotune
from xorl_jax.autotune import peak_bytes
from xorl_jax.config import Config, ConfigError

log = logging.getLogger("xorl_jax")


@dataclasses.dataclass
class PlanReport:
    model_type: str
    param_count: int
    mesh: dict
    platform: str
    tokens_per_step: int
    param_bytes_per_device: int  # parameters as stored (param_dtype), this device's shards
    optimizer_bytes_per_device: int
    largest_param_shard: tuple[str, int]  # (path, bytes) of the biggest per-device parameter shard
    compile_s: float
    memory: dict  # the compiler's per-device estimate: argument/output/temp/alias bytes
    flops_per_token: float
    collectives: dict  # op name -> count in the compiled step (e.g. all-to-all for expert parallelism)
    layers: Any = None  # autotune.Choice: what remat_policy / scan_layers auto picks (its line() None if explicit)

    def lines(self) -> list[str]:
        m = self.memory
        if self.platform == "cpu":  # the jnp references of the GPU kernels materialise what the kernels do not
            compiled = (f"compiled  in {self.compile_s:.1f}s on fake CPU devices; step arguments "
                        f"{_gib(m.get('argument', 0))} per device (temporaries are only estimated on GPUs)")
        else:
            peak = peak_bytes(m)
            compiled = (f"compiled  in {self.compile_s:.1f}s; per device: arguments {_gib(m.get('argument', 0))}, "
                        f"temporaries {_gib(m.get('temp', 0))}, peak ~{_gib(peak)}")
        coll = ", ".join(f"{k} x{v}" for k, v in sorted(self.collectives.items())) or "none"
        auto = self.layers.line() if self.layers is not None else None
        return [
            f"dry run   {self.model_type}, {_count(self.param_count, billions='B')} parameters, mesh {self.mesh} "
            f"({self.platform}), {self.tokens_per_step:,} tokens/step",
            *([auto] if auto else []),
            f"per device  parameters {_gib(self.param_bytes_per_device)}, gradients ~{_gib(self.param_bytes_per_device)}, "
            f"optimizer state {_gib(self.optimizer_bytes_per_device)}; largest parameter shard "
            f"{self.largest_param_shard[0]} ({_gib(self.largest_param_shard[1])})",
            compiled,
            f"collectives in the step: {coll}",
            f"model     {_count(self.flops_per_token)} FLOP/token (training, active parameters)",
        ]


def _count(n: float, billions: str = "G") -> str:
    return f"{n / 1e9:.2f}{billions}" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


_COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def _collectives(hlo_text: str) -> dict:
    """Counts of collective ops in optimized HLO (async start/done pairs count once)."""
    counts = {}
    for op in _COLLECTIVES:
        n = len(re.findall(rf"\s{op}(?:-start)?\(", hlo_text))
        if n:
            counts[op] = n
    return counts


def _shard_bytes(sds) -> int:
    shape = sds.sharding.shard_shape(sds.shape) if sds.sharding is not None else sds.shape
    return int(np.prod(shape)) * jnp.dtype(sds.dtype).itemsize


def dry_run(cfg: Config, device_memory_gib: float | None = None) -> PlanReport:
    """Lower and compile the configured train step on abstract inputs; see the module docstring.

    `auto` layer settings (remat_policy, scan_layers) are resolved as the trainer resolves them, against the
    devices' memory limit, or where they report none (CPU) `device_memory_gib` (default: an H100's 80 GiB) times
    JAX's memory fraction; `device_memory_gib` also overrides what a GPU reports, to plan for another one."""
    from xorl_jax.data.pipeline import row_length
    from xorl_jax.kernels.attention import SMALL_SEGMENTS, slots_for
    from xorl_jax.models.loading import abstract_model
    from xorl_jax.optim import params_with_path
    from xorl_jax.parallel import rules as rules_lib
    from xorl_jax.train_setup import (abstract_batch, jit_train_step, loss_config_for, model_and_mesh,
                                      opt_state_shardings, optimizer_for)
    from xorl_jax.train_step import TrainState

    if cfg.lora.enable_lora:
        raise ConfigError("--dry-run covers full fine-tuning; set lora.enable_lora=false to plan the base model")
    t = cfg.train
    hf_config, cls, mcfg, options, mesh, rules = model_and_mesh(cfg)
    with rules_lib.use_mesh(mesh, rules):
        abstract = abstract_model(cls, mcfg, options)
    rules_lib.check_replicated(abstract, mesh, rules)
    shardings = rules_lib.param_shardings(abstract, mesh, rules)
    state = nnx.state(abstract)
    pdt = jnp.dtype(options.param_dtype)
    values, treedef = jax.tree.flatten(state)  # same leaf order as the shardings' tree (one per Param)
    params = treedef.unflatten([jax.ShapeDtypeStruct(v.shape, pdt, sharding=s)
                                for v, s in zip(values, jax.tree.leaves(shardings), strict=True)])
    leaves = [(names, x) for names, x, _ in params_with_path(params)]
    param_count = int(sum(np.prod(x.shape) for _, x in leaves))
    path, biggest = max((("/".join(names), _shard_bytes(x)) for names, x in leaves), key=lambda kv: kv[1])

    _, optimizer = optimizer_for(cfg, params, max(t.max_steps or 1000, 1))
    opt_shardings = opt_state_shardings(optimizer, params, mesh)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(optimizer.init, params), opt_shardings)
    replicated = NamedSharding(mesh, P())
    counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    train_state = TrainState(step=counter, params=params, opt_state=opt_state, nonfinite_streak=counter,
                             skipped_total=counter)

    micro_rows = t.micro_batch_size * rules_lib.data_parallel_size(mesh)
    seq = row_length(cfg.data)  # sample_packing_sequence_len padded to pad_to_multiple_of, as the trainer's rows
    batch = abstract_batch(cfg, mesh)
    loss_cfg = loss_config_for(cfg, mcfg, options)
    # The step the trainer compiles for rows of up to SMALL_SEGMENTS documents (its usual packed attention layout;
    # larger layouts keep tensors of the same shapes), not the device-side choice among layouts, whose residuals
    # would inflate the memory estimate.
    doc_slots = slots_for(SMALL_SEGMENTS) if abstract.options.attn_implementation == "cudnn" else None

    def compile_step(graphdef):
        step_fn = jit_train_step(graphdef, optimizer, loss_cfg, train_state, mesh, rules, doc_slots=doc_slots)
        t0 = time.perf_counter()
        compiled = step_fn.lower(train_state, batch).compile()
        return compiled, time.perf_counter() - t0

    platform = jax.devices()[0].platform
    limit = autotune.device_limit() if device_memory_gib is None else None
    if limit is None:
        limit = autotune.planning_limit(device_memory_gib)
    # The jnp stand-ins keep what the GPU kernels do not (the attention reference its [T, T] scores): Qwen3 1.7B at
    # 4 x 4096, dots_attention_saveable unrolled, planned 180 GiB on fake CPU devices and 51.2 GiB on an H100.
    note = ("CPU stand-ins for the GPU kernels plan more than a GPU needs, so this leans to less memory than a GPU run; "
            "--dry-run on the GPU plans exactly") if platform == "cpu" else ""
    layers, planned = autotune.choose_layer_settings(cfg, abstract, compile_step, limit=limit, note=note)
    compiled, compile_s = planned if planned is not None else compile_step(nnx.graphdef(abstract))
    return PlanReport(
        model_type=str(hf_config.get("model_type")), param_count=param_count, mesh=dict(mesh.shape),
        platform=jax.devices()[0].platform, tokens_per_step=t.gradient_accumulation_steps * micro_rows * seq,
        param_bytes_per_device=sum(_shard_bytes(x) for _, x in leaves),
        optimizer_bytes_per_device=sum(_shard_bytes(x) for x in jax.tree.leaves(opt_state)),
        largest_param_shard=(path, biggest), compile_s=compile_s, memory=autotune.memory_of(compiled),
        flops_per_token=float(mcfg.flops_per_token(seq)), collectives=_collectives(compiled.as_text()),
        layers=layers,
    )
