"""Dry run: check a training config against a mesh without weights, data or accelerators.

    python -m xorl_jax.train --config configs/qwen3_30b_a3b_ep8.yaml --dry-run --fake-devices 8

Builds the mesh and the sharding rules, the model's shapes (no memory), parameter and optimizer shardings, and
lowers and compiles the real train step for the configured batch, with the trainer's own functions: full fine-tuning,
or LoRA (the frozen base in model.param_dtype as an argument of the step, the adapters as the trained parameters with
the only optimizer state, merged per layer group inside the scan as the run merges them). Fails the way a real run
would fail: an impossible mesh, a missing sharding rule (large replicated parameter), a shape that does not
partition, a LoRA target the model does not have.

Kernels: on a GPU the plan compiles what the run compiles. Elsewhere (fake CPU devices) each GPU kernel the run would
take (cuDNN attention, the Triton grouped GEMM, the Pallas gated delta rule; `auto` as a GPU resolves it) is planned
with its jnp reference, which has the same shapes; the `backends` line says so, kernel by kernel, and the config keeps
its meaning.

Memory per device: parameters, gradients and optimizer state exactly (from the shardings); the compiled step's
arguments, temporaries and peak from XLA's memory analysis of the compiled program. On a GPU that analysis is of the
program the run executes and decides the `fits` line. On fake CPU devices it is printed but leans high, by several
times at long sequences (the jnp references keep what the GPU kernels do not: the attention reference its [T, T]
scores, the grouped-GEMM reference a mask and an fp32 product per expert), so there, and wherever a backend reports
no analysis, the verdict uses an estimate for a GPU: the exact state plus `estimate_activation_bytes` plus, for LoRA,
one layer group's merged weights (within +3..+13% of XLA's analysis on an H100, docs/MULTIHOST.md). The `fits` line
compares with the device's memory limit less autotune.MARGIN: the limit the GPU's allocator reports, or where
devices report none an 80 GiB H100 (`--device-memory-gib N` names another GPU), either times JAX's memory fraction.

`remat_policy` / `scan_layers` left at `auto` are resolved as a run resolves them (xorl_jax.autotune), against the
same limit (off a GPU by the same estimate, without compiling the candidates), and the line saying what was picked
is printed.
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
from xorl_jax import lora as lora_lib
from xorl_jax.autotune import peak_bytes
from xorl_jax.config import Config, ConfigError
from xorl_jax.data.pipeline import row_length
from xorl_jax.kernels.attention import LayoutPlanner
from xorl_jax.kernels.gdn import auto_implementation
from xorl_jax.kernels.ring_attention import QUERY_CHUNK
from xorl_jax.layers.moe import MOE_REFERENCE
from xorl_jax.models.loading import abstract_model
from xorl_jax.optim import params_with_path
from xorl_jax.parallel import rules as rules_lib
from xorl_jax.train_setup import (Experiments, abstract_batch, backend_summary, jit_train_step, loss_config_for,
                                  model_and_mesh, opt_state_shardings, optimizer_for)
from xorl_jax.train_step import TrainState

log = logging.getLogger("xorl_jax")


@dataclasses.dataclass
class PlanReport:
    model_type: str
    param_count: int  # the model's parameters (LoRA: the frozen base)
    mesh: dict
    platform: str
    tokens_per_step: int
    param_bytes_per_device: int  # this device's shards of the parameters (LoRA: frozen base + adapters)
    optimizer_bytes_per_device: int
    largest_param_shard: tuple[str, int]  # (path, bytes) of the biggest per-device parameter shard
    compile_s: float
    memory: dict  # XLA's memory analysis of the compiled step: argument/output/temp/alias bytes ({} where none)
    flops_per_token: float
    collectives: dict  # op name -> count in the compiled step (e.g. all-to-all for expert parallelism)
    layers: Any = None  # autotune.Choice: what remat_policy / scan_layers auto picks (its line() None if explicit)
    backends: str = ""  # the kernels configured, what a GPU runs and what this plan compiled
    lora: str = ""  # LoRA: rank, targets, adapter and frozen parameter counts ("" without LoRA)
    trainable_bytes_per_device: int | None = None  # gradients' bytes (None: every parameter is trained)
    activation_bytes: int = 0  # estimate_activation_bytes for the chosen layer settings
    lora_merge_bytes: int = 0  # LoRA: one layer group's merged weights (float32), which the scan step holds
    remat_policy: str = ""
    micro_tokens: int = 0  # tokens of one micro-batch on one device
    limit: autotune.Limit | None = None  # the memory limit the `fits` line compares with

    @property
    def gradient_bytes_per_device(self) -> int:
        return (self.param_bytes_per_device if self.trainable_bytes_per_device is None
                else self.trainable_bytes_per_device)

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state on one device (exact, from the shardings)."""
        return self.param_bytes_per_device + self.gradient_bytes_per_device + self.optimizer_bytes_per_device

    @property
    def estimated_peak(self) -> int:
        return self.state_bytes + self.activation_bytes + self.lora_merge_bytes

    @property
    def exact(self) -> bool:
        """Whether XLA's memory analysis is of the program a run executes (compiled on a GPU, not CPU stand-ins)."""
        return bool(self.memory) and self.platform != "cpu"

    @property
    def peak(self) -> int:
        """The per-device peak the verdict uses: XLA's analysis of the run's program, else the estimate."""
        return peak_bytes(self.memory) if self.exact else self.estimated_peak

    @property
    def usable(self) -> int:
        return int((1.0 - autotune.MARGIN) * self.limit.bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.limit is None else self.peak <= self.usable

    def lines(self) -> list[str]:
        m = self.memory
        grads = self.gradient_bytes_per_device
        if self.trainable_bytes_per_device is None:
            params = f"parameters {_gib(self.param_bytes_per_device)}, gradients ~{_gib(grads)}"
        else:
            params = (f"parameters {_gib(self.param_bytes_per_device)} (frozen base "
                      f"{_gib(self.param_bytes_per_device - grads)}, adapters {_gib(grads)}), gradients ~{_gib(grads)} "
                      "(adapters)")
        where = "on fake CPU devices" if self.platform == "cpu" else f"on {self.platform}"
        if not m:
            compiled = f"compiled  in {self.compile_s:.1f}s {where}; the backend reports no memory analysis"
        else:
            what = ("XLA's memory analysis of this CPU program, which leans high: the jnp references keep more than "
                    "the GPU kernels" if self.platform == "cpu" else "XLA's memory analysis")
            compiled = (f"compiled  in {self.compile_s:.1f}s {where}; per device, {what}: arguments "
                        f"{_gib(m.get('argument', 0))}, temporaries {_gib(m.get('temp', 0))}, "
                        f"peak ~{_gib(peak_bytes(m))}")
        estimate = (f"estimate  ~{_gib(self.estimated_peak)} per device on a GPU: parameters, gradients and optimizer "
                    f"state {_gib(self.state_bytes)} + activations ~{_gib(self.activation_bytes)} (remat "
                    f"{self.remat_policy}, {self.micro_tokens:,} tokens per micro-batch)"
                    + (f" + one layer group's merged LoRA weights {_gib(self.lora_merge_bytes)}"
                       if self.lora_merge_bytes else ""))
        coll = ", ".join(f"{k} x{v}" for k, v in sorted(self.collectives.items())) or "none"
        auto = self.layers.line() if self.layers is not None else None
        return [
            f"dry run   {self.model_type}, {_count(self.param_count, billions='B')} parameters, mesh {self.mesh} "
            f"({self.platform}), {self.tokens_per_step:,} tokens/step",
            *([f"backends  {self.backends}"] if self.backends else []),
            *([f"lora      {self.lora}"] if self.lora else []),
            *([auto] if auto else []),
            f"per device  {params}, optimizer state {_gib(self.optimizer_bytes_per_device)}; largest parameter shard "
            f"{self.largest_param_shard[0]} ({_gib(self.largest_param_shard[1])})",
            compiled,
            *([] if self.exact else [estimate]),
            *([self.fits_line()] if self.limit is not None else []),
            f"collectives in the step: {coll}",
            f"model     {_count(self.flops_per_token)} FLOP/token (training, active parameters)",
        ]

    def fits_line(self) -> str:
        room = (f"{_gib(self.usable)} usable per device ({_gib(self.limit.bytes)}: {self.limit.source}; less "
                f"{autotune.MARGIN:.0%} headroom)")
        if self.exact:
            verdict = "yes" if self.fits else "NO"
            return f"fits      {verdict}: peak ~{_gib(self.peak)} of {room}" + (
                "" if self.fits else "; fewer rows per device (train.micro_batch_size), full remat or more devices")
        upper = peak_bytes(self.memory) if self.memory and self.platform == "cpu" else None
        if upper is not None and upper <= self.usable and self.fits:  # the CPU program, which leans high, fits too
            return f"fits      yes: estimated ~{_gib(self.peak)} and the CPU program's ~{_gib(upper)} of {room}"
        if self.fits:
            bound = (f"; the CPU program's ~{_gib(upper)} does not: --dry-run on the GPU decides"
                     if upper is not None else "")
            return f"fits      likely: estimated ~{_gib(self.peak)} of {room}{bound}"
        return (f"fits      NO (estimate): ~{_gib(self.peak)} over {room}; fewer rows per device "
                "(train.micro_batch_size), full remat or more devices")


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


# ------------------------------------------------------------------------------------------------ kernels
def _uses_gdn(model_config) -> bool:
    return any("linear" in str(kind) for kind in getattr(model_config, "layer_kinds", ()))


def plan_backends(options, model_config, platform: str):
    """(options the plan compiles with, the `backends` line). On a GPU: the run's options and the run's line
    (train_setup.backend_summary; an unavailable kernel fails as the run fails). Elsewhere: every GPU kernel the run
    would take, configured or picked by `auto` as a GPU picks it, is replaced by its jnp reference (same shapes), and
    the line names both; a setting a GPU would refuse is refused here too."""
    if platform == "gpu":
        return options, backend_summary(options)
    parts, planned = [], {}

    def show(kind, name, on_gpu, plan, reference, gpu="a GPU"):
        planned[kind] = plan
        if plan == on_gpu:
            parts.append(f"{kind}={name}" + (f" ({plan})" if name != plan else ""))
            return
        picked = f"{on_gpu} on {gpu}; " if name != on_gpu else ""
        parts.append(f"{kind}={name} ({picked}planned with {reference} on {platform.upper()})")

    attn = options.attn_implementation
    half = jnp.dtype(options.dtype) in (jnp.bfloat16, jnp.float16)
    if attn == "cudnn" and not half:  # what resolve_attn_implementation refuses on a GPU
        raise ConfigError(f"model.attn_implementation 'cudnn' needs bfloat16 or float16 compute, not "
                          f"{jnp.dtype(options.dtype).name}; use model.dtype=bfloat16 or attn_implementation xla "
                          "(or auto)")
    on_gpu = "cudnn" if attn == "cudnn" or (attn == "auto" and half) else "xla"
    show("attention", attn, on_gpu, "xla", "its jnp reference")
    if getattr(model_config, "num_experts", 0):
        moe = options.moe_implementation
        on_gpu = "triton" if moe in ("auto", "triton") else moe  # auto: triton where jax-triton imports ([gpu] extra)
        show("moe", moe, on_gpu, MOE_REFERENCE if on_gpu == "triton" else moe, "its jnp reference",
             gpu="a GPU with jax-triton")
    if _uses_gdn(model_config):
        gdn = options.gdn_implementation
        pow2 = lambda d: d >= 16 and not d & (d - 1)  # noqa: E731 - the Pallas kernels' shape rule (kernels.gdn)
        dims_fit = pow2(model_config.linear_key_head_dim) and pow2(model_config.linear_value_head_dim)
        on_gpu = ("pallas" if dims_fit else "chunked") if gdn == "auto" else gdn
        here = auto_implementation() if gdn == "auto" else gdn
        show("gdn", gdn, on_gpu, "chunked" if on_gpu == "pallas" else here, "its chunked jnp reference")
    replace = {f"{k}_implementation": v for k, v in (("attn", planned["attention"]), ("moe", planned.get("moe")),
                                                      ("gdn", planned.get("gdn"))) if v is not None}
    return dataclasses.replace(options, **replace), ", ".join(parts)


# ------------------------------------------------------------------------------------------------ memory estimate
def ring_block_bytes(model_config, mesh_shape, rows: int, seq: int) -> int:
    """Ring attention's working set on one device, beyond `estimate_activation_bytes`: each ring step is the jnp
    reference on a ring block (S = seq / R tokens) a query chunk at a time, whose float32 scores, probabilities and
    their gradient (3 x [rows, heads / U, chunk, S]) live while one layer's backward runs; 0 without a ring."""
    ring, ulysses = int(mesh_shape.get("ring", 1)), int(mesh_shape.get("ulysses", 1))
    if ring == 1:
        return 0
    heads = int(getattr(model_config, "num_attention_heads", 0)) // max(1, ulysses * int(mesh_shape.get("tensor", 1)))
    block = seq // ring
    return 3 * rows * max(1, heads) * min(block, QUERY_CHUNK) * block * 4


def estimate_activation_bytes(cfg: Config, model_config, options, tokens: int) -> int:
    """Rough bytes one device keeps for a micro-batch of `tokens` beyond its parameters, gradients and optimizer state,
    for a GPU run (the fused kernels keep no [T, T] scores): the activations each layer saves under the remat policy
    (`full`: the layer input; otherwise its projection, MLP / routed-expert outputs as well), one layer's float32
    working set (what the backward recomputes) and one loss chunk's float32 logits and their gradient. Checked against
    XLA's analysis on an H100 (docs/MULTIHOST.md)."""
    D = int(getattr(model_config, "hidden_size", 0))
    L = int(getattr(model_config, "num_hidden_layers", 0))
    V = int(getattr(model_config, "vocab_size", 0))
    if getattr(model_config, "num_experts", 0):  # routed copies: gathered input, gate/up, SwiGLU and down outputs
        routed = int(model_config.num_experts_per_tok) * (2 * D + 3 * int(model_config.moe_intermediate_size))
        dense_f = int(getattr(model_config, "shared_expert_intermediate_size", 0) or 0)
    else:
        routed, dense_f = 0, int(getattr(model_config, "intermediate_size", 0))
    width = 6 * D + 3 * dense_f + routed  # per token: q, k, v, attention and o_proj outputs, residual; the MLP's
    saved = D if options.remat_policy == "full" else width
    c = jnp.dtype(options.dtype).itemsize
    return tokens * (L * saved * c + width * 4) + 2 * min(tokens, cfg.train.ce_chunk_size) * V * 4


def _merged_group_bytes(params, targets) -> int:
    """LoRA: bytes per device of one scan step's merged weights (W + scale * A @ B in float32, lora.layer_merge_fn)
    over the adapted parameters: a stacked weight's shard without its layers axis."""
    shards = {tuple(names): x for names, x, _ in params_with_path(params)}
    total = 0
    for path in {t.param_path for t in targets}:
        x = shards[path]
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape[1:])) * 4  # the leading axis is the layer groups' repeats
    return total


# ------------------------------------------------------------------------------------------------ the plan
def dry_run(cfg: Config, device_memory_gib: float | None = None, experiments: Experiments = Experiments()
            ) -> PlanReport:
    """Lower and compile the configured train step on abstract inputs; see the module docstring.

    `auto` layer settings (remat_policy, scan_layers) are resolved as the trainer resolves them, against the
    devices' memory limit, or where they report none (CPU) `device_memory_gib` (default: an H100's 80 GiB) times
    JAX's memory fraction; `device_memory_gib` also overrides what a GPU reports, to plan for another one. The
    `fits` verdict uses the same limit. `experiments`: benchmarks' switches, as the trainer takes them."""
    t = cfg.train
    platform = jax.devices()[0].platform
    hf_config, cls, mcfg, options, mesh, rules = model_and_mesh(cfg)
    options, backends = plan_backends(experiments.model_options(options), mcfg, platform)
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
    base_bytes = sum(_shard_bytes(x) for _, x in leaves)

    # What the step trains: every parameter, or (LoRA, as Trainer._setup_model builds it) the adapters, with the
    # frozen base passed to the step as an argument and merged per layer group inside the scan.
    merge_fn, extra, lora_line, trainable_bytes, merge_bytes = None, (), "", None, 0
    trained = params
    if cfg.lora.enable_lora:
        targets = lora_lib.lora_targets(params, cfg.lora)
        trained = lora_lib.abstract_lora(params, targets, cfg.lora.lora_rank, mesh=mesh, rules=rules)
        merge_fn = lora_lib.layer_merge_fn(targets, lora_lib.lora_scale(cfg.lora))
        extra = (params,)
        trainable_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(trained))
        merge_bytes = _merged_group_bytes(params, targets)
        lora_line = (f"rank {cfg.lora.lora_rank}, alpha {cfg.lora.lora_alpha:g}: "
                     f"{_count(lora_lib.count_lora_params(trained))} adapter parameters (float32) trained on "
                     f"{', '.join(sorted({x.hf_name for x in targets}))}; base {_count(param_count, billions='B')} "
                     f"parameters frozen ({pdt.name})")

    _, optimizer = optimizer_for(cfg, trained, max(t.max_steps or 1000, 1))
    opt_shardings = opt_state_shardings(optimizer, trained, mesh)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(optimizer.init, trained), opt_shardings)
    replicated = NamedSharding(mesh, P())
    counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    train_state = TrainState(step=counter, params=trained, opt_state=opt_state, nonfinite_streak=counter,
                             skipped_total=counter)

    micro_rows = t.micro_batch_size * rules_lib.data_parallel_size(mesh)
    seq = row_length(cfg.data)  # sample_packing_sequence_len padded to pad_to_multiple_of, as the trainer's rows
    batch = abstract_batch(cfg, mesh)
    loss_cfg = loss_config_for(cfg, mcfg, options)
    # The step the trainer compiles for rows of up to SMALL_SEGMENTS documents (its usual packed attention layout;
    # larger layouts keep tensors of the same shapes), not the device-side choice among layouts, whose residuals
    # would inflate the memory estimate.
    layout = (LayoutPlanner(abstract.options.attn_slot_sizes).usual()
              if abstract.options.attn_implementation == "cudnn" else None)

    def compile_step(graphdef):
        step_fn = jit_train_step(graphdef, optimizer, loss_cfg, train_state, mesh, rules, merge_fn=merge_fn,
                                 attention_layout=layout)
        t0 = time.perf_counter()
        compiled = step_fn.lower(train_state, batch, *extra).compile()
        return compiled, time.perf_counter() - t0

    limit = autotune.device_limit() if device_memory_gib is None else None
    if limit is None:
        limit = autotune.planning_limit(device_memory_gib)
    opt_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(opt_state))
    # tokens one device holds: its rows, each split over the context-parallel ranks (ring x ulysses)
    micro_tokens = t.micro_batch_size * seq // rules_lib.context_parallel_size(mesh)
    ring_bytes = ring_block_bytes(mcfg, mesh.shape, t.micro_batch_size, seq)
    # parameters (LoRA: frozen base and adapters), gradients (LoRA: adapters), optimizer state: PlanReport.state_bytes
    state_bytes = base_bytes + (base_bytes if trainable_bytes is None else 2 * trainable_bytes) + opt_bytes

    def estimate(cand):  # PlanReport.estimated_peak of a candidate's layer settings
        opts = dataclasses.replace(abstract.options, remat_policy=cand.remat_policy, scan_layers=cand.scan_layers)
        return state_bytes + estimate_activation_bytes(cfg, mcfg, opts, micro_tokens) + ring_bytes + merge_bytes

    # Off a GPU the compiled program keeps what the GPU kernels do not (the attention reference its [T, T] scores:
    # Qwen3 1.7B at 4 x 4096, dots_attention_saveable unrolled, planned 180 GiB on fake CPU devices and 51.2 GiB on an
    # H100), so `auto` is chosen there by the estimate for a GPU, and only the choice is compiled.
    on_gpu = platform == "gpu"
    note = "" if on_gpu else "estimated for a GPU: parameters, gradients, optimizer state and activations"
    layers, planned = autotune.choose_layer_settings(cfg, abstract, compile_step, limit=limit, note=note,
                                                     estimate=None if on_gpu else estimate)
    compiled, compile_s = planned if planned is not None else compile_step(nnx.graphdef(abstract))
    memory = autotune.memory_of(compiled)
    return PlanReport(
        model_type=str(hf_config.get("model_type")), param_count=param_count, mesh=dict(mesh.shape),
        platform=platform, tokens_per_step=t.gradient_accumulation_steps * micro_rows * seq,
        param_bytes_per_device=base_bytes + (trainable_bytes or 0), optimizer_bytes_per_device=opt_bytes,
        largest_param_shard=(path, biggest), compile_s=compile_s, memory=memory,
        flops_per_token=float(mcfg.flops_per_token(seq)), collectives=_collectives(compiled.as_text()),
        layers=layers, backends=backends, lora=lora_line, trainable_bytes_per_device=trainable_bytes,
        activation_bytes=estimate_activation_bytes(cfg, mcfg, abstract.options, micro_tokens) + ring_bytes,
        lora_merge_bytes=merge_bytes, remat_policy=abstract.options.remat_policy, micro_tokens=micro_tokens,
        limit=limit,
    )
