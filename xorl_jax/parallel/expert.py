"""Dropless expert parallelism with `shard_map`: the only hand-written collectives of the MoE path.

Per device (tokens split over data x fsdp x expert, experts split over `expert`):
1. token copies (k per token) sorted by global expert id, which also groups them by destination expert rank;
2. per (destination rank, local expert) counts exchanged with a small all-to-all;
3. the copies exchanged with all-to-all: `padded` sends a fixed [R, cap, D] buffer, cap = the capacity factor x
   the average share of one destination (N*k/R); when any device has more copies than that for one destination,
   every device takes the worst-case buffer [R, N*k, D] instead (a `lax.cond` on a global max), so nothing is
   ever dropped and balanced routing moves about capacity-factor / R of the worst case; `ragged` sends only the
   real rows with `ragged_all_to_all` (GPU/TPU only; XLA:CPU lacks it);
4. received rows sorted by local expert, SwiGLU experts through the grouped GEMM, rows unsorted;
5. the reverse exchange, then each token sums its k expert outputs times its router weights.
Tensor parallelism inside experts: the intermediate dimension F is split over `tensor` and the down projection's
partial sums are added with a psum. The backward pass is shard_map's autodiff (all-to-all transposes to the
reverse all-to-all).

Shapes: N local tokens, D hidden, E experts (El local), F expert intermediate (local share), k experts per token,
R expert ranks, C = N*k copies per device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from xorl_jax.layers.experts import MAX_COPY_ELEMENTS, in_token_chunks, local_experts
from xorl_jax.layers.permute import inverse_permutation, take_copies, take_rows, take_unique
from xorl_jax.parallel.rules import shard_map_compat

EXCHANGES = ("auto", "padded", "ragged")
# Padded exchange: buffer rows per destination = this x the balanced share. 2 absorbs the usual imbalance of a
# trained router; heavier skew takes the worst-case fallback (correct, as slow as before).
PADDED_CAPACITY_FACTOR = 2.0


def padded_capacity(copies: int, ranks: int, factor: float = PADDED_CAPACITY_FACTOR) -> int:
    """Rows per destination of the padded buffer: factor x copies / ranks (rounded up to a multiple of 8 above 8),
    between 1 and `copies` (the worst case)."""
    cap = max(1, -(-int(factor * copies) // ranks))
    if cap > 8:
        cap = -(-cap // 8) * 8
    return min(copies, cap)


def _padded_exchange(x_sorted, dest, pos, recv_counts, recv_R, cap, w_gu, w_down, *, expert_axis, tensor_axis,
                     implementation):
    """Exchange through [R, cap, D] buffers (every block holds at most `cap` rows), run the local experts, return
    the outputs to their sources; rows come back in the sender's sorted order."""
    R, El = recv_counts.shape
    D = x_sorted.shape[1]
    send = jnp.zeros((R, cap, D), x_sorted.dtype).at[dest, pos].set(x_sorted, mode="drop", unique_indices=True)
    recv = jax.lax.all_to_all(send, expert_axis, 0, 0, tiled=True)  # [R, cap, D]: block r from rank r
    slot = jnp.arange(cap)
    ends = jnp.cumsum(recv_counts, axis=1)  # [R, El]
    local_e = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)  # [R, cap]; El = padding
    local_e = jnp.where(slot[None] < recv_R[:, None], local_e, El)
    y = local_experts(recv.reshape(R * cap, D), local_e.reshape(-1), El, w_gu, w_down, implementation)
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    back = jax.lax.all_to_all(y.reshape(R, cap, D), expert_axis, 0, 0, tiled=True)
    return take_unique(back, dest, pos)  # each (destination, slot) holds one copy


def _ep_body(x_ND, top_i, top_w, w_gu, w_down, *, num_experts: int, expert_axis: str, tensor_axis,
             exchange: str, implementation: str, all_axes: tuple, capacity_factor: float):
    N, D = x_ND.shape
    k = top_i.shape[-1]
    R = jax.lax.psum(1, expert_axis)
    El = num_experts // R
    C = N * k
    flat_e = top_i.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    inverse = inverse_permutation(order)
    e_sorted = flat_e[order]
    x_sorted = take_copies(x_ND, order, inverse, k)
    dest = e_sorted // El
    counts_RE = jnp.bincount(e_sorted, length=num_experts).reshape(R, El).astype(jnp.int32)
    send_R = jnp.sum(counts_RE, axis=1)
    send_start = jnp.cumsum(send_R) - send_R
    pos = jnp.arange(C) - send_start[dest]  # slot within the destination's block
    # recv_counts[r, e]: copies rank r sends me for my local expert e
    recv_counts = jax.lax.all_to_all(counts_RE, expert_axis, 0, 0, tiled=True)
    recv_R = jnp.sum(recv_counts, axis=1)

    if exchange == "padded":
        def exchange_with(rows, x_sorted, dest, pos, recv_counts, recv_R, w_gu, w_down):
            return _padded_exchange(x_sorted, dest, pos, recv_counts, recv_R, rows, w_gu, w_down,
                                    expert_axis=expert_axis, tensor_axis=tensor_axis, implementation=implementation)

        operands = (x_sorted, dest, pos, recv_counts, recv_R, w_gu, w_down)
        cap = padded_capacity(C, R, capacity_factor)
        if cap >= C:
            y_sorted = exchange_with(C, *operands)
        else:  # every device must take the same branch: its all-to-alls pair up across the mesh
            overflow = jax.lax.pmax(jnp.max(send_R), all_axes) > cap
            # Differentiated, a cond keeps the residuals of both branches, zero-filled for the one not taken: the
            # worst-case branch's are R/capacity-factor times the usual ones (Qwen3-30B-A3B at EP 8, 8192 tokens
            # per GPU: 9.3 of 12 GiB per MoE layer, written as zeros at every step). That branch is rematerialised
            # instead, so it keeps only its operands, which the usual branch shares: its backward, needed only when
            # some device overflowed, runs its forward again.
            worst = jax.checkpoint(functools.partial(exchange_with, C),
                                   policy=jax.checkpoint_policies.nothing_saveable)
            y_sorted = jax.lax.cond(overflow, worst, functools.partial(exchange_with, cap), *operands)
    elif exchange == "ragged":
        me = jax.lax.axis_index(expert_axis)
        all_send = jax.lax.all_gather(send_R, expert_axis)  # [src, dst]
        out_off = jnp.sum(jnp.where(jnp.arange(R)[:, None] < me, all_send, 0), axis=0).astype(jnp.int32)
        recv_start = (jnp.cumsum(recv_R) - recv_R).astype(jnp.int32)
        buf = jnp.zeros((R * C, D), x_ND.dtype)
        recv = jax.lax.ragged_all_to_all(x_sorted, buf, send_start.astype(jnp.int32), send_R, out_off, recv_R,
                                         axis_name=expert_axis)
        # received rows are source-major, each source block sorted by local expert
        ends = (recv_start[:, None] + jnp.cumsum(recv_counts, axis=1)).reshape(-1)  # source-major boundaries
        row = jnp.arange(R * C)
        seg = jnp.searchsorted(ends, row, side="right")  # index over (source, local expert)
        local_e = jnp.where(row < jnp.sum(recv_R), seg % El, El)
        y = local_experts(recv, local_e, El, w_gu, w_down, implementation)
        if tensor_axis is not None:
            y = jax.lax.psum(y, tensor_axis)
        # reverse: rows from source s return to s, at the offset where s kept its copies for me
        back_off = jax.lax.all_to_all(send_start.astype(jnp.int32), expert_axis, 0, 0, tiled=True)
        y_sorted = jax.lax.ragged_all_to_all(y, jnp.zeros((C, D), y.dtype), recv_start, recv_R, back_off, send_R,
                                             axis_name=expert_axis)
    else:
        raise ValueError(f"expert exchange {exchange!r} is not one of {EXCHANGES}")

    y_copies = take_rows(y_sorted, inverse, order).reshape(N, k, D)
    return jnp.sum(y_copies * top_w[..., None].astype(y_copies.dtype), axis=1)


def resolve_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"expert exchange {exchange!r} is not one of {EXCHANGES}")
    if exchange == "auto":
        return "padded"
    if exchange == "ragged" and jax.default_backend() == "cpu":
        raise ValueError("expert exchange 'ragged' needs GPU/TPU (XLA:CPU has no ragged-all-to-all); use 'padded'")
    return exchange


def experts_ep(x_ND, top_i, top_w, w_gate_up_EDCF, w_down_EFD, *, mesh, implementation: str = "native",
               exchange: str = "auto", expert_axis: str = "expert", tensor_axis: str | None = "tensor",
               batch_axes=("data", "fsdp", "expert"), capacity_factor: float = PADDED_CAPACITY_FACTOR,
               max_copy_elements: int = MAX_COPY_ELEMENTS):
    """Dropless expert-parallel MoE over global arrays (called under jit): x [N, D] with N split over
    `batch_axes`, expert weights split over `expert_axis` (and F over `tensor_axis` when it divides).
    capacity_factor: the padded exchange's buffer rows per destination over the balanced share;
    max_copy_elements: token copies x hidden per device in one pass of the experts (`in_token_chunks`)."""
    E, D, _, F = w_gate_up_EDCF.shape
    R = math.prod(mesh.shape[a] for a in ((expert_axis,) if isinstance(expert_axis, str) else expert_axis))
    if E % R:
        raise ValueError(f"num_experts {E} is not divisible by the expert axis size {R}; change expert_parallel_size")
    tp = mesh.shape.get(tensor_axis, 1) if tensor_axis else 1
    tensor = tensor_axis if tp > 1 and F % tp == 0 else None
    batch = tuple(a for a in batch_axes if mesh.shape.get(a, 1) > 1)
    n_batch = 1
    for a in batch:
        n_batch *= mesh.shape[a]
    if x_ND.shape[0] % n_batch:
        raise ValueError(f"{x_ND.shape[0]} tokens do not split over batch axes {batch} ({n_batch} ways)")
    tok = P(batch or None, None)
    body = functools.partial(_ep_body, num_experts=E, expert_axis=expert_axis, tensor_axis=tensor,
                             exchange=resolve_exchange(exchange),
                             implementation="native" if implementation == "eager" else implementation,
                             all_axes=tuple(mesh.axis_names), capacity_factor=capacity_factor)
    # every device runs the same chunk count (equal token shares)
    body = in_token_chunks(body, top_i.shape[-1], D, max_copy_elements)
    f = shard_map_compat(body, mesh,
                         in_specs=(tok, tok, tok, P(expert_axis, None, None, tensor), P(expert_axis, tensor, None)),
                         out_specs=tok)
    return f(x_ND, top_i, top_w, w_gate_up_EDCF, w_down_EFD)
