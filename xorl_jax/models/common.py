"""Pieces every model family shares: runtime options, the scanned layer stack, the causal-LM forward (embedding,
layers, norm, logits), the output type, HF config reading."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from xorl_jax.kernels.attention import AttentionLayout, packed_layout, packed_layout_for
from xorl_jax.kernels.gmm import CHECKPOINT_NAME as GMM_CHECKPOINT_NAME
from xorl_jax.layers.linear import WEIGHTS_NAME, cast
from xorl_jax.layers.moe import EXPERT_WEIGHTS_NAME, MoE, load_balancing_loss
from xorl_jax.layers.rope import rope_cos_sin
from xorl_jax.layers.swiglu import CHECKPOINT_NAME as SWIGLU_CHECKPOINT_NAME
from xorl_jax.parallel.context import context_parallel, from_ring_order, to_ring_order
from xorl_jax.parallel.expert import PADDED_CAPACITY_FACTOR
from xorl_jax.parallel.rules import constrain as constrain_by_rules

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_attention_saveable", "dots_with_no_batch_dims_saveable")

# Named values `dots_attention_saveable` keeps besides dot_general outputs (`ModelOptions.remat_saved_names`): the
# grouped expert GEMMs' (custom calls on GPU, which a dot_general test does not see) and the SwiGLU activations
# (elementwise, but recomputing them rereads the gate/up product: 6.7 ms of a 400 ms Qwen3 1.7B step on an H200). The
# Gated DeltaNet kernels name their forward products too (`kernels.gdn.CHECKPOINT_NAME`, for `bench_train.py
# --remat-keep-names`) but are not kept: on the Qwen3.5-35B-A3B cut (one H200) keeping them cost 1.1 GiB and no time
# (118.3 vs 117.5 ms). The expert weights cast to the compute dtype (`layers.moe.EXPERT_WEIGHTS_NAME`) are kept too:
# 116 vs 125 ms on the Qwen3-30B-A3B cut with fp32 parameters (one H100), and less peak memory. So are the other
# weights' casts (`layers.linear.WEIGHTS_NAME`: projections, dense MLPs; Qwen3 1.7B: 404.6 vs 406.3 ms, 0.36 GiB
# less), docs/PERFORMANCE.md. Both with unrolled layers only: `weight_casts_kept`.
SAVED_NAMES = (GMM_CHECKPOINT_NAME, SWIGLU_CHECKPOINT_NAME, EXPERT_WEIGHTS_NAME, WEIGHTS_NAME)
WEIGHT_CAST_NAMES = (EXPERT_WEIGHTS_NAME, WEIGHTS_NAME)


def weight_casts_kept(saved_names: Sequence[str], *, scan: bool, transformed: bool) -> tuple[str, ...]:
    """`saved_names` without the weight casts (WEIGHT_CAST_NAMES) where keeping them costs memory and saves little:
    in a scan (each layer's weights are sliced inside the loop, so there are no per-layer fp32 copies for the kept
    casts to remove, and the kept casts stack into 2 bytes per parameter of every layer: 6.0 GiB for the Qwen3.5 cut's
    experts) and under a layer transform (casts of LoRA-merged weights: a weight-sized copy per layer). Unrolled, the
    kept casts replace the copies of the fp32 slices that the backward's recast would read: less memory and time."""
    if scan or transformed:
        return tuple(n for n in saved_names if n not in WEIGHT_CAST_NAMES)
    return tuple(saved_names)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run a model (not what it is): dtypes, kernel backends, rematerialisation."""

    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    attn_implementation: str = "auto"  # auto | cudnn | xla
    moe_implementation: str = "auto"  # auto | triton | native | eager
    gdn_implementation: str = "auto"  # auto | pallas | chunked | recurrent
    remat_policy: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = True  # False: one traced copy per layer group (longer compile, no stacked residuals)
    router_fp32: bool = True
    train_router: bool = True  # False: routing weights detached before the experts (xorl's train_router false)
    ep_exchange: str = "auto"  # expert-parallel token exchange: auto | padded (all_to_all) | ragged
    # Not config fields (benchmarks set them; every run takes these defaults):
    ep_capacity_factor: float = PADDED_CAPACITY_FACTOR  # padded exchange: buffer rows per destination / balanced share
    remat_saved_names: tuple[str, ...] = SAVED_NAMES  # named values dots_attention_saveable keeps besides matmuls
    attn_slot_sizes: tuple[int, ...] | None = None  # slot counts the host may fix the packed attention layout at
    #                                                  (kernels.attention.host_tiers); None = its two tiers

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


@struct.dataclass
class ModelOutput:
    logits: Any = None  # [B, T, V] (None when return_hidden=True)
    hidden_states: Any = None  # [B, T, D] after the final norm (when return_hidden=True)
    aux_loss: Any = None  # MoE load-balancing loss, unscaled (HF's `aux_loss`); 0 for dense models


@functools.lru_cache(maxsize=None)
def _dots_and_attention(saved_names: tuple[str, ...]):
    """Save matmul outputs, the values named `saved_names` (by default the grouped expert GEMMs' outputs and the
    SwiGLU activations) and the fused attention kernel's outputs (its result and softmax statistics): the backward
    then recomputes only cheap work (norms, RoPE, token permutations, the Gated DeltaNet kernels' forward), never a
    matmul or an attention forward."""
    named = jax.checkpoint_policies.save_only_these_names(*saved_names)

    def policy(prim, *avals, **params):
        return (jax.checkpoint_policies.dots_saveable(prim, *avals, **params)
                or named(prim, *avals, **params)
                or prim.name.startswith("dot_product_attention_fwd"))

    return policy


def checkpoint_policy(name: str, saved_names: Sequence[str] = SAVED_NAMES):
    """The jax.checkpoint policy of a REMAT_POLICIES name (None = save nothing); `saved_names` for
    dots_attention_saveable."""
    if name == "full":
        return None
    if name == "dots_attention_saveable":
        return _dots_and_attention(tuple(saved_names))
    return getattr(jax.checkpoint_policies, name)


class LayerTransform(NamedTuple):
    """A rewrite of each scan step's parameters, applied inside the step (e.g. LoRA's W + s A B, one layer group at
    a time instead of a merged copy of the whole model).

    `extra` is a pytree stacked like the layers (leading axis = scan repeats); the scan slices it with the
    parameters and the step calls `fn(group_state, extra_slice) -> group_state` before running the layers."""

    fn: Callable[[Any, Any], Any]
    extra: Any


def _without_extra_products(policy, extra):
    """`policy`, except that a matmul of two `extra` slices (e.g. a LoRA A @ B) is never saved for the backward
    pass: it is weight-sized, so saving it for every layer would cost a full-size copy, and it is cheap to redo
    from the small slices. A matmul is recognised by its operands' shapes (the slices' shapes); an activation
    matmul of exactly those shapes would only be recomputed, never wrong."""
    shapes = {tuple(x.shape[1:]) for x in jax.tree.leaves(extra)}

    def saveable(prim, *avals, **params):
        if prim is jax.lax.dot_general_p and all(tuple(a.shape) in shapes for a in avals):
            return False
        return policy(prim, *avals, **params)

    return saveable


def repeat_period(kinds: Sequence) -> int:
    """Smallest p dividing len(kinds) with kinds[i] == kinds[i % p]: the group of layers that the scan repeats."""
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return n


class LayerStack(nnx.Module):
    """Layers stacked along a leading `layers` axis and applied with `lax.scan`, so compile time stays flat in depth.

    `kinds[i]` names what layer i is (e.g. "dense"/"moe", "linear_attention"/"full_attention"). The smallest
    repeating pattern of kinds forms one scan step; each parameter gets the logical axis "layers" prepended.
    """

    def __init__(self, kinds: Sequence, make_layer: Callable[[Any, nnx.Rngs], nnx.Module], *, rngs: nnx.Rngs):
        period = repeat_period(kinds)
        self.pattern = tuple(kinds[:period])
        self.repeats = len(kinds) // period
        pattern = self.pattern

        @nnx.vmap(in_axes=0, out_axes=0)
        def create(key):
            layer_rngs = nnx.Rngs(params=key)
            return nnx.List([make_layer(kind, layer_rngs) for kind in pattern])

        self.groups = create(jax.random.split(rngs.params(), self.repeats))
        for _, node in nnx.iter_graph(self.groups):
            if isinstance(node, nnx.Variable):
                node.set_metadata(axes=("layers",) + tuple(node.get_metadata()["axes"]))

    def __call__(self, carry, *, remat_policy: str = "none", layer_transform: LayerTransform | None = None,
                 scan: bool = True, saved_names: Sequence[str] = SAVED_NAMES, **ctx):
        """carry -> carry through every layer; each layer is called as `layer(carry, **ctx) -> carry`.

        With `layer_transform`, each step runs its layers on `fn(step's parameters, step's slice of extra)`. Under
        remat the transformed parameters are rebuilt in the backward pass rather than kept for every layer.
        `saved_names` (dots_attention_saveable's) keep the weights' compute-dtype casts only unrolled and
        untransformed (`weight_casts_kept`).

        `scan=False` unrolls the loop: the same step traced once per layer group on its slice of the stacked
        parameters. Compilation grows with depth, but what the backward keeps of each layer lives in that layer's
        own buffers, where a scan zero-fills stacked buffers and copies every layer's residuals into them."""
        graphdef, state = nnx.split(self.groups)
        fn, extra = layer_transform if layer_transform is not None else (None, None)
        saved_names = weight_casts_kept(saved_names, scan=scan, transformed=fn is not None)

        def step(carry, xs):
            group_state, extra_slice = xs
            if fn is not None:
                group_state = fn(group_state, extra_slice)
            group = nnx.merge(graphdef, group_state)
            for layer in group:
                carry = layer(carry, **ctx)
            return carry, None

        if remat_policy != "none" or fn is not None:
            # Without remat but with a transform, the backward of each layer's matmuls would keep every layer's
            # transformed (e.g. merged LoRA) weights: a full-size copy. Save every product as "none" would, and
            # rebuild the weights from the base and the small extra slices in the backward instead.
            policy = (checkpoint_policy(remat_policy, saved_names) if remat_policy != "none"
                      else jax.checkpoint_policies.dots_saveable)
            if policy is not None and fn is not None:
                policy = _without_extra_products(policy, extra)
            # Inside a scan CSE cannot merge the recomputation into the forward; unrolled it could.
            step = jax.checkpoint(step, policy=policy, prevent_cse=not scan)
        if scan:
            carry, _ = jax.lax.scan(step, carry, (state, extra))
            return carry
        for xs in unstack_layers((state, extra), self.repeats):
            carry, _ = step(carry, xs)
        return carry

    def cached(self, carry, caches, *, scan: bool = True, **ctx):
        """Sampling's pass: carry -> (carry, updates). Each layer is called as `layer.cached(carry, cache, **ctx) ->
        (carry, update)` with its slice of `caches`: a tuple over the pattern of pytrees stacked [repeats, ...]
        (None: prefill, no cache yet). `updates` is stacked the same way (the new tokens' entries). No remat, no
        layer transform: nothing is differentiated here. `scan=False` unrolls the groups as `__call__` does."""
        graphdef, state = nnx.split(self.groups)
        period = len(self.pattern)
        caches = (None,) * period if caches is None else tuple(caches)

        def step(carry, xs):
            group_state, cache_slices = xs
            updates = []
            for layer, cache in zip(nnx.merge(graphdef, group_state), cache_slices):
                carry, update = layer.cached(carry, cache, **ctx)
                updates.append(update)
            return carry, tuple(updates)

        if scan:
            return jax.lax.scan(step, carry, (state, caches))
        outs = []
        for xs in unstack_layers((state, caches), self.repeats):
            carry, out = step(carry, xs)
            outs.append(out)
        return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def unstack_layers(tree, n: int) -> list:
    """The `n` slices along the leading axis of every leaf, as `n` trees. `lax.split` rather than indexing: its
    transpose is one concatenation of the slices' gradients, where indexing's would add a zero-padded full-size
    gradient per slice."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [[jnp.squeeze(p, 0) for p in jax.lax.split(x, [1] * n)] for x in leaves]
    return [jax.tree.unflatten(treedef, [leaf_parts[i] for leaf_parts in parts]) for i in range(n)]


def rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported yet (only default RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def cast_params(model: nnx.Module, dtype) -> None:
    """Store every parameter in `dtype` (e.g. bf16 weights for a frozen base model)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            node[...] = node[...].astype(dtype)


HIDDEN = ("batch", "seq", "embed")  # the residual stream [B, T, D] between sublayers


def constrain(x, names):
    """Shard activation `x` by its logical axis `names` (e.g. ("batch", "seq", "embed")) under the current mesh
    and rules (`xorl_jax.parallel.rules.use_mesh`); a no-op without one."""
    return constrain_by_rules(x, names)


def causal_lm_forward(model, input_ids, positions, segment_ids, return_hidden, *, rotary_dim, num_experts=None,
                      layer_transform=None, attention_layout: AttentionLayout | None = None):
    """Embedding -> scanned layers -> final norm -> logits; shared by the families. attention_layout: see
    kernels.attention.AttentionLayout (None: the packed attention layout's tier is picked on the device)."""
    cfg, opts = model.config, model.options
    B, T = input_ids.shape
    dt = opts.compute_dtype
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cp = context_parallel()
    if cp.ring > 1:  # ring attention's load balance: the layers run on the sequence in ring order (parallel/context)
        input_ids, positions = to_ring_order(input_ids), to_ring_order(positions)
        segment_ids = None if segment_ids is None else to_ring_order(segment_ids)
    valid = jnp.ones((B, T), bool) if segment_ids is None else segment_ids != 0
    h = cast(model.embed_tokens, dt)[input_ids]
    cos, sin = rope_cos_sin(positions, rotary_dim or cfg.head_dim, cfg.rope_theta, dt)
    E = (num_experts if num_experts is not None else cfg.num_experts) or 1
    stats = jnp.zeros((2, E), jnp.float32)
    # The documents' attention layout once for all layers (and outside remat: not recomputed in the backward).
    packed = segment_ids is not None and opts.attn_implementation == "cudnn" and not cp.active
    attn_layout = packed_layout_for(segment_ids, attention_layout) if packed else None
    h, stats = model.layers(
        (h, stats), remat_policy=opts.remat_policy, layer_transform=layer_transform, scan=opts.scan_layers,
        saved_names=opts.remat_saved_names,
        cos=cos, sin=sin, segment_ids=segment_ids, valid=valid, attn_layout=attn_layout,
    )
    h = model.norm(h)
    aux = jnp.zeros((), jnp.float32)
    if model.num_moe_layers:
        aux = load_balancing_loss(stats, model.num_moe_layers, jnp.sum(valid))
    if return_hidden:  # in ring order under ring attention: the loss takes its labels through to_ring_order
        return ModelOutput(hidden_states=h, aux_loss=aux)
    logits = jnp.einsum("btd,dv->btv", h, model.head_weight(dt), preferred_element_type=jnp.float32)
    return ModelOutput(logits=from_ring_order(logits) if cp.ring > 1 else logits, aux_loss=aux)


def causal_lm_cached(model, input_ids, positions, segment_ids, caches, cache_valid, *, rotary_dim,
                     hidden=False, scan=None):
    """`causal_lm_forward` for sampling: each layer's `cached` reads its cache slice (a tuple over the scanned
    pattern of pytrees stacked over repeats; None = prefill) and returns the new tokens' entries, stacked the same
    way. Returns (logits [B, V] fp32 of the last position, or with `hidden` the hidden states [B, T, D] after the
    final norm, updates). `scan`: scan the layer groups (None: as the model's `scan_layers`)."""
    cfg, opts = model.config, model.options
    dt = opts.compute_dtype
    valid = jnp.ones(input_ids.shape, bool) if segment_ids is None else segment_ids != 0
    h = cast(model.embed_tokens, dt)[input_ids]
    cos, sin = rope_cos_sin(positions, rotary_dim or cfg.head_dim, cfg.rope_theta, dt)
    stats = jnp.zeros((2, cfg.num_experts or 1), jnp.float32)
    packed = caches is None and segment_ids is not None and opts.attn_implementation == "cudnn"
    attn_layout = packed_layout(segment_ids) if packed else None  # a prompt row: padding, then the prompt
    (h, _), updates = model.layers.cached(
        (h, stats), caches, scan=opts.scan_layers if scan is None else scan, cos=cos, sin=sin,
        segment_ids=segment_ids, valid=valid, cache_valid=cache_valid, attn_layout=attn_layout)
    if hidden:
        return model.norm(h), updates
    logits = jnp.einsum("bd,dv->bv", model.norm(h[:, -1]), model.head_weight(dt), preferred_element_type=jnp.float32)
    return logits, updates


def mlp_residual(layer, h, stats, valid):
    """The second half of a decoder layer (post-attention norm, MLP or MoE, residual), shared by the families' layers
    and their sampling paths."""
    x = layer.post_attention_layernorm(h)
    if isinstance(layer.mlp, MoE):
        y, layer_stats = layer.mlp(x, valid)
        stats = stats + layer_stats
    else:
        y = layer.mlp(x)
    return h + y.astype(h.dtype), stats
