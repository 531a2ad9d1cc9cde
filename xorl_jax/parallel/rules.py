"""THE table from logical axis names to mesh axes, its presets, and the helpers that apply it.

Parameters name their dimensions in the nnx metadata key `axes` (e.g. ("layers", "embed", "mlp")); activations
name theirs when calling `constrain(x, ("batch", "seq", "embed"))`. Parameters and activations use separate
tables because the same name means different things: a parameter's `embed` dimension is sharded by FSDP, an
activation's `embed` dimension is not.

Presets (mesh axes of size 1 are harmless, so the presets only differ in which names they map):
- `fsdp` (ZeRO-3): every parameter's `embed` dimension over fsdp x expert; batch over data x fsdp x expert.
- `hsdp`: the same table; the `data` mesh axis replicates (set data_parallel_replicate_size > 1).
- `tp`: fsdp plus Megatron-style tensor parallelism: column-parallel q/k/v and gate/up (`heads`, `kv_heads`,
  `mlp` over tensor), row-parallel o/down (the same names on their input side), vocab-parallel embedding and
  LM head (`vocab` over tensor), expert intermediate (`expert_mlp`) over tensor.
- `ep`: fsdp plus experts (`expert`) over the expert axis; expert weights' `embed` then shards over fsdp only.
- `full`: all of the above; what `rules_for` returns, since unused axes have size 1.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xorl_jax.parallel.sizes import expert_context_span

BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes that split the batch
SEQ_AXES = ("ring", "ulysses")  # mesh axes that split the sequence (context parallelism; parallel/context.py)

MeshAxes = Any  # None | str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical name -> mesh axes, for parameters and for activations. Names absent from a table are replicated."""

    params: Mapping[str, MeshAxes]
    activations: Mapping[str, MeshAxes]
    name: str = "custom"


# Parameters shard over the context-parallel axes too (xorl's cp_fsdp_mode "all"): those ranks hold the same rows.
_FSDP_PARAMS = {"embed": ("fsdp", "expert") + SEQ_AXES}
_TP_PARAMS = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "expert_mlp": "tensor",
              "gdn_heads": "tensor"}
_EP_PARAMS = {"expert": "expert"}
# "tokens": a flattened [B * T] token dimension, split as B (batch axes) then T (sequence axes) are.
_ACTIVATIONS = {"batch": BATCH_AXES, "seq": SEQ_AXES, "tokens": BATCH_AXES + SEQ_AXES, "embed": None}
_TP_ACTIVATIONS = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


def _preset(name: str, *parts_params, tp: bool = False) -> Rules:
    params: dict = {}
    for part in parts_params:
        params.update(part)
    acts = dict(_ACTIVATIONS, **(_TP_ACTIVATIONS if tp else {}))
    return Rules(params=params, activations=acts, name=name)


PRESETS = {
    "fsdp": _preset("fsdp", _FSDP_PARAMS),
    "hsdp": _preset("hsdp", _FSDP_PARAMS),
    "tp": _preset("tp", _FSDP_PARAMS, _TP_PARAMS, tp=True),
    "ep": _preset("ep", _EP_PARAMS, _FSDP_PARAMS),
    "full": _preset("full", _EP_PARAMS, _FSDP_PARAMS, _TP_PARAMS, tp=True),
}


def get_rules(rules: Rules | str | None) -> Rules:
    if rules is None:
        return PRESETS["full"]
    if isinstance(rules, Rules):
        return rules
    if rules not in PRESETS:
        raise ValueError(f"unknown sharding preset {rules!r}; use one of {sorted(PRESETS)}")
    return PRESETS[rules]


def rules_for(train_cfg: Any = None, mesh: Mesh | None = None) -> Rules:
    """The rules for a `train` config section: `full` (every strategy; mesh axes of size 1 cost nothing). With the
    run's `mesh`: experts also over the context axes when expert_parallel_size asks for more ranks than the `expert`
    axis has (`expert_context_span`)."""
    rules = get_rules(getattr(train_cfg, "sharding_preset", None))
    ep = getattr(train_cfg, "expert_parallel_size", 1)
    if mesh is None or not isinstance(ep, int) or ep <= mesh.shape.get("expert", 1):
        return rules
    span = expert_context_span(ep, int(mesh.shape.get("expert", 1)), mesh.shape) or ()
    return with_expert_axes(rules, ("expert",) + span)


def with_expert_axes(rules: Rules, axes: tuple[str, ...]) -> Rules:
    """`rules` with the experts of expert weights spread over mesh `axes` (e.g. ("expert", "ulysses"))."""
    return dataclasses.replace(rules, params={**rules.params, "expert": axes}, name=f"{rules.name}+experts")


# ------------------------------------------------------------------------------------------------ specs
def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names, table: Mapping[str, MeshAxes], mesh: Mesh | None = None, shape=None) -> P:
    """PartitionSpec for logical `names`. A mesh axis is used by at most one dimension (the first that asks);
    with `mesh` and `shape`, mesh axes that do not divide the dimension (or have size 1) are dropped."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = [a for a in _as_tuple(table.get(name)) if name is not None and a not in used]
        if mesh is not None:
            axes = [a for a in axes if a in mesh.shape and mesh.shape[a] > 1]
            if shape is not None:
                kept, prod = [], 1
                for a in axes:
                    if shape[i] % (prod * mesh.shape[a]) == 0:
                        kept.append(a)
                        prod *= mesh.shape[a]
                axes = kept
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def logical_to_sharding(axes, mesh: Mesh, rules: Rules | str | None = None, shape=None) -> NamedSharding:
    """NamedSharding of a parameter with logical `axes` (and, optionally, its `shape` to drop non-dividing axes)."""
    return NamedSharding(mesh, logical_to_spec(axes, get_rules(rules).params, mesh, shape))


def _var_sharding(var, mesh, rules):
    axes = var.get_metadata().get("axes")
    if axes is None:
        return NamedSharding(mesh, P())
    return logical_to_sharding(axes, mesh, rules, shape=var.shape)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Rules | str | None = None, filter=nnx.Param):
    """A state of NamedShardings matching `nnx.state(model, filter)`: the trainer's jit in/out shardings.
    Variables without `axes` metadata are replicated."""
    rules = get_rules(rules)
    state = nnx.state(model, filter)
    return jax.tree.map(lambda v: _var_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | str | None = None, *, check: bool = True) -> None:
    """Place every parameter of `model` (in place) with the NamedSharding its `axes` ask for."""
    rules = get_rules(rules)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(jax.device_put(var.get_value(), _var_sharding(var, mesh, rules)))
    if check:
        check_replicated(model, mesh, rules)


def replicated_params(model: nnx.Module, mesh: Mesh, rules: Rules | str | None = None, *,
                      min_elements: int = 1 << 20) -> list[str]:
    """Paths of parameters with at least `min_elements` that the rules leave fully replicated on a mesh of > 1
    device: each device would hold the whole tensor, which is almost always a missing rule."""
    if mesh.size == 1:
        return []
    rules = get_rules(rules)
    bad = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if math.prod(var.shape) < min_elements:
            continue
        if _var_sharding(var, mesh, rules).is_fully_replicated:
            bad.append(".".join(map(str, path)) + f" {tuple(var.shape)} axes={var.get_metadata().get('axes')}")
    return bad


def check_replicated(model, mesh, rules=None, *, min_elements: int = 1 << 20) -> None:
    bad = replicated_params(model, mesh, rules, min_elements=min_elements)
    if bad:
        raise ValueError(f"{len(bad)} large parameters would be replicated on every device under rules "
                         f"{get_rules(rules).name!r} with mesh {dict(mesh.shape)}, e.g. {bad[:3]}; "
                         f"add their logical axis names to the rules table or fix their `axes`")


# ------------------------------------------------------------------------------------------------ context
@dataclasses.dataclass(frozen=True)
class ParallelContext:
    mesh: Mesh
    rules: Rules

    def axis_size(self, axis: str) -> int:
        return int(self.mesh.shape.get(axis, 1))

    def expert_axes(self) -> tuple[str, ...]:
        """The mesh axes (of size > 1) that expert weights' experts are split over: expert parallelism when any."""
        return tuple(a for a in self.param_axes("expert") if self.axis_size(a) > 1)

    def param_axes(self, name: str) -> tuple[str, ...]:
        """The mesh axes that the parameters' logical axis `name` (e.g. "vocab", "embed") is split over."""
        return _as_tuple(self.rules.params.get(name))


_CONTEXT: contextvars.ContextVar[ParallelContext | None] = contextvars.ContextVar("xorl_parallel", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | str | None = None):
    """Run (trace) model code under `mesh` and `rules`: enables `constrain` and the expert-parallel MoE path."""
    token = _CONTEXT.set(ParallelContext(mesh, get_rules(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


@contextlib.contextmanager
def without_mesh():
    """Trace code as if outside `use_mesh` (inside a shard_map body: local kernels, no constraints)."""
    token = _CONTEXT.set(None)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current() -> ParallelContext | None:
    return _CONTEXT.get()


def constrain(x, names):
    """Constrain activation `x` to the sharding its logical `names` ask for; a no-op outside `use_mesh`."""
    ctx = _CONTEXT.get()
    if ctx is None or ctx.mesh.size == 1:
        return x
    spec = logical_to_spec(names, ctx.rules.activations, ctx.mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def shard_map_compat(f, mesh, in_specs, out_specs):
    """`jax.shard_map` where it exists (JAX >= 0.7), else the experimental one; replication checks off."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def per_shard(fn, in_names, out_names):  # one output, named like an input
    """`fn` run on each device's shard of its arguments, split by logical activation names (None = replicated
    argument); a plain call outside `use_mesh`. For kernels XLA cannot partition (Pallas, Triton: it would
    gather their inputs onto every device) and for sequential loops that must not hold collectives."""

    def wrapped(*args):
        ctx = _CONTEXT.get()
        if ctx is None or ctx.mesh.size == 1:
            return fn(*args)
        spec = lambda names: P() if names is None else logical_to_spec(names, ctx.rules.activations)  # noqa: E731
        in_specs = tuple(spec(n) for n in in_names)
        for a, s in zip(args, in_specs):  # every split dimension must divide evenly, else run unsplit
            for dim, axes in zip(a.shape, s):
                if axes is not None and dim % int(np.prod([ctx.mesh.shape[x] for x in _as_tuple(axes)])):
                    return fn(*args)
        return shard_map_compat(fn, ctx.mesh, in_specs, spec(out_names))(*args)

    return wrapped


# ------------------------------------------------------------------------------------------------ batches
def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (data x fsdp x expert)."""
    return int(np.prod([mesh.shape.get(a, 1) for a in BATCH_AXES]))


def context_parallel_size(mesh: Mesh) -> int:
    """How many ways each row's tokens are split (ring x ulysses)."""
    return int(np.prod([mesh.shape.get(a, 1) for a in SEQ_AXES]))


def _axes_entry(mesh: Mesh, names) -> MeshAxes:
    axes = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Sharding of a [..., B, T] batch array: `leading_axes` unsplit dimensions (e.g. accumulation), then B
    split over data x fsdp x expert and T over the context-parallel axes (ring x ulysses)."""
    seq = _axes_entry(mesh, SEQ_AXES)
    return NamedSharding(mesh, P(*([None] * leading_axes), _axes_entry(mesh, BATCH_AXES),
                                 *([seq] if seq is not None else [])))
