"""Routing and the grouped expert compute that the MoE layer (layers/moe.py) and expert parallelism
(parallel/expert.py) share: router top-k, token copies sorted by expert through SwiGLU experts on the grouped GEMM,
the dense reference, and the token chunks both run in.

Expert weights are fused: `gate_up_proj` [E, D, 2, F] (index 0 = gate) and `down_proj` [E, F, D].
Shapes: N tokens, D hidden, E experts, F expert intermediate, k experts per token, M rows, G groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xorl_jax.kernels.gmm import gmm, gmm_gather
from xorl_jax.layers.permute import inverse_permutation, take_copies, take_rows
from xorl_jax.layers.swiglu import swiglu


def route(logits_NE, top_k: int, normalize: bool):
    """Router probabilities (fp32), top-k expert ids and their weights (renormalised when `normalize`)."""
    probs = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, top_k)
    if normalize:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return probs, top_w, top_i


def experts_sorted(x_ND, top_i, top_w, w_gate_up_EDCF, w_down_EFD, implementation: str):
    """Dropless experts through a grouped GEMM over token copies sorted by expert."""
    N, D = x_ND.shape
    E, _, _, F = w_gate_up_EDCF.shape
    k = top_i.shape[-1]
    flat_expert = top_i.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    inverse = inverse_permutation(order)
    group_sizes = jnp.bincount(flat_expert, length=E).astype(jnp.int32)
    w_gate_up = w_gate_up_EDCF.reshape(E, D, 2 * F)
    gmm_impl = "ragged_dot" if implementation == "native" else implementation
    # Triton in bf16/fp16: the kernels read each token's row in place, no sorted copy in memory (fp32 compute keeps
    # the sorted copy: its gathered kernels have not been run on a GPU)
    if implementation == "triton" and x_ND.dtype != jnp.float32:
        h = gmm_gather(x_ND, w_gate_up, group_sizes, order, inverse, k)
    else:
        h = gmm(take_copies(x_ND, order, inverse, k), w_gate_up, group_sizes, implementation=gmm_impl)
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


def in_token_chunks(fn, top_k: int, hidden: int, max_copy_elements: int = MAX_COPY_ELEMENTS):
    """fn(x_ND, top_i, top_w, *weights) -> y_ND over tokens in sequential chunks of at most `max_copy_elements`
    copy elements (`lax.map`; tokens are independent, weight gradients add up over the chunks). The last chunk is
    padded with zero-weight copies of expert 0 where the chunks do not divide N."""

    def run(x_ND, top_i, top_w, *weights):
        N = x_ND.shape[0]
        per_chunk = max(1, max_copy_elements // (top_k * hidden))
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


def grouped_matmul(x_MK, w_GKN, group_sizes_G, implementation: str):
    """Rows of x grouped consecutively by group_sizes (rows past their sum are padding) times per-group weights."""
    if implementation in ("triton", "reference"):  # the Triton kernel, or its jnp reference (dry run on CPU)
        return gmm(x_MK, w_GKN, group_sizes_G, implementation=implementation)
    return jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G)


def local_experts(x_MD, expert_M, num_local: int, w_gate_up_EDCF, w_down_EFD, implementation: str):
    """SwiGLU experts on rows x with local expert ids (num_local marks padding rows, whose output is 0)."""
    E, D, _, F = w_gate_up_EDCF.shape
    order = jnp.argsort(expert_M, stable=True)
    inverse = inverse_permutation(order)
    sizes = jnp.bincount(expert_M, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs = take_rows(x_MD, order, inverse)
    h = grouped_matmul(xs, w_gate_up_EDCF.reshape(E, D, 2 * F), sizes, implementation)
    a = swiglu(h, -1)
    ys = grouped_matmul(a, w_down_EFD, sizes, implementation)
    valid = (jnp.arange(xs.shape[0]) < jnp.sum(sizes))[:, None]
    ys = jnp.where(valid, ys, 0)
    return take_rows(ys, inverse, order)
