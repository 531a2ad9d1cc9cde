"""Gated DeltaNet with the sequence split over devices: conv halo, Ulysses and ring, all exact.

Everything here runs per device inside a shard_map whose sequence dimension is split over the context-parallel
axes in the layout of `parallel/context.py`: with ring R > 1 the sequence is in ring order (2R chunks, ring rank
r holds chunks r and 2R-1-r, which balances causal attention), and each ring block is cut into U equal runs over
the Ulysses ranks. A device thus holds `P` *pieces*, each a contiguous run of the original sequence (P = 2 with a
ring, else 1); `piece_order` and `device_pieces` are those tables.

- Conv halo: a token's causal window (kernel width Kc) reaches Kc-1 tokens back, into the previous piece, which
  lives on another device (or is the device's own other piece). Every device gathers the last Kc-1 tokens (and
  their segment ids) of every piece, a few tokens each, and prepends its pieces' predecessors; the conv's own
  document reset then keeps a document that starts at a piece's first token out of the halo. The sequence's
  first piece gets zeros (the single-device zero pad).
- Ulysses: the heads are independent, so an all-to-all trades the sequence split for a head split around the
  gated delta rule core only. The conv runs before it on the sequence split (with the halo): the halo is Kc-1
  tokens, whereas moving the conv after the all-to-all would need the conv weights sliced per head group.
  Value heads must split evenly over the Ulysses ranks; when key heads do not, q and k are first repeated to the
  value heads (the core's own grouped-head expansion): exact, at the cost of a wider all-to-all.
- Ring: the gated delta rule is affine in its incoming state: over one piece S_out = A S_in + B, with A the
  product of the per-token transitions (zero from the piece's first document start on) and B the piece's
  zero-start final state; a token's output gains q_t^T A_t S_in (A_t: transitions up to t). One kernel call per
  device gets all three: the value columns are independent, so v is widened by dk zero columns and the initial
  state is [0 | I]; the extra columns' final state is A and their outputs are Q_t = A_t^T q_t. The ring ranks
  all-gather (A, B) (2R pairs of [dk, dk] and [dk, dv] per head: fine for rings up to 8), fold them in sequence
  order into every piece's incoming state, and add Q_t S_in to their outputs. A document starting at a piece's
  first token zeroes that piece's incoming state.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

from xorl_jax.kernels.gdn import auto_implementation, gated_delta_rule
from xorl_jax.layers.conv import causal_conv1d_silu
from xorl_jax.parallel.context import gather_seq, heads_to_seq, ring_chunk_order, seq_to_heads


# ------------------------------------------------------------------------------------------------ layout
def piece_order(ring: int) -> np.ndarray:
    """[R, P] int: the global chunk index of ring rank r's local piece p after the Ulysses all-to-all (the ring
    order of `parallel/context.py`: with R > 1, 2R chunks and rank r holds chunks r and 2R-1-r; else one piece)."""
    return ring_chunk_order(ring).reshape(ring, 2) if ring > 1 else np.zeros((1, 1), np.int64)


def device_pieces(ring: int, ulysses: int) -> np.ndarray:
    """[R*U, P] int: the global index (in units of T / (R*U*P) tokens) of each piece a device holds between layers,
    for the device at linear index r*U + u: its ring block (the pieces of `piece_order`) is cut into U equal runs,
    one per Ulysses rank, so with R > 1 a device holds units 2u and 2u+1 of its block's 2U."""
    order = piece_order(ring)
    P = order.shape[1]
    units = order[:, :, None] * ulysses + np.arange(ulysses)  # [R, P, U]: the block's units in ring order
    return units.reshape(ring, P * ulysses).reshape(ring * ulysses, P)


def split_pieces(x, pieces: int):
    """[B, T, ...] -> [P*B, T/P, ...], piece-major: each piece becomes rows of its own."""
    if pieces == 1:
        return x
    B, T = x.shape[:2]
    x = x.reshape(B, pieces, T // pieces, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0).reshape(pieces * B, T // pieces, *x.shape[3:])


def join_pieces(x, pieces: int):
    """Inverse of `split_pieces`."""
    if pieces == 1:
        return x
    PB, Tp = x.shape[:2]
    x = x.reshape(pieces, PB // pieces, Tp, *x.shape[2:])
    return jnp.moveaxis(x, 0, 1).reshape(PB // pieces, pieces * Tp, *x.shape[3:])


def _gather_global(x_local, axes, order: np.ndarray):
    """Per-piece values [P*B, ...] on each rank -> [G*P, B, ...] in global sequence order (G ranks of `axes`)."""
    G, P = order.shape
    gathered = jax.lax.all_gather(x_local, axes, tiled=False)  # [G, P*B, ...]
    flat = gathered.reshape(G * P, x_local.shape[0] // P, *x_local.shape[1:])  # index r*P + p
    return flat[np.argsort(order.reshape(-1))]


def _my_pieces(axes, order: np.ndarray):
    """[P] int32: the global indices of this rank's pieces."""
    return jnp.asarray(order, jnp.int32)[jax.lax.axis_index(axes)]


# ------------------------------------------------------------------------------------------------ conv halo
def conv_with_halo(x_BTC, w_CK, segment_ids, *, axes, order: np.ndarray):
    """`causal_conv1d_silu` on this rank's share of a sequence split over `axes` (`order` as `device_pieces`)."""
    G, P = order.shape
    halo = w_CK.shape[1] - 1
    if halo == 0 or G * P == 1:
        return causal_conv1d_silu(x_BTC, w_CK, segment_ids)
    xp = split_pieces(x_BTC, P)
    if xp.shape[1] < halo:
        raise ValueError(f"each sequence piece has {xp.shape[1]} tokens, fewer than the conv's {halo}-token halo; "
                         "use fewer context-parallel ranks or longer rows")
    mine = _my_pieces(axes, order)
    prev = jnp.maximum(mine - 1, 0)
    B = x_BTC.shape[0]

    def halo_of(x_local):  # the previous pieces' last `halo` entries: [P*B, Tp, ...] -> [P*B, halo, ...]
        tails = _gather_global(x_local[:, -halo:], axes, order)[prev]  # [P, B, halo, ...]
        return tails.reshape(P * B, halo, *x_local.shape[2:])

    first = jnp.repeat(mine == 0, B)[:, None, None]  # the sequence's first piece reads the zero pad
    xe = jnp.concatenate([jnp.where(first, jnp.zeros((), xp.dtype), halo_of(xp)), xp], axis=1)
    se = None
    if segment_ids is not None:
        sp = split_pieces(segment_ids, P)
        se = jnp.concatenate([halo_of(sp), sp], axis=1)  # the halo's ids keep other documents out of the window
    y = causal_conv1d_silu(xe, w_CK, se)[:, halo:]
    return join_pieces(y, P)


# ------------------------------------------------------------------------------------------------ ring core
def _zero_start_pass(q, k, v, g, beta, segment_ids, implementation, scale, use_qk_l2norm):
    """Outputs from a zero state o [.., dv], Q_t = A_t^T q_t [.., dk], final state B [.., dk, dv] and transition
    A [.., dk, dk]: one kernel call on v widened by dk zero columns from the initial state [0 | I]; two calls
    where the Pallas kernel would not take the widened dv (not a power of two)."""
    PB, _, Hv, V = v.shape
    K = q.shape[-1]
    kernel = functools.partial(gated_delta_rule, q, k, g=g, beta=beta, segment_ids=segment_ids, scale=scale,
                               use_qk_l2norm=use_qk_l2norm, output_final_state=True, implementation=implementation)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (PB, Hv, K, K))
    zeros = jnp.zeros((*v.shape[:3], K), v.dtype)
    pallas = implementation == "pallas" or (implementation == "auto" and auto_implementation(K, V) == "pallas")
    if pallas and (V + K) & (V + K - 1):
        (o_zero, b_end), (q_eff, a_end) = kernel(v=v), kernel(v=zeros, initial_state=eye)
        return o_zero, q_eff, b_end, a_end
    h0 = jnp.concatenate([jnp.zeros((PB, Hv, K, V), jnp.float32), eye], axis=-1)
    o, s = kernel(v=jnp.concatenate([v, zeros], axis=-1), initial_state=h0)
    return o[..., :V], o[..., V:], s[..., :V], s[..., V:]


def _ring_core(q, k, v, g, beta, segment_ids, *, axis, order: np.ndarray, implementation, scale, use_qk_l2norm):
    """The gated delta rule on piece rows [P*B, Tp, ...] whose pieces lie along ring `axis` as `order` says."""
    R, P = order.shape
    PB, _, Hv, V = v.shape
    K = q.shape[-1]
    B = PB // P
    o_zero, q_eff, b_end, a_end = _zero_start_pass(q, k, v, g, beta, segment_ids, implementation, scale,
                                                   use_qk_l2norm)
    b_all = _gather_global(b_end, axis, order)  # [R*P, B, Hv, K, V]
    a_all = _gather_global(a_end, axis, order)  # [R*P, B, Hv, K, K]
    if segment_ids is not None:
        first_all = _gather_global(segment_ids[:, 0], axis, order)  # [R*P, B]
        last_all = _gather_global(segment_ids[:, -1], axis, order)
    state, incoming = jnp.zeros((B, Hv, K, V), jnp.float32), []
    for j in range(R * P):  # R*P <= 16 small matmuls: the prefix fold over pieces in sequence order
        if j and segment_ids is not None:  # a document starting at piece j's first token takes no state
            state = jnp.where((first_all[j] != last_all[j - 1])[:, None, None, None], 0.0, state)
        incoming.append(state)
        if j < R * P - 1:
            state = jnp.einsum("bhkj,bhjv->bhkv", a_all[j], state, precision=jax.lax.Precision.HIGHEST) + b_all[j]
    s_in = jnp.stack(incoming)[_my_pieces(axis, order)].reshape(PB, Hv, K, V)
    fix = jnp.einsum("bthk,bhkv->bthv", q_eff.astype(jnp.float32), s_in, precision=jax.lax.Precision.HIGHEST)
    return (o_zero.astype(jnp.float32) + fix).astype(v.dtype)


def ring_gated_delta_rule(q, k, v, g, beta, segment_ids=None, *, axis, order: np.ndarray, implementation="auto",
                          scale=None, use_qk_l2norm=True):
    """o [B, T_local, Hv, dv] for this rank's share of a sequence split over ring `axis` (`order` as `piece_order`)."""
    P = order.shape[1]
    split = lambda x: None if x is None else split_pieces(x, P)  # noqa: E731
    o = _ring_core(*map(split, (q, k, v, g, beta, segment_ids)), axis=axis, order=order,
                   implementation=implementation, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return join_pieces(o, P)


# ------------------------------------------------------------------------------------------------ Ulysses + ring
def gdn_ulysses_problem(value_heads: int, ulysses: int) -> str | None:
    """Why Gated DeltaNet heads cannot go over the Ulysses ranks (None when they can). Key heads need not divide:
    they are repeated to the value heads when they do not."""
    if ulysses > 1 and value_heads % ulysses:
        return (f"linear_num_value_heads {value_heads} is not divisible by ulysses_parallel_size {ulysses}; pick a "
                "Ulysses size that divides it (or use ringattn_parallel_size)")
    return None


def context_parallel_gated_delta_rule(q, k, v, g, beta, segment_ids=None, *, ring_axis=None, ring: int = 1,
                                      ulysses_axis=None, ulysses: int = 1, implementation="auto", scale=None,
                                      use_qk_l2norm=True):
    """The gated delta rule for this device's share [B, T_local, H, *] of a sequence laid out as `device_pieces`
    says; heads go over `ulysses_axis` around the core, states over `ring_axis`."""
    Hk, Hv = q.shape[2], v.shape[2]
    problem = gdn_ulysses_problem(Hv, ulysses)
    if problem:
        raise ValueError(problem)
    xs = [q, k, v, g, beta, segment_ids]
    if ulysses > 1:  # this device's run of the ring block -> the whole block, 1/U of the heads
        if Hk % ulysses:  # value heads split but key heads do not: give every value head its key head
            xs[0], xs[1] = (jnp.repeat(x, Hv // Hk, axis=2) for x in xs[:2])
        xs[:5] = [seq_to_heads(x, ulysses_axis) for x in xs[:5]]
        if segment_ids is not None:
            xs[5] = gather_seq(segment_ids, ulysses_axis)
    if ring > 1:
        o = ring_gated_delta_rule(*xs, axis=ring_axis, order=piece_order(ring), implementation=implementation,
                                  scale=scale, use_qk_l2norm=use_qk_l2norm)
    else:
        o = gated_delta_rule(*xs[:5], segment_ids=xs[5], scale=scale, use_qk_l2norm=use_qk_l2norm,
                             implementation=implementation)[0]
    return heads_to_seq(o, ulysses_axis) if ulysses > 1 else o
