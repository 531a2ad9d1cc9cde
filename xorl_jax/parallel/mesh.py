"""The device mesh, built from xorl's parallel-size fields.

Mesh axes, outermost first: `data` (replicas, HSDP's replicate dimension), `fsdp` (parameter shards that are
not expert groups), `ring` (ring-attention ranks), `expert` (expert-parallel ranks), `ulysses` (Ulysses ranks),
`tensor` (tensor-parallel ranks).

Context parallelism (`ring`, `ulysses`) splits each row's tokens; as in xorl its ranks come on top of the
data-parallel ones (world = replicate x shard x ring x ulysses x tensor) and the rows of a step are split over
data x fsdp x expert only. Parameters shard over the context ranks as well (xorl's default cp_fsdp_mode "all").

xorl's `data_parallel_shard_size` counts every FSDP rank, expert ranks included: the expert axis is carved out of
the FSDP group (dense parameters shard over `fsdp` x `expert`; expert weights put experts on `expert` and shard
the rest over `fsdp`). So with 8 devices, `data_parallel_shard_size: 8, expert_parallel_size: 4` gives
mesh {data: 1, fsdp: 2, expert: 4, tensor: 1}.

Device order keeps `tensor`, `ulysses` and `expert` (the innermost axes: all-to-alls and per-layer collectives)
inside one process (one node), and spreads `data`, then `fsdp`, then `ring` (neighbour-to-neighbour transfers that
overlap compute) across processes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from xorl_jax.parallel.context import row_length_problem, ulysses_heads_problem
from xorl_jax.parallel.context_gdn import gdn_ulysses_problem
from xorl_jax.parallel.sizes import expert_context_span

AXES = ("data", "fsdp", "ring", "expert", "ulysses", "tensor")
SIZE_FIELDS = ("data_parallel_replicate_size", "data_parallel_shard_size", "expert_parallel_size",
               "tensor_parallel_size", "ringattn_parallel_size", "ulysses_parallel_size")
_OUTER = (0, 1, 2)  # data, fsdp, ring: the axes that may span processes


class MeshError(ValueError):
    """Parallel sizes that do not fit the devices or the model."""


def _parse_size(name: str, value) -> int | None:
    """An int >= 1, or None for 'fill the rest' (-1 / 'auto')."""
    if value is None or value == -1 or (isinstance(value, str) and value.lower() == "auto"):
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise MeshError(f"train.{name} must be a positive integer, -1 or 'auto', got {value!r}") from None
    if value < 1:
        raise MeshError(f"train.{name} must be a positive integer, -1 or 'auto', got {value}")
    return value


def resolve_sizes(num_devices: int, *, data_parallel_replicate_size=1, data_parallel_shard_size=-1,
                  expert_parallel_size=1, tensor_parallel_size=1, ringattn_parallel_size=1,
                  ulysses_parallel_size=1) -> dict[str, int]:
    """{mesh axis: size} from xorl's fields; at most one field may be -1/'auto' and takes what the others leave
    (the context-parallel sizes are always explicit)."""
    context = {}
    for name, value in (("ringattn_parallel_size", ringattn_parallel_size),
                        ("ulysses_parallel_size", ulysses_parallel_size)):
        size = _parse_size(name, value)
        if size is None:
            raise MeshError(f"train.{name} must be a positive integer, got {value!r}")
        context[name] = size
    cp = context["ringattn_parallel_size"] * context["ulysses_parallel_size"]
    if num_devices % cp:
        raise MeshError(f"train.ringattn_parallel_size {context['ringattn_parallel_size']} x "
                        f"train.ulysses_parallel_size {context['ulysses_parallel_size']} = {cp} does not divide the "
                        f"{num_devices} device(s); run on a multiple of {cp} devices or lower these sizes")
    num_devices //= cp
    raw = dict(data_parallel_replicate_size=data_parallel_replicate_size,
               data_parallel_shard_size=data_parallel_shard_size,
               expert_parallel_size=expert_parallel_size, tensor_parallel_size=tensor_parallel_size)
    sizes = {k: _parse_size(k, v) for k, v in raw.items()}
    auto = [k for k, v in sizes.items() if v is None]
    if len(auto) > 1:
        raise MeshError(f"only one of {', '.join('train.' + k for k in auto)} may be -1/'auto'; "
                        "set the others to explicit sizes")
    rep, tp = sizes["data_parallel_replicate_size"], sizes["tensor_parallel_size"]
    shard, ep = sizes["data_parallel_shard_size"], sizes["expert_parallel_size"]
    if auto == ["expert_parallel_size"]:
        ep = shard  # experts spread over the whole FSDP group
    elif auto:
        known = math.prod(v for k, v in sizes.items() if v is not None and k != "expert_parallel_size")
        if num_devices % known:
            raise MeshError(f"{num_devices} devices are not divisible by the product of the fixed parallel sizes "
                            f"({known}); change {', '.join('train.' + k for k in SIZE_FIELDS)}")
        fill = num_devices // known
        if auto == ["data_parallel_shard_size"]:
            shard = fill
        elif auto == ["data_parallel_replicate_size"]:
            rep = fill
        else:
            tp = fill
    if rep * shard * tp != num_devices:
        cp_note = f" ({num_devices * cp} / {cp} context-parallel ranks)" if cp > 1 else ""
        raise MeshError(f"train.data_parallel_replicate_size {rep} x train.data_parallel_shard_size {shard} x "
                        f"train.tensor_parallel_size {tp} = {rep * shard * tp}, but the run has {num_devices} "
                        f"device(s){cp_note}; make the product equal the device count (or set one size to -1)")
    ring, ulysses = context["ringattn_parallel_size"], context["ulysses_parallel_size"]
    span = expert_context_span(ep, shard, {"ring": ring, "ulysses": ulysses})
    if span is None:
        filled = f" (-1: what {num_devices} device(s) leave)" if auto == ["data_parallel_shard_size"] else ""
        raise MeshError(f"train.expert_parallel_size {ep} must divide train.data_parallel_shard_size {shard}{filled}"
                        + (f", or be such a divisor times ulysses_parallel_size {ulysses} and/or "
                           f"ringattn_parallel_size {ring}" if ring * ulysses > 1 else "")
                        + " (expert ranks are carved out of the FSDP group and the context-parallel ranks); lower "
                        "train.expert_parallel_size or run on more devices")
    expert = ep // math.prod({"ring": ring, "ulysses": ulysses}[a] for a in span)
    return {"data": rep, "fsdp": shard // expert, "ring": ring, "expert": expert, "ulysses": ulysses, "tensor": tp}


def check_model_fits(sizes: dict[str, int], model_config: Any) -> None:
    """Clear errors when experts or heads do not split evenly over the expert / tensor / ulysses axes."""
    if model_config is None:
        return
    tp = sizes.get("tensor", 1)
    ep = sizes.get("expert_ranks", sizes.get("expert", 1))
    experts = getattr(model_config, "num_experts", 0) or 0
    if ep > 1 and not experts:
        raise MeshError(f"train.expert_parallel_size {ep} > 1 but the model has no experts; set it to 1")
    if ep > 1 and experts % ep:
        raise MeshError(f"num_experts {experts} (config.json) is not divisible by train.expert_parallel_size "
                        f"{ep}; pick an expert_parallel_size that divides it")
    ulysses = sizes.get("ulysses", 1)
    heads, kv_heads = getattr(model_config, "num_attention_heads", 0), getattr(model_config, "num_key_value_heads", 0)
    problem = ulysses_heads_problem(heads, kv_heads or heads, tp, ulysses) if heads else None
    if problem:
        raise MeshError(f"config.json: {problem}; pick a ulysses_parallel_size that divides the heads, or split "
                        f"the sequence with train.ringattn_parallel_size instead")
    value_heads = getattr(model_config, "linear_num_value_heads", 0) or 0
    # the Gated DeltaNet core is not split over the tensor axis: its whole head count splits over the Ulysses ranks
    problem = gdn_ulysses_problem(value_heads, ulysses) if value_heads else None
    if problem:
        raise MeshError(f"config.json: {problem}")
    if tp > 1:  # the family names what tensor parallelism splits (models.base.FamilyConfig)
        for field, n in model_config.tensor_parallel_divisors().items():
            if n and n % tp:
                raise MeshError(f"{field} {n} (config.json) is not divisible by train.tensor_parallel_size "
                                f"{tp}; pick a tensor_parallel_size that divides it")


def check_row_length(tokens: int, mesh: Mesh) -> None:
    """A clear error when the data's rows cannot be split over the mesh's context-parallel ranks."""
    problem = row_length_problem(tokens, int(mesh.shape.get("ring", 1)), int(mesh.shape.get("ulysses", 1)))
    if problem:
        raise MeshError(f"train.ringattn_parallel_size / ulysses_parallel_size: {problem}")


def _device_array(shape: tuple[int, ...], devices) -> np.ndarray:
    n_proc = len({d.process_index for d in devices})
    if n_proc == 1:
        return np.asarray(devices).reshape(shape) if devices[0].platform == "cpu" else \
            mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    # Several processes: processes (nodes) go on the outer axes, data first then fsdp.
    per_proc = len(devices) // n_proc
    dcn = [1] * len(shape)
    left = n_proc
    for i in _OUTER:  # data, fsdp, ring
        g = math.gcd(shape[i], left)
        dcn[i], left = g, left // g
    if left != 1:
        raise MeshError(f"{n_proc} processes cannot be laid over data x fsdp x ring = {shape[0]} x {shape[1]} x "
                        f"{shape[2]} with expert, ulysses and tensor groups inside one process ({per_proc} devices "
                        f"each); make expert_parallel_size x ulysses_parallel_size x tensor_parallel_size divide "
                        f"{per_proc}")
    ici = [s // d for s, d in zip(shape, dcn)]
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, process_is_granule=True,
                                                allow_split_physical_axes=True)


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(sizes[a] for a in AXES)
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, found {len(devices)}")
    arr = _device_array(shape, devices)
    try:
        from jax.sharding import AxisType

        return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    except (ImportError, TypeError):
        return Mesh(arr, AXES)


def build_mesh(train_cfg: Any = None, *, model_config: Any = None, devices=None, **sizes) -> Mesh:
    """The mesh for a `train` config section (or keyword sizes), checked against the model's experts and heads."""
    fields = {k: getattr(train_cfg, k) for k in SIZE_FIELDS if train_cfg is not None and hasattr(train_cfg, k)}
    fields.update(sizes)
    devices = list(devices if devices is not None else jax.devices())
    resolved = resolve_sizes(len(devices), **fields)
    ep = _parse_size("expert_parallel_size", fields.get("expert_parallel_size", 1))
    check_model_fits({**resolved, "expert_ranks": ep or resolved["expert"]}, model_config)
    return make_mesh(resolved, devices)
