"""LoRA in parameter space: low-rank adapters added to frozen base weights, no module changes.

For every targeted weight W (layer-stacked, so its leading "batch" dims are the layers axis and, for routed
experts, the expert axis) we keep an fp32 pair

    A [*batch, in, r]  (random normal / r)      B [*batch, r, out]  (zeros)

and the forward pass uses W_eff = W + (alpha / r) * A @ B, reshaped to W's layout (fp32 when W is stored below fp32).
B = 0 makes step 0 exactly the base model. Only the pairs are trained (and have optimizer state); W stays frozen in
whatever dtype it was loaded in. Training merges per layer group inside the layer scan (`layer_merge_fn`), so one
group's W_eff exists at a time; `merge_lora` merges the whole model (export, inspection).

Names are those xorl, PEFT and Axolotl configs use (xorl_jax/lora_names.py lists them; docs/LORA.md says what each
adapts). A pair may feed several parameters (fused names: qkv_proj -> q, k, v; in_proj_qkvz; gate_up_proj) or a
slice of one (gate_proj / up_proj -> a half of our fused gate_up_proj [.., D, 2, F]; xorl's linear-attention
q_proj -> the q rows of in_proj_qkv): each `LoraTarget` is one pair's contribution to one parameter. gate_proj,
up_proj and down_proj on MoE layers give one pair per routed expert (the pair carries the expert axis, so it is
sharded with the experts under EP), as xorl's; lora_target_parameters names the experts' whole tensors (PEFT's
target_parameters).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xorl_jax import lora_names
from xorl_jax.config import ConfigError
from xorl_jax.models.common import LayerTransform
from xorl_jax.optim import map_params_with_path, params_with_path
from xorl_jax.parallel.rules import logical_to_sharding

log = logging.getLogger("xorl_jax")
BATCH_AXES = ("layers", "expert")
LAYER_PREFIX = ("layers", "groups")  # where the scanned layer groups (models.common.LayerStack) sit in the state


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """One adapter pair's contribution to one base parameter. A pair (its `key`) may feed several parameters (a
    fused name: qkv_proj -> q, k, v) or a slice of one (gate_proj -> half of a fused gate_up_proj; xorl's q_proj
    of a linear-attention layer -> the q rows of in_proj_qkv)."""
    hf_name: str  # the pair's name relative to a decoder layer, e.g. "self_attn.qkv_proj", "mlp.experts.gate_proj"
    group: int  # position in the scanned layer pattern (layer i = repeat * period + group)
    param_path: tuple  # the base parameter's path in the state, e.g. ("layers","groups","0","self_attn","q_proj")
    key: tuple  # path of the pair in the LoRA tree, e.g. ("g0", "self_attn", "q_proj")
    batch_ndim: int  # leading dims with one pair each (layers[, experts])
    in_ndim: int  # input dims after the batch dims
    pair_out: int  # B's output size
    param_out: int  # the base parameter's flattened output size (per batch index)
    out_range: tuple[int, int] | None = None  # columns of the parameter's flattened output it adds to; None = all
    pair_range: tuple[int, int] | None = None  # columns of B it reads; None = all
    is_parameter: bool = False  # named through lora_target_parameters (routed experts' whole tensors)
    expert: bool = False  # one pair per routed expert


@dataclasses.dataclass(frozen=True)
class _Candidate:
    name: str  # canonical name relative to a layer
    aliases: tuple[str, ...]
    is_parameter: bool
    pieces: tuple[LoraTarget, ...]


def _group_candidates(g: int, group: dict) -> list[_Candidate]:
    """Every adapter a layer group offers. `group`: {path relative to the layer: (full path, shape, axes)}."""
    out: list[_Candidate] = []

    def info(rel, in_ndim=1):
        full, shape, axes = group[rel]
        batch = 0
        while batch < len(axes) and axes[batch] in BATCH_AXES:
            batch += 1
        n_in = int(np.prod(shape[batch:batch + in_ndim]))
        return full, batch, n_in, int(np.prod(shape[batch + in_ndim:])), "expert" in axes[:batch]

    def piece(name, rel, *, in_ndim=1, out_range=None, pair_range=None, pair_out=None, is_parameter=False):
        full, batch, _, n_out, expert = info(rel, in_ndim)
        if pair_out is None:
            pair_out = (out_range[1] - out_range[0]) if out_range else n_out
        return LoraTarget(name, g, full, (f"g{g}",) + tuple(name.split(".")), batch, in_ndim, pair_out, n_out,
                          out_range, pair_range, is_parameter, expert)

    def add(name, pieces, aliases=(), is_parameter=False):
        out.append(_Candidate(name, tuple(aliases), is_parameter, tuple(pieces)))

    def concat(name, rels, in_ndims=None):
        """One pair whose output spans the parameters `rels` in order."""
        in_ndims = in_ndims or [1] * len(rels)
        sizes = [info(r, k)[3] for r, k in zip(rels, in_ndims)]
        starts = np.cumsum([0] + sizes)
        return [piece(name, r, in_ndim=k, pair_range=(int(a), int(b)), pair_out=int(starts[-1]))
                for r, k, a, b in zip(rels, in_ndims, starts[:-1], starts[1:])]

    sa = ("self_attn",)
    if all(sa + (p,) in group for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        for p in ("q_proj", "k_proj", "v_proj"):
            add(f"self_attn.{p}", [piece(f"self_attn.{p}", sa + (p,))])
        add("self_attn.o_proj", [piece("self_attn.o_proj", sa + ("o_proj",), in_ndim=2)])
        add("self_attn.qkv_proj", concat("self_attn.qkv_proj", [sa + ("q_proj",), sa + ("k_proj",), sa + ("v_proj",)]))

    la = ("linear_attn",)
    if la + ("in_proj_qkv",) in group:
        qkv, z, a, b = (la + (p,) for p in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"))
        for rel, alias in ((qkv, None), (z, "g_proj"), (a, "a_proj"), (b, "b_proj")):
            name = ".".join(rel)
            add(name, [piece(name, rel)], aliases=(f"linear_attn.{alias}",) if alias else ())
        add("linear_attn.out_proj", [piece("linear_attn.out_proj", la + ("out_proj",), in_ndim=2)],
            aliases=("linear_attn.o_proj",))
        n_qkv, n_v = info(qkv)[3], info(z)[3]
        n_k = (n_qkv - n_v) // 2
        for p, lo, hi in (("q_proj", 0, n_k), ("k_proj", n_k, 2 * n_k), ("v_proj", 2 * n_k, n_qkv)):
            add(f"linear_attn.{p}", [piece(f"linear_attn.{p}", qkv, out_range=(lo, hi))])
        add("linear_attn.in_proj_qkvz", concat("linear_attn.in_proj_qkvz", [qkv, z]))
        add("linear_attn.in_proj_ba", concat("linear_attn.in_proj_ba", [b, a]))

    for prefix in (("mlp",), ("mlp", "shared_expert")):
        gate_up, down = prefix + ("gate_up_proj",), prefix + ("down_proj",)
        if gate_up not in group or down not in group:
            continue
        _, _, _, n_out, expert = info(gate_up)
        half = n_out // 2
        base = ".".join(prefix) + (".experts" if expert else "")
        gate = piece(f"{base}.gate_proj", gate_up, out_range=(0, half))
        up = piece(f"{base}.up_proj", gate_up, out_range=(half, n_out))
        down_piece = piece(f"{base}.down_proj", down)
        add(gate.hf_name, [gate])
        add(up.hf_name, [up])
        add(down_piece.hf_name, [down_piece])
        if expert:  # xorl: gate_up_proj on MoE experts = their gate and up adapters
            add("mlp.experts.gate_up_proj", [gate, up])
            add("mlp.experts.gate_up_proj", [piece("mlp.experts.gate_up_proj", gate_up, is_parameter=True)],
                is_parameter=True)
            add("mlp.experts.down_proj", [dataclasses.replace(down_piece, is_parameter=True)], is_parameter=True)
        else:  # one adapter across both halves (xorl's fused gate_up_proj Linear)
            add(f"{base}.gate_up_proj", [piece(f"{base}.gate_up_proj", gate_up)])
    return out


def available_candidates(params) -> list[_Candidate]:
    """Every adapter the model state offers (nnx.State of nnx.Param), layer group by layer group."""
    groups: dict[int, dict] = {}
    for names, x, axes in params_with_path(params):
        if len(names) < 5 or names[:2] != LAYER_PREFIX or axes is None:
            continue
        groups.setdefault(int(names[2]), {})[tuple(names[3:])] = (tuple(names), tuple(x.shape), tuple(axes))
    return [c for g in sorted(groups) for c in _group_candidates(g, groups[g])]


def available_targets(params) -> list[LoraTarget]:
    """Every adapter piece the model offers (all names, deduplicated)."""
    return _dedupe([p for c in available_candidates(params) for p in c.pieces])


def _dedupe(pieces: list[LoraTarget]) -> list[LoraTarget]:
    seen, out = set(), []
    for p in pieces:
        ident = (p.key, p.param_path, p.out_range, p.pair_range)
        if ident not in seen:
            seen.add(ident)
            out.append(p)
    return out


def available_names(params) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(lora_target_modules names, lora_target_parameters names) this model has, canonical and aliases."""
    modules, parameters = [], []
    for c in available_candidates(params):
        (parameters if c.is_parameter else modules).extend((c.name,) + c.aliases)
    return tuple(dict.fromkeys(modules)), tuple(dict.fromkeys(parameters))


def lora_targets(params, lora_cfg) -> list[LoraTarget]:
    """The adapter pieces that `lora_cfg` names; ConfigError (did you mean ...) on a name that matches nothing in
    this model, as xorl refuses a target that adapts nothing."""
    if lora_cfg.lora_dropout:
        raise ConfigError(f"lora.lora_dropout={lora_cfg.lora_dropout}: adapter dropout is not supported (LoRA here "
                          "is applied in parameter space, W + BA, where input dropout has no equivalent); set it 0")
    candidates = available_candidates(params)
    modules, parameters = available_names(params)
    chosen: list[LoraTarget] = []
    for kind, names, valid, known in (
            ("lora_target_modules", lora_cfg.lora_target_modules, modules, lora_names.KNOWN_MODULES),
            ("lora_target_parameters", lora_cfg.lora_target_parameters, parameters, lora_names.KNOWN_PARAMETERS)):
        lora_names.check_target_names(kind, names, valid, known, ConfigError)
        is_parameter = kind == "lora_target_parameters"
        for target in names or ():
            for c in candidates:
                if c.is_parameter == is_parameter and any(lora_names.matches(n, target) for n in (c.name,) + c.aliases):
                    chosen.extend(c.pieces)
    if not chosen:
        raise ConfigError("lora.lora_target_modules and lora.lora_target_parameters name no layer; valid "
                          f"lora_target_modules: {', '.join(modules)}")
    return _dedupe(chosen)


# ------------------------------------------------------------------------------------------------ shapes
def _base_arrays(params) -> dict:
    return {n: (x, a) for n, x, a in params_with_path(params)}


def _dims(t: LoraTarget, shape: tuple) -> tuple[tuple, int, int]:
    """(batch shape, in size, out size) of a target's pair."""
    return tuple(shape[: t.batch_ndim]), int(np.prod(shape[t.batch_ndim:t.batch_ndim + t.in_ndim])), t.pair_out


def _get(tree, key):
    for k in key:
        tree = tree[k]
    return tree


def _set(tree, key, value):
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def _pairs(params, targets: list[LoraTarget], rank: int, mesh=None, rules=None):
    """(key, A shape, B shape, A sharding, B sharding) of each pair in init order (one per key: a fused name's pieces
    share it); shardings None without a mesh, else the batch dims (layers, experts) sharded like the base weight."""
    base = _base_arrays(params)
    pairs: dict = {}
    for t in targets:
        pairs.setdefault(t.key, t)
    for t in pairs.values():
        x, axes = base[t.param_path]
        b, n_in, n_out = _dims(t, x.shape)
        a_shape, b_shape = b + (n_in, rank), b + (rank, n_out)
        sa = sb = None
        if mesh is not None:
            bax = tuple(axes[: t.batch_ndim])
            sa = logical_to_sharding(bax + (None, None), mesh, rules, shape=a_shape)
            sb = logical_to_sharding(bax + (None, None), mesh, rules, shape=b_shape)
        yield t.key, a_shape, b_shape, sa, sb


def init_lora(params, targets: list[LoraTarget], rank: int, seed: int = 0, mesh=None, rules=None) -> dict:
    """The LoRA tree: nested dicts {g<i>: {self_attn: {q_proj: {"lora_A": A, "lora_B": B}}}}, fp32.
    A ~ N(0, 1) / rank, B = 0. With a mesh the batch dims (layers, experts) are sharded like the base weight."""
    tree: dict = {}
    key = jax.random.PRNGKey(seed)
    for i, (pair_key, a_shape, b_shape, sa, sb) in enumerate(_pairs(params, targets, rank, mesh, rules)):
        a_fn = lambda k, s=a_shape: jax.random.normal(k, s, jnp.float32) / rank  # noqa: E731
        b_fn = lambda s=b_shape: jnp.zeros(s, jnp.float32)  # noqa: E731
        k = jax.random.fold_in(key, i)
        if mesh is not None:
            A = jax.jit(a_fn, out_shardings=sa)(k)
            B = jax.jit(b_fn, out_shardings=sb)()
        else:
            A, B = a_fn(k), b_fn()
        _set(tree, pair_key, {"lora_A": A, "lora_B": B})
    return tree


def abstract_lora(params, targets: list[LoraTarget], rank: int, mesh=None, rules=None) -> dict:
    """`init_lora`'s tree as shapes (jax.ShapeDtypeStruct, sharded as init_lora places the pairs): no memory, for
    the dry run. `params` may be abstract."""
    tree: dict = {}
    for pair_key, a_shape, b_shape, sa, sb in _pairs(params, targets, rank, mesh, rules):
        _set(tree, pair_key, {"lora_A": jax.ShapeDtypeStruct(a_shape, jnp.float32, sharding=sa),
                              "lora_B": jax.ShapeDtypeStruct(b_shape, jnp.float32, sharding=sb)})
    return tree


def _delta(t: LoraTarget, pair: dict, shape: tuple, batch_ndim: int, scale: float):
    """scale * A @ B (the columns t.pair_range of B) in the layout of a base weight of `shape` whose first
    `batch_ndim` dims carry one pair each (the whole stacked weight, or one scan step's slice of it: then the
    layers axis is gone), zero outside t.out_range of the weight's flattened output."""
    B = pair["lora_B"]
    if t.pair_range is not None:
        B = B[..., t.pair_range[0]:t.pair_range[1]]
    d = scale * jnp.einsum("...ir,...ro->...io", pair["lora_A"].astype(jnp.float32), B.astype(jnp.float32))
    if t.out_range is not None:
        n_out = int(np.prod(shape[batch_ndim + t.in_ndim:]))
        pad = [(0, 0)] * (d.ndim - 1) + [(t.out_range[0], n_out - t.out_range[1])]
        d = jnp.pad(d, pad)
    return d.reshape(shape)


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
def _hf_modules(t: LoraTarget) -> list[tuple[str, int, int]]:
    """The HF modules of t's base parameter: (name relative to a layer, first and end column of the parameter's
    flattened output). Routed experts: the name without the expert index."""
    rel = t.param_path[len(LAYER_PREFIX) + 1:]
    if rel[-1] == "gate_up_proj":
        base = ".".join(rel[:-1]) + (".experts" if t.expert else "")
        half = t.param_out // 2
        return [(base + ".gate_proj", 0, half), (base + ".up_proj", half, t.param_out)]
    return [("mlp.experts.down_proj" if t.expert else ".".join(rel), 0, t.param_out)]


def peft_tensors(lora: dict, targets: list[LoraTarget], *, period: int, repeats: int,
                 layer_prefix: str = "model.layers") -> tuple[dict, dict, list[str]]:
    """(tensors, rank multiples, target_modules) of the PEFT adapter: {module name: (A [r', in], B [out, r'])}
    per HF module (routed experts: per expert, `{prefix}.{i}.mlp.experts.{e}.gate_proj`, xorl's layout), each
    adapter's columns placed where its parameter slice sits in the module's output. A module fed by k adapters
    (e.g. in_proj_qkv by xorl's q, k and v names) gets them side by side, rank k * r: {module name: k}."""
    parts: dict = {}
    for t in targets:
        pair = _get(lora, t.key)
        A = np.asarray(jax.device_get(pair["lora_A"]), np.float32)  # [L(, E), in, r]
        B = np.asarray(jax.device_get(pair["lora_B"]), np.float32)  # [L(, E), r, pair_out]
        if t.pair_range is not None:
            B = B[..., t.pair_range[0]:t.pair_range[1]]
        start, stop = t.out_range or (0, t.param_out)
        for module, lo, hi in _hf_modules(t):
            a, b = max(start, lo), min(stop, hi)
            if a >= b:
                continue
            for r in range(repeats):
                i = r * period + t.group
                for e in range(A.shape[1]) if t.expert else [None]:
                    idx = (r,) if e is None else (r, e)
                    name = f"{layer_prefix}.{i}." + (module.replace(".experts.", f".experts.{e}.") if t.expert
                                                      else module)
                    parts.setdefault(name, (hi - lo, []))[1].append((A[idx], B[idx][:, a - start:b - start], a - lo))
    tensors, multiples = {}, {}
    for name, (n_out, pieces) in parts.items():
        A = np.concatenate([a.T for a, _, _ in pieces], axis=0)  # [k r, in]
        B = np.zeros((n_out, A.shape[0]), np.float32)
        col = 0
        for a, b, row in pieces:
            B[row:row + b.shape[1], col:col + a.shape[1]] = b.T
            col += a.shape[1]
        tensors[name] = (np.ascontiguousarray(A), B)
        if len(pieces) > 1:
            multiples[name] = len(pieces)
    modules = set()
    for t in targets:
        for module, _, _ in _hf_modules(t):
            modules.add(module.rsplit(".", 1)[-1] if t.expert else module)  # xorl writes gate_proj for experts
    return tensors, multiples, sorted(modules)


def export_peft_adapter(output_dir: str, lora: dict, targets: list[LoraTarget], *, rank: int, alpha: float,
                        period: int, repeats: int, layer_prefix: str = "model.layers",
                        base_model_name_or_path: str | None = None) -> str:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(hf_base, output_dir)` loads (PEFT's lora_A is [r, in], lora_B [out, r]).

    Fused and split names land on HF's modules (`peft_tensors`): qkv_proj on q_proj, k_proj and v_proj (one A,
    B's rows split); xorl's linear-attention q/k/v on in_proj_qkv's rows; a module fed by k adapters gets rank k*r
    with lora_alpha k*alpha in rank_pattern / alpha_pattern, so the scale stays alpha / r. Routed experts are
    written per expert as xorl writes them (`...mlp.experts.{e}.gate_proj.lora_A.weight`, also vLLM's layout);
    transformers 5 fuses the experts into one tensor, which PEFT's module adapters do not reach."""
    from safetensors.numpy import save_file

    parts, multiples, modules = peft_tensors(lora, targets, period=period, repeats=repeats,
                                             layer_prefix=layer_prefix)
    tensors = {}
    for name, (A, B) in parts.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": float(alpha),
        "rank_pattern": {re.escape(n): int(rank) * k for n, k in multiples.items()},
        "alpha_pattern": {re.escape(n): float(alpha) * k for n, k in multiples.items()},
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    tmp = output_dir.rstrip("/") + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return output_dir


def count_lora_params(lora: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora)))
