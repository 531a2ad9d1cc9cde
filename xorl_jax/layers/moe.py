"""Sparse MoE block of Qwen3-MoE / Qwen3.5-MoE: softmax router (fp32) -> top-k -> optional renormalisation,
dropless SwiGLU experts, optional shared expert with a per-token sigmoid gate (Qwen3.5-MoE).

Expert weights are fused: `gate_up_proj` [E, D, 2, F] (index 0 = gate) and `down_proj` [E, F, D].
`moe_implementation`:
- `eager`: every expert on every token, weighted by a dense [N, E] combine matrix. The reference; tiny models only.
- `native`: token copies sorted by expert, `jax.lax.ragged_dot` grouped GEMM (fine on CPU, very slow on GPU).
- `triton`: the same sorted path with the jax-triton grouped GEMM kernels (NVIDIA GPUs); the gate/up product reads
  each token's row in place instead of a sorted copy of the tokens.
- `auto`: triton on NVIDIA GPUs when available, otherwise native.

Shapes: N tokens, D hidden, E experts, F expert intermediate, k experts per token.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from xorl_jax.kernels.gmm import _cached_unavailable_reason, triton_available
from xorl_jax.layers.experts import experts_dense, experts_sorted, in_token_chunks, route
from xorl_jax.layers.linear import cast, param
from xorl_jax.layers.mlp import MLP
from xorl_jax.parallel import rules as parallel_rules
from xorl_jax.parallel.expert import PADDED_CAPACITY_FACTOR, experts_ep

MOE_IMPLEMENTATIONS = ("auto", "triton", "native", "eager")
# The name of the expert weights in the compute dtype, so a remat policy can keep them for the backward: recomputing
# the fp32 -> bf16 cast there rereads the fp32 weights, and makes XLA copy every layer's fp32 slice of the stacked
# parameters so the backward can read it (on the Qwen3-30B-A3B cut with fp32 parameters, one H100: 4.8 ms of casts
# and 6.5 ms of copies in a 128 ms step; 116 ms with them kept, docs/PERFORMANCE.md). Kept, they cost 2 bytes per
# local expert parameter per layer. `dots_attention_saveable` keeps them (models.common.SAVED_NAMES) with unrolled
# layers and no layer transform (models.common.weight_casts_kept).
EXPERT_WEIGHTS_NAME = "expert_weights"


def _compute_weights(w: nnx.Param, dtype) -> jax.Array:
    """Expert weights in the compute dtype, named for the remat policy (only where a cast happens: `linear.cast`)."""
    return cast(w, dtype, EXPERT_WEIGHTS_NAME)
# Not a config value: the sorted path with the grouped GEMM's jnp reference (kernels.gmm), which the dry run plans in
# place of triton on CPU (XLA:CPU's ragged_dot, `native`, expands into one dense product per expert).
MOE_REFERENCE = "reference"


@functools.lru_cache(maxsize=None)
def _warn_gpu_without_triton():
    """On an NVIDIA GPU the native path (XLA's ragged_dot) is about 20x slower than the Triton grouped GEMM (an MoE
    step of Qwen3-30B-A3B cut to 4 layers, one H200: 1734 vs 87 ms): say so once rather than train slowly."""
    if jax.default_backend() == "gpu":
        logging.getLogger("xorl_jax").warning(
            "moe_implementation auto: the Triton grouped GEMM is unavailable (%s); the experts run on XLA's "
            "ragged_dot, many times slower on GPUs: pip install jax-triton", _cached_unavailable_reason())


def resolve_moe_implementation(name: str) -> str:
    if name == MOE_REFERENCE:
        return name
    if name not in MOE_IMPLEMENTATIONS:
        raise ValueError(f"moe_implementation {name!r} is not one of {MOE_IMPLEMENTATIONS}")
    if name in ("auto", "triton"):
        if triton_available():
            return "triton"
        if name == "triton":
            raise RuntimeError(
                "moe_implementation 'triton' is not available on this device (needs an NVIDIA GPU and jax-triton); "
                "use 'native' or 'eager'"
            )
        _warn_gpu_without_triton()
        return "native"
    return name


def _local_experts(implementation: str, ctx, top_k: int, hidden: int):
    """Experts without expert parallelism. On a mesh (FSDP) each device runs its own tokens against the gathered
    expert weights: left to XLA, the grouped GEMM (a custom call it cannot partition) would get every device's
    tokens and run the whole batch on each device. With tensor parallelism XLA keeps the F split instead."""
    if implementation == "eager":
        fn = experts_dense
    else:
        fn = functools.partial(experts_sorted, implementation=implementation)
    fn = in_token_chunks(fn, top_k, hidden)
    if ctx is None or ctx.axis_size("tensor") > 1:
        return fn
    tokens = ("tokens", None)  # [B * T] tokens: rows over the batch axes, each row's over the context axes
    return parallel_rules.per_shard(fn, in_names=(tokens, tokens, tokens, None, None), out_names=tokens)


class MoE(nnx.Module):
    def __init__(
        self,
        *,
        hidden: int,
        num_experts: int,
        top_k: int,
        intermediate: int,
        norm_topk_prob: bool,
        shared_intermediate: int = 0,
        router_fp32: bool = True,
        train_router: bool = True,
        dtype=jnp.float32,
        implementation: str = "auto",
        ep_exchange: str = "auto",
        ep_capacity_factor: float = PADDED_CAPACITY_FACTOR,
        rngs: nnx.Rngs,
    ):
        if top_k > num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} exceeds num_experts {num_experts}")
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.router_fp32 = router_fp32
        self.train_router = train_router
        self.dtype = dtype
        self.implementation = implementation
        self.ep_exchange = ep_exchange  # how tokens travel between expert ranks (parallel/expert.py)
        self.ep_capacity_factor = ep_capacity_factor  # the padded exchange's buffer over the balanced share
        self.router = param(rngs, (hidden, num_experts), ("embed", None))
        self.gate_up_proj = param(rngs, (num_experts, hidden, 2, intermediate), ("expert", "embed", None, "expert_mlp"))
        self.down_proj = param(rngs, (num_experts, intermediate, hidden), ("expert", "expert_mlp", "embed"))
        self.has_shared_expert = bool(shared_intermediate)
        if shared_intermediate:
            self.shared_expert = MLP(hidden=hidden, intermediate=shared_intermediate, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = param(rngs, (hidden, 1), ("embed", None))

    def __call__(self, x_BTD, valid_BT):
        """Returns (y [B,T,D], stats [2, E]: masked top-k counts and masked router-probability sums)."""
        B, T, D = x_BTD.shape
        dt = self.dtype
        x = x_BTD.reshape(B * T, D).astype(dt)
        router_dt = jnp.float32 if self.router_fp32 else dt
        logits = jnp.dot(x.astype(router_dt), cast(self.router, router_dt))
        probs, top_w, top_i = route(logits, self.top_k, self.norm_topk_prob)
        if not self.train_router:  # xorl's train_router false: the experts' gradient stops at the routing weights;
            top_w = jax.lax.stop_gradient(top_w)  # the router still learns from the aux loss through `probs`
        w_gu, w_down = _compute_weights(self.gate_up_proj, dt), _compute_weights(self.down_proj, dt)
        ctx = parallel_rules.current()
        expert_axes = ctx.expert_axes() if ctx is not None else ()
        if expert_axes:  # expert parallelism (over `expert`, maybe context axes too): shard_map all-to-all path
            y = experts_ep(x, top_i, top_w.astype(dt), w_gu, w_down, mesh=ctx.mesh, implementation=self.implementation,
                           expert_axis=expert_axes[0] if len(expert_axes) == 1 else expert_axes,
                           exchange=self.ep_exchange, capacity_factor=self.ep_capacity_factor,
                           batch_axes=parallel_rules.BATCH_AXES + parallel_rules.SEQ_AXES)
        else:
            y = _local_experts(self.implementation, ctx, self.top_k, D)(x, top_i, top_w.astype(dt), w_gu, w_down)
        if self.has_shared_expert:
            shared = self.shared_expert(x[None])[0]
            gate = jax.nn.sigmoid(jnp.dot(x, cast(self.shared_expert_gate, dt)))
            y = y + gate * shared
        valid = valid_BT.reshape(-1).astype(jnp.float32)
        E = probs.shape[-1]
        counts = jnp.zeros((E,), jnp.float32).at[top_i.reshape(-1)].add(jnp.repeat(valid, self.top_k))
        prob_sum = jnp.sum(probs * valid[:, None], axis=0)
        return y.reshape(B, T, D), jnp.stack([counts, prob_sum])


def load_balancing_loss(stats_2E, num_moe_layers: int, n_valid_tokens):
    """HF's `load_balancing_loss_func`: counts and probabilities pooled over all MoE layers, then E * sum(f * P)."""
    E = stats_2E.shape[-1]
    total = jnp.maximum(num_moe_layers * n_valid_tokens.astype(jnp.float32), 1.0)
    f = stats_2E[0] / total
    p = stats_2E[1] / total
    return E * jnp.sum(f * p)
