"""LoRA in parameter space: low-rank adapters added to frozen base weights, no module changes.

For every targeted weight W (layer-stacked, so its leading "batch" dims are the layers axis and, for routed
experts, the expert axis) we keep an fp32 pair

    A [*batch, in, r]  (random normal / r)      B [*batch, r, out]  (zeros)

and the forward pass uses W_eff = W + (alpha / r) * A @ B, reshaped to W's layout (fp32 when W is stored below fp32).
B = 0 makes step 0 exactly the base model. Only the pairs are trained (and have optimizer state); W stays frozen in
whatever dtype it was loaded in. Training merges per layer group inside the layer scan (`layer_merge_fn`), so one
group's W_eff exists at a time; `merge_lora` merges the whole model (export, inspection).

Names follow HF's module names (PEFT semantics: a target matches a module whose name relative to the decoder layer
equals it or ends with "." + it):
- lora_target_modules: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj (dense MLP layers),
  mlp.shared_expert.{gate,up,down}_proj (Qwen3.5-MoE), linear_attn.{in_proj_qkv,in_proj_z,in_proj_a,in_proj_b,
  out_proj} (Qwen3.5 Gated DeltaNet).
- lora_target_parameters: mlp.experts.gate_up_proj, mlp.experts.down_proj (routed experts: one pair per expert, the
  pair carries the expert axis, so it is sharded with the experts under EP).

Our MLPs fuse gate and up into one `gate_up_proj` [.., D, 2, F] parameter; gate_proj and up_proj still get their own
pair (as in HF/PEFT), each adding into its half of the fused weight. The routed experts' fused `gate_up_proj` gets
one pair whose output is the whole [2, F] (like PEFT's target_parameters on HF's fused [E, 2F, D] tensor).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xorl_jax.config import ConfigError
from xorl_jax.optim import map_params_with_path, params_with_path

log = logging.getLogger("xorl_jax")
BATCH_AXES = ("layers", "expert")


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    hf_name: str  # module name relative to a decoder layer, e.g. "self_attn.q_proj", "mlp.experts.gate_up_proj"
    group: int  # position in the scanned layer pattern (layer i = repeat * period + group)
    param_path: tuple  # path of the base parameter in the model state, e.g. ("layers","groups","0","self_attn","q_proj")
    key: tuple  # path of the pair in the LoRA tree, e.g. ("g0", "self_attn", "q_proj")
    batch_ndim: int  # leading dims with one pair each (layers[, experts])
    in_ndim: int  # input dims after the batch dims
    fused_index: int | None  # 0 (gate) / 1 (up) half of a fused gate_up param, or None
    is_parameter: bool  # a routed-expert parameter target (lora_target_parameters)


# (path relative to the layer, in_ndim, [(hf name, fused index)], is a routed-expert param)
def _layer_specs(rel: tuple, axes: tuple) -> list[tuple[str, int, int | None, bool]]:
    experts = "expert" in axes
    name = ".".join(rel)
    if rel[0] == "self_attn" and rel[-1] in ("q_proj", "k_proj", "v_proj"):
        return [(name, 1, None, False)]
    if rel == ("self_attn", "o_proj") or rel == ("linear_attn", "out_proj"):
        return [(name, 2, None, False)]
    if rel[0] == "linear_attn" and rel[-1] in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"):
        return [(name, 1, None, False)]
    if rel[0] == "mlp" and rel[-1] == "gate_up_proj":
        prefix = ".".join(rel[:-1])
        if experts:
            return [("mlp.experts.gate_up_proj", 1, None, True)]
        return [(prefix + ".gate_proj", 1, 0, False), (prefix + ".up_proj", 1, 1, False)]
    if rel[0] == "mlp" and rel[-1] == "down_proj":
        return [("mlp.experts.down_proj" if experts else name, 1, None, experts)]
    return []


def available_targets(params) -> list[LoraTarget]:
    """Every LoRA-able weight of a model state (nnx.State of nnx.Param), in state order."""
    out = []

    for names, x, axes in params_with_path(params):
        if len(names) < 5 or names[:2] != ("layers", "groups") or axes is None:
            continue
        g, rel = int(names[2]), tuple(names[3:])
        batch = 0
        while batch < len(axes) and axes[batch] in BATCH_AXES:
            batch += 1
        for hf_name, in_ndim, fused, is_param in _layer_specs(rel, tuple(axes)):
            out.append(LoraTarget(hf_name, g, tuple(names), (f"g{g}",) + tuple(hf_name.split(".")), batch, in_ndim,
                                  fused, is_param))
    return out


# Every name any supported family has (for telling a typo from a module this particular model lacks).
KNOWN_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
    "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a", "linear_attn.in_proj_b",
    "linear_attn.out_proj",
)
KNOWN_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_targets(params, lora_cfg) -> list[LoraTarget]:
    """The targets that `lora_cfg` names; ConfigError on a name that matches nothing in this model."""
    if lora_cfg.lora_dropout:
        raise ConfigError(f"lora.lora_dropout={lora_cfg.lora_dropout}: adapter dropout is not supported (LoRA here "
                          "is applied in parameter space, W + BA, where input dropout has no equivalent); set it 0")
    avail = available_targets(params)
    modules = sorted({t.hf_name for t in avail if not t.is_parameter})
    parameters = sorted({t.hf_name for t in avail if t.is_parameter})
    chosen = set()
    for kind, names, valid in (("lora_target_modules", lora_cfg.lora_target_modules, modules),
                               ("lora_target_parameters", lora_cfg.lora_target_parameters, parameters)):
        for target in names or ():
            hit = [n for n in valid if _matches(n, target)]
            known = KNOWN_MODULES if kind == "lora_target_modules" else KNOWN_PARAMETERS
            if not hit and any(_matches(n, target) for n in known):
                log.warning("lora.%s: %r has no layer in this model (skipped)", kind, target)
                continue
            if not hit:
                raise ConfigError(
                    f"lora.{kind}: {target!r} names no layer of this model; valid names: "
                    f"{', '.join(valid) if valid else '(none)'}"
                    + (f" (routed experts go in lora_target_parameters: {', '.join(parameters)})"
                       if kind == "lora_target_modules" and parameters and "expert" in target else ""))
            chosen.update(hit)
    if not chosen:
        raise ConfigError(f"lora: no target matches a layer of this model; valid lora_target_modules: "
                          f"{', '.join(modules)}; valid lora_target_parameters: {', '.join(parameters) or '(none)'}")
    return [t for t in avail if t.hf_name in chosen]


# ------------------------------------------------------------------------------------------------ shapes
def _base_arrays(params) -> dict:
    return {n: (x, a) for n, x, a in params_with_path(params)}


def _dims(t: LoraTarget, shape: tuple) -> tuple[tuple, int, int]:
    """(batch shape, in size, out size) of a target's pair."""
    b = tuple(shape[: t.batch_ndim])
    rest = shape[t.batch_ndim:]
    n_in = int(np.prod(rest[: t.in_ndim]))
    out = rest[t.in_ndim:]
    if t.fused_index is not None:
        out = out[1:]  # drop the fused (gate, up) axis
    return b, n_in, int(np.prod(out))


def _get(tree, key):
    for k in key:
        tree = tree[k]
    return tree


def _set(tree, key, value):
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def init_lora(params, targets: list[LoraTarget], rank: int, seed: int = 0, mesh=None, rules=None) -> dict:
    """The LoRA tree: nested dicts {g<i>: {self_attn: {q_proj: {"lora_A": A, "lora_B": B}}}}, fp32.
    A ~ N(0, 1) / rank, B = 0. With a mesh the batch dims (layers, experts) are sharded like the base weight."""
    base = _base_arrays(params)
    tree: dict = {}
    key = jax.random.PRNGKey(seed)
    for i, t in enumerate(targets):
        x, axes = base[t.param_path]
        b, n_in, n_out = _dims(t, x.shape)
        a_shape, b_shape = b + (n_in, rank), b + (rank, n_out)
        a_fn = lambda k, s=a_shape: jax.random.normal(k, s, jnp.float32) / rank  # noqa: E731
        b_fn = lambda s=b_shape: jnp.zeros(s, jnp.float32)  # noqa: E731
        k = jax.random.fold_in(key, i)
        if mesh is not None:
            from xorl_jax.parallel.rules import logical_to_sharding

            bax = tuple(axes[: t.batch_ndim])
            sa = logical_to_sharding(bax + (None, None), mesh, rules, shape=a_shape)
            sb = logical_to_sharding(bax + (None, None), mesh, rules, shape=b_shape)
            A = jax.jit(a_fn, out_shardings=sa)(k)
            B = jax.jit(b_fn, out_shardings=sb)()
        else:
            A, B = a_fn(k), b_fn()
        _set(tree, t.key, {"lora_A": A, "lora_B": B})
    return tree


def _delta(t: LoraTarget, pair: dict, shape: tuple, batch_ndim: int, scale: float):
    """scale * A @ B in the layout of a base weight of `shape` whose first `batch_ndim` dims carry one pair each
    (the whole stacked weight, or one scan step's slice of it: then the layers axis is gone)."""
    d = scale * jnp.einsum("...ir,...ro->...io", pair["lora_A"].astype(jnp.float32),
                           pair["lora_B"].astype(jnp.float32))
    if t.fused_index is None:
        return d.reshape(shape)
    axis = batch_ndim + t.in_ndim  # the fused (gate, up) axis
    half = d.reshape(shape[:axis] + shape[axis + 1:])
    zeros = jnp.zeros_like(half)
    return jnp.stack([half, zeros] if t.fused_index == 0 else [zeros, half], axis=axis)


def _add_delta(x, d):
    # A bf16 base comes back in fp32, so an update below the weight's bf16 rounding step is not lost before the
    # layer casts to its compute dtype.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32)) + d


def lora_deltas(lora: dict, targets: list[LoraTarget], params, scale: float) -> dict:
    """{param path: fp32 delta with the base weight's shape} (the gate and up halves of a fused weight summed)."""
    shapes = {n: x.shape for n, x, _ in params_with_path(params)}
    deltas: dict = {}
    for t in targets:
        d = _delta(t, _get(lora, t.key), shapes[t.param_path], t.batch_ndim, scale)
        deltas[t.param_path] = deltas[t.param_path] + d if t.param_path in deltas else d
    return deltas


def merge_lora(params, lora: dict, targets: list[LoraTarget], scale: float):
    """The effective parameters W + scale * A @ B of the whole model at once (same structure as `params`).
    Jit-friendly. For export and inspection; training merges one layer group at a time (`layer_merge_fn`).

    A targeted weight stored below fp32 (a bf16 base) comes back in fp32; other parameters are untouched."""
    deltas = lora_deltas(lora, targets, params, scale)

    def add(names, x, axes):
        d = deltas.get(tuple(names))
        return x if d is None else _add_delta(x, d)

    return map_params_with_path(add, params)


LAYER_PREFIX = ("layers", "groups")  # where the scanned layer groups (models.common.LayerStack) sit in the state


def merge_layer_lora(group_state, lora_slice: dict, targets: list[LoraTarget], scale: float):
    """One scan step's effective parameters: `group_state` is the step's slice of the layer groups' state (paths
    relative to `layers.groups`, no layers axis), `lora_slice` the same step's slice of the LoRA tree."""
    by_path: dict = {}
    for t in targets:
        by_path.setdefault(t.param_path[len(LAYER_PREFIX):], []).append(t)

    def add(names, x, axes):
        ts = by_path.get(tuple(names))
        if not ts:
            return x
        # The slice lost the layers axis; pairs of routed experts keep the expert axis (sharded alike under EP).
        d = sum(_delta(t, _get(lora_slice, t.key), x.shape, t.batch_ndim - 1, scale) for t in ts)
        return _add_delta(x, d)

    return map_params_with_path(add, group_state)


def layer_merge_fn(targets: list[LoraTarget], scale: float):
    """merge_fn(lora, frozen) -> (params, LayerTransform) for the train and eval steps: the model runs on the frozen
    base, and the layer scan merges each layer group's adapters into that group's weights inside its step, so
    only one group's merged weights (and their gradient) exist at a time instead of a full-size copy of every
    adapted weight. Targets outside the layer stack (none today) are merged up front."""
    from xorl_jax.models.common import LayerTransform

    inside = [t for t in targets if t.param_path[:len(LAYER_PREFIX)] == LAYER_PREFIX]
    outside = [t for t in targets if t.param_path[:len(LAYER_PREFIX)] != LAYER_PREFIX]

    def merge_fn(lora, frozen):
        params = merge_lora(frozen, lora, outside, scale) if outside else frozen
        stacked: dict = {}
        for t in inside:
            _set(stacked, t.key, _get(lora, t.key))
        fn = lambda group_state, lora_slice: merge_layer_lora(group_state, lora_slice, inside, scale)  # noqa: E731
        return params, (LayerTransform(fn, stacked) if inside else None)

    return merge_fn


def lora_scale(lora_cfg) -> float:
    return float(lora_cfg.lora_alpha) / int(lora_cfg.lora_rank)


# ------------------------------------------------------------------------------------------------ PEFT export
def peft_exportable(targets: list[LoraTarget]) -> bool:
    """PEFT adapter export covers module targets; routed-expert parameter targets are exported merged."""
    return all(not t.is_parameter for t in targets)


def export_peft_adapter(output_dir: str, lora: dict, targets: list[LoraTarget], *, rank: int, alpha: float,
                        period: int, repeats: int, layer_prefix: str = "model.layers",
                        base_model_name_or_path: str | None = None) -> str:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(hf_base, output_dir)` loads. PEFT's lora_A is [r, in], lora_B [out, r]."""
    from safetensors.numpy import save_file

    if not peft_exportable(targets):
        raise ValueError("routed-expert LoRA (lora_target_parameters) has no PEFT adapter export here; "
                         "export merged weights instead")
    tensors = {}
    for t in targets:
        pair = _get(lora, t.key)
        A = np.asarray(jax.device_get(pair["lora_A"]), np.float32)  # [L, in, r]
        B = np.asarray(jax.device_get(pair["lora_B"]), np.float32)  # [L, r, out]
        for r in range(repeats):
            i = r * period + t.group
            name = f"base_model.model.{layer_prefix}.{i}.{t.hf_name}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(A[r].T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(B[r].T)
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": 0.0,
        "target_modules": sorted({t.hf_name for t in targets}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    with open(os.path.join(output_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return output_dir


def count_lora_params(lora: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora)))
