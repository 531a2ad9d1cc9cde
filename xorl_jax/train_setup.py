"""How a run is set up from its config, without running it: model options, loss and optimizer, shardings of the
optimizer state, the jitted train step under the mesh, and process-level switches (determinism, compilation
cache). Shared by the trainer and the dry run (plan.py)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp

from xorl_jax import autotune
from xorl_jax.checkpoint.hf import CheckpointError
from xorl_jax.checkpoint.orbax import read_hf_config
from xorl_jax.config import Config, ConfigError
from xorl_jax.data.pipeline import row_length
from xorl_jax.kernels.attention import AttentionLayout, resolve_attn_implementation
from xorl_jax.kernels.gdn import auto_implementation as gdn_auto_implementation
from xorl_jax.layers.moe import resolve_moe_implementation
from xorl_jax.models.common import SAVED_NAMES, ModelOptions
from xorl_jax.models.loading import build_config
from xorl_jax.optim import build_optimizer, build_schedule, default_decay_mask, default_muon_dims, map_params_with_path
from xorl_jax.parallel import mesh as mesh_lib
from xorl_jax.parallel import rules as rules_lib
from xorl_jax.parallel.rules import use_mesh
from xorl_jax.train_step import BATCH_KEYS, LAYOUT_KEY, LossConfig, make_train_step

log = logging.getLogger("xorl_jax")


DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"


def request_determinism() -> bool:
    """Add XLA's deterministic-GPU-ops flag to XLA_FLAGS. XLA reads the flags when its backend starts, so this
    only acts before the first device use; returns False (and warns) when it comes too late."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISM_FLAG in flags:
        return True
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISM_FLAG}".strip()
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = False
    if started:
        log.warning("train.enable_full_determinism: JAX had already started, so XLA does not see %s; start the "
                    "run through `python -m xorl_jax.train` (or set XLA_FLAGS before importing JAX)",
                    DETERMINISM_FLAG)
    return not started


def compilation_cache_dir(setting: str | None, backend: str) -> str | None:
    """The persistent compilation cache directory for train.compilation_cache_dir on `backend` (None = off)."""
    if setting == "auto":  # GPU compiles take tens of seconds; CPU ones are quick and would only fill the disk
        setting = "~/.cache/xorl_jax/xla" if backend == "gpu" else None
    return os.path.expanduser(setting) if setting else None


def use_compilation_cache(setting: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory used (None = off)."""
    path = compilation_cache_dir(setting, jax.default_backend())
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # only programs worth keeping
    return path


def model_and_mesh(cfg: Config):
    """(HF config dict, model class, family config, ModelOptions, mesh, rules): what a run is built from, before
    any weight exists."""
    source = cfg.model.config_path or cfg.model.model_path
    if not source:
        raise ConfigError("model.model_path is not set; point it at a HF checkpoint directory (or config dir)")
    hf_config = read_hf_config(source)
    try:
        cls, model_config = build_config(hf_config)
    except CheckpointError as e:  # "config.json: ..." -> the file's path
        where = source if os.path.isfile(source) else os.path.join(source, "config.json")
        raise CheckpointError(f"{where}: {str(e).removeprefix('config.json: ')}") from None
    mesh = mesh_lib.build_mesh(cfg.train, model_config=model_config)
    mesh_lib.check_row_length(row_length(cfg.data), mesh)  # context parallelism splits every row evenly
    return hf_config, cls, model_config, model_options(cfg), mesh, rules_lib.rules_for(cfg.train, mesh)


def model_options(cfg: Config) -> ModelOptions:
    m, t = cfg.model, cfg.train
    if m.ep_dispatch == "ragged" and t.expert_parallel_size not in (1, None) and jax.default_backend() == "cpu":
        raise ConfigError("model.ep_dispatch=ragged needs GPUs (XLA:CPU has no ragged all-to-all); use alltoall")

    # `auto` layer settings start at the least-memory candidate; the trainer and the dry run resolve them once the
    # step can be compiled (xorl_jax.autotune).
    layers = autotune.provisional(*autotune.requested(cfg))
    return ModelOptions(
        dtype=m.dtype if t.enable_mixed_precision else "float32",
        param_dtype=m.param_dtype,
        attn_implementation=m.attn_implementation,
        moe_implementation=m.moe_implementation,
        gdn_implementation=m.gdn_implementation,
        remat_policy=layers.remat_policy,
        scan_layers=layers.scan_layers,
        router_fp32=m.router_fp32,
        train_router=m.train_router,
        ep_exchange={"alltoall": "padded", "ragged": "ragged"}[m.ep_dispatch],
    )


@dataclasses.dataclass(frozen=True)
class Experiments:
    """Switches that benchmarks set (benchmarks/bench_train.py) and configs do not: what the trainer passes on to the
    model options. The defaults are every run's."""

    remat_saved_names: tuple[str, ...] = SAVED_NAMES  # ModelOptions.remat_saved_names
    attn_slot_sizes: tuple[int, ...] | None = None  # ModelOptions.attn_slot_sizes

    def model_options(self, options: ModelOptions) -> ModelOptions:
        return dataclasses.replace(options, remat_saved_names=self.remat_saved_names,
                                   attn_slot_sizes=self.attn_slot_sizes)


def backend_summary(options: ModelOptions) -> str:
    """The configured kernel choices with what `auto` picks on this device, for the run's start-up lines."""
    def show(name, resolved):
        return name if resolved == name else f"{name} ({resolved})"

    gdn = options.gdn_implementation
    attn = options.attn_implementation
    return (f"attention={show(attn, resolve_attn_implementation(attn, options.dtype))}, "
            f"moe={show(options.moe_implementation, resolve_moe_implementation(options.moe_implementation))}, "
            f"gdn={show(gdn, gdn_auto_implementation() if gdn == 'auto' else gdn)}")


class MeshJit:
    """A jitted function that traces (first call, `lower`) under the run's mesh and rules: without them the model
    would trace as one-device code (no expert-parallel all-to-all, no activation constraints, and kernels XLA
    cannot partition would see gathered inputs)."""

    def __init__(self, jitted, mesh, rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args):
        with use_mesh(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with use_mesh(self.mesh, self.rules):
            return self.jitted.lower(*args)


def loss_config_for(cfg: Config, model_config, options: ModelOptions) -> LossConfig:
    """Aux-loss coefficient (the checkpoint's unless the train section sets one), loss chunking, compute dtype,
    logits precision."""
    coef = cfg.train.router_aux_loss_coef
    return LossConfig(aux_loss_coef=float(getattr(model_config, "router_aux_loss_coef", 0.0) if coef is None else coef),
                      ce_chunk_size=cfg.train.ce_chunk_size, compute_dtype=options.compute_dtype,
                      logits_dtype=jnp.float32 if cfg.model.lm_head_fp32 else options.compute_dtype)


def optimizer_for(cfg: Config, params, total_steps: int):
    """(learning-rate schedule, optax optimizer) from the config; `params` may be abstract."""
    t = cfg.train
    trainable = None
    if cfg.model.freeze_router:  # MoE routers get no update and no optimizer state
        trainable = map_params_with_path(lambda names, x, axes: "router" not in names, params)
    schedule = build_schedule(lr=t.lr, lr_min=t.lr_min, total_steps=total_steps, warmup_ratio=t.lr_warmup_ratio,
                              decay_style=t.lr_decay_style, decay_ratio=t.lr_decay_ratio)
    muon = {}
    if t.optimizer == "muon":  # xorl: muon_lr follows the schedule's shape (warmup, decay to lr_min / lr of it)
        log.warning("muon: each HF weight matrix (every layer, expert, gate and up) is orthogonalised whole and "
                    "scaled by its own fan-out / fan-in; xorl orthogonalises fused q/k/v as one, reads expert tensors "
                    "as [E, in, out] and by default each rank's shard (docs/OPTIMIZERS.md)")
        muon = dict(muon_dims=default_muon_dims(params), muon_momentum=t.muon_momentum,
                    muon_nesterov=t.muon_nesterov, muon_ns_steps=t.muon_ns_steps,
                    muon_adjust_lr_fn=t.muon_adjust_lr_fn,
                    muon_schedule=build_schedule(lr=t.muon_lr, lr_min=t.lr_min * t.muon_lr / t.lr,
                                                 total_steps=total_steps, warmup_ratio=t.lr_warmup_ratio,
                                                 decay_style=t.lr_decay_style, decay_ratio=t.lr_decay_ratio))
    optimizer = build_optimizer(schedule=schedule, weight_decay=t.weight_decay, b1=t.adam_beta1, b2=t.adam_beta2,
                                eps=t.adam_epsilon, max_grad_norm=t.max_grad_norm, optimizer=t.optimizer,
                                optimizer_dtype=t.optimizer_dtype, decay_mask=default_decay_mask(params),
                                trainable_mask=trainable, **muon)
    return schedule, optimizer


def opt_state_shardings(optimizer, params, mesh):
    """Shardings of the optimizer state: moments take their parameter's sharding (jit would not infer it: zeros
    depend on no input), scalars such as Adam's count are replicated over the mesh. `params` may be abstract."""
    import optax

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    abstract = jax.eval_shape(optimizer.init, params)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 - frozen parameters (no state) stay empty
    return optax.tree_map_params(optimizer, lambda m, s: m if masked(m) else s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)


def abstract_batch(cfg: Config, mesh, layout: AttentionLayout | None = None) -> dict:
    """A train step's batch as shapes: [accumulation, global micro-batch rows, tokens] int32 arrays sharded as the
    trainer shards them, plus the packed attention layout (LAYOUT_KEY) when `layout` is given."""
    t = cfg.train
    shape = (t.gradient_accumulation_steps, t.micro_batch_size * rules_lib.data_parallel_size(mesh),
             row_length(cfg.data))  # sample_packing_sequence_len padded to pad_to_multiple_of
    sharding = rules_lib.batch_sharding(mesh, leading_axes=1)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}
    if layout is not None:
        batch[LAYOUT_KEY] = layout
    return batch


def jit_train_step(graphdef, optimizer, loss_cfg, state, mesh, rules, *, merge_fn=None,
                   attention_layout: AttentionLayout | None = None) -> MeshJit:
    """The jitted train step for `state` (concrete or abstract): state donated, output shardings fixed to the
    input's so the state comes back exactly as it went in and step 2 does not compile again. `attention_layout`:
    the packed attention layout every batch of this step has, or None (picked on the device)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step = make_train_step(graphdef, optimizer, loss_cfg, merge_fn=merge_fn, attention_layout=attention_layout)
    return MeshJit(jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, replicated)), mesh, rules)


class TrainSteps:
    """The train step, jitted once per packed attention layout that batches arrive with (a batch's LAYOUT_KEY
    entry, planned by the host; absent = the layout picked on the device). Each variant compiles the first time a
    batch needs it; runs see one or two."""

    def __init__(self, graphdef, optimizer, loss_cfg, state, mesh, rules, *, merge_fn=None, frozen=None):
        """With `merge_fn` (LoRA), `frozen` is the base every call passes after the batch (an argument: never a
        baked-in constant, never donated)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        self._make = functools.partial(jit_train_step, graphdef, optimizer, loss_cfg, abstract, mesh, rules,
                                       merge_fn=merge_fn)
        self._extra = () if merge_fn is None else (frozen,)
        self._steps: dict = {}

    def for_batch(self, batch) -> tuple[MeshJit, dict]:
        """(the step for this batch's layout, the batch's arrays)."""
        layout = batch.get(LAYOUT_KEY)
        if layout not in self._steps:
            if self._steps:  # a later variant compiles in the middle of the run: say why the step is slow
                log.info("a batch needs the packed attention layout for %s: compiling the step for it (once)",
                         "the device's choice" if layout is None else layout.describe())
            self._steps[layout] = self._make(attention_layout=layout)
        return self._steps[layout], {k: v for k, v in batch.items() if k != LAYOUT_KEY}

    def __call__(self, state, batch):
        step, arrays = self.for_batch(batch)
        return step(state, arrays, *self._extra)

    def lower(self, state, batch):
        step, arrays = self.for_batch(batch)
        return step.lower(state, arrays, *self._extra)
