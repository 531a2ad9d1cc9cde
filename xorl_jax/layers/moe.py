"""Sparse MoE block of Qwen3-MoE / Qwen3.5-MoE: softmax router (fp32) -> top-k -> optional renormalisation,
dropless SwiGLU experts, optional shared expert with a per-token sigmoid gate (Qwen3.5-MoE).

Expert weights are fused: `gate_up_proj` [E, D, 2, F] (index 0 = gate) and `down_proj` [E, F, D].
`moe_implementation`:
- `eager`: every expert on every token, weighted by a dense [N, E] combine matrix. The reference; tiny models only.
- `native`: token copies sorted by expert, `jax.lax.ragged_dot` grouped GEMM (fine on CPU, very slow on GPU).
- `triton`: the same sorted path with the jax-triton grouped GEMM kernel (NVIDIA GPUs).
- `auto`: triton on NVIDIA GPUs when available, otherwise native.

Shapes: N tokens, D hidden, E experts, F expert intermediate, k experts per token.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from xorl_jax.layers.linear import cast, param
from xorl_jax.layers.mlp import MLP
from xorl_jax.layers.permute import inverse_permutation, take_copies, take_rows
from xorl_jax.layers.swiglu import swiglu

MOE_IMPLEMENTATIONS = ("auto", "triton", "native", "eager")
# Not a config value: the sorted path with the grouped GEMM's jnp reference (kernels.gmm), which the dry run plans in
# place of triton on CPU (XLA:CPU's ragged_dot, `native`, expands into one dense product per expert).
MOE_REFERENCE = "reference"


@functools.lru_cache(maxsize=None)
def _warn_gpu_without_triton():
    """On an NVIDIA GPU the native path (XLA's ragged_dot) is about 20x slower than the Triton grouped GEMM (an MoE
    step of Qwen3-30B-A3B cut to 4 layers, one H200: 1734 vs 87 ms): say so once rather than train slowly."""
    from xorl_jax.kernels.gmm import _cached_unavailable_reason

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
        from xorl_jax.kernels.gmm import triton_available

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


def route(logits_NE, top_k: int, normalize: bool):
    """Router probabilities (fp32), top-k expert ids and their weights (renormalised when `normalize`)."""
    probs = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, top_k)
    if normalize:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return probs, top_w, top_i


def experts_sorted(x_ND, top_i, top_w, w_gate_up_EDCF, w_down_EFD, implementation: str):
    """Dropless experts through a grouped GEMM over token copies sorted by expert."""
    from xorl_jax.kernels.gmm import gmm

    N, D = x_ND.shape
    E, _, _, F = w_gate_up_EDCF.shape
    k = top_i.shape[-1]
    flat_expert = top_i.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    inverse = inverse_permutation(order)
    group_sizes = jnp.bincount(flat_expert, length=E).astype(jnp.int32)
    x_sorted = take_copies(x_ND, order, inverse, k)
    gmm_impl = "ragged_dot" if implementation == "native" else implementation
    h = gmm(x_sorted, w_gate_up_EDCF.reshape(E, D, 2 * F), group_sizes, implementation=gmm_impl)
    a = swiglu(h, -1)
    y_sorted = gmm(a, w_down_EFD, group_sizes, implementation=gmm_impl)
    y_copies = take_rows(y_sorted, inverse, order).reshape(N, k, D)
    return jnp.sum(y_copies * top_w[..., None].astype(y_copies.dtype), axis=1)


# Token copies (tokens x k x hidden elements) one pass of the experts handles; more tokens go in chunks. On an H200
# the one-GPU MoE layer of Qwen3-30B-A3B at 16384 tokens (2^28 copy elements) disagreed with the same tokens run
# as two halves (0.21 of the largest token gradient), while 8192 tokens (2^27) agreed with 4096-token halves and
# with two GPUs under EP; the grouped GEMM, argsort and bincount were each right at that size alone, so the cause is
# most likely an XLA op of the dispatch or combine (not pinned down). Chunks of at most 2^27 keep every device at
# the verified size. (With tensor parallelism and no EP the chunks are of the global token arrays.)
MAX_COPY_ELEMENTS = 2**27


def in_token_chunks(fn, top_k: int, hidden: int):
    """fn(x_ND, top_i, top_w, *weights) -> y_ND over tokens in sequential chunks of at most MAX_COPY_ELEMENTS
    copy elements (`lax.map`; tokens are independent, weight gradients add up over the chunks). The last chunk is
    padded with zero-weight copies of expert 0 where the chunks do not divide N."""

    def run(x_ND, top_i, top_w, *weights):
        N = x_ND.shape[0]
        per_chunk = max(1, MAX_COPY_ELEMENTS // (top_k * hidden))
        if N <= per_chunk:
            return fn(x_ND, top_i, top_w, *weights)
        chunks = -(-N // per_chunk)
        size = -(-N // chunks)
        pad = chunks * size - N

        def split(a):
            a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
            return a.reshape(chunks, size, *a.shape[1:])

        y = jax.lax.map(lambda c: fn(*c, *weights), (split(x_ND), split(top_i), split(top_w)))
        return y.reshape(chunks * size, -1)[:N]

    return run


def experts_dense(x_ND, top_i, top_w, w_gate_up_EDCF, w_down_EFD):
    """Reference: each expert on every token, combined with a dense [N, E] weight matrix (zeros off the top-k)."""
    N = x_ND.shape[0]
    E = w_gate_up_EDCF.shape[0]
    combine = jnp.zeros((N, E), top_w.dtype).at[jnp.arange(N)[:, None], top_i].set(top_w)
    h = jnp.einsum("nd,edcf->necf", x_ND, w_gate_up_EDCF)
    a = swiglu(h, 2)
    y = jnp.einsum("nef,efd->ned", a, w_down_EFD)
    return jnp.einsum("ned,ne->nd", y, combine.astype(y.dtype))


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
    from xorl_jax.parallel.rules import per_shard

    tokens = ("batch", None)
    return per_shard(fn, in_names=(tokens, tokens, tokens, None, None), out_names=tokens)


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
        w_gu, w_down = cast(self.gate_up_proj, dt), cast(self.down_proj, dt)
        from xorl_jax.parallel import rules as parallel_rules

        ctx = parallel_rules.current()
        if ctx is not None and ctx.axis_size("expert") > 1:  # expert parallelism: shard_map all-to-all path
            from xorl_jax.parallel.expert import experts_ep

            y = experts_ep(x, top_i, top_w.astype(dt), w_gu, w_down, mesh=ctx.mesh, implementation=self.implementation,
                           exchange=self.ep_exchange)
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
