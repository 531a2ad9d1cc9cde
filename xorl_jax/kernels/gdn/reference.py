"""Gated delta rule in pure jnp: the recurrent definition and the chunked (WY) form.

Both are the CPU backend and the reference for the Pallas kernel. All math is fp32.

Shapes: B batch, T tokens, Hk key heads, Hv value heads (value head h reads key head h // (Hv // Hk)),
K key head dim (dk), V value head dim (dv), N chunks, C chunk length.

Packed documents: `segment_ids` [B, T] (documents 1..n, 0 = padding). A document starts wherever
segment_ids[t] != segment_ids[t-1]; there the state restarts from zero (t = 0 starts from `initial_state`).
A reset is applied through a per-row document counter, so two neighbouring documents that happen to share
an id are still separated only if the id changes; packers give each document its own id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6


def l2norm(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def document_starts(segment_ids, T: int, B: int):
    """[B, T] bool, True where a new document begins after token 0 (t = 0 is the initial-state segment)."""
    if segment_ids is None:
        return jnp.zeros((B, T), bool)
    seg = jnp.asarray(segment_ids)
    if seg.shape != (B, T):
        raise ValueError(f"segment_ids has shape {seg.shape}; expected [B, T] = {(B, T)}")
    return jnp.concatenate([jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """Checks shapes, expands key heads to value heads, normalizes, scales; returns fp32 [B, T, Hv, *]."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q {q.shape} and k {k.shape} must both be [B, T, Hk, dk]")
    B, T, Hk, K = q.shape
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v {v.shape} must be [B, T, Hv, dv] with B, T = {(B, T)}")
    Hv = v.shape[2]
    if Hv % Hk:
        raise ValueError(f"value heads {Hv} must be a multiple of key heads {Hk}")
    if g.shape != (B, T, Hv) or beta.shape != (B, T, Hv):
        raise ValueError(f"g {g.shape} and beta {beta.shape} must both be [B, T, Hv] = {(B, T, Hv)}")
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    if use_qk_l2norm:
        q32, k32 = l2norm(q32), l2norm(k32)
    q32 = q32 * (K**-0.5 if scale is None else scale)
    group = Hv // Hk
    if group > 1:
        q32, k32 = jnp.repeat(q32, group, axis=2), jnp.repeat(k32, group, axis=2)
    return q32, k32, v.astype(jnp.float32), g.astype(jnp.float32), beta.astype(jnp.float32)


def _initial_state(initial_state, B, Hv, K, V):
    if initial_state is None:
        return jnp.zeros((B, Hv, K, V), jnp.float32)
    if initial_state.shape != (B, Hv, K, V):
        raise ValueError(f"initial_state has shape {initial_state.shape}; expected [B, Hv, dk, dv] = {(B, Hv, K, V)}")
    return initial_state.astype(jnp.float32)


def gated_delta_rule_recurrent(q, k, v, g, beta, *, segment_ids=None, scale=None, use_qk_l2norm=True,
                               initial_state=None, output_final_state=False, _reset_state=True):
    """Token-by-token definition: S_t = e^{g_t} S_{t-1} + k_t (beta_t (v_t - e^{g_t} S_{t-1}^T k_t))^T, o_t = S_t^T q_t.

    `_reset_state=False` ignores document boundaries (only for tests that prove the reset matters).
    """
    B, T, _, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    q32, k32, v32, g32, b32 = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    starts = document_starts(segment_ids, T, B) & _reset_state
    S0 = _initial_state(initial_state, B, Hv, K, V)

    def step(S_BHKV, xs):
        q_t, k_t, v_t, g_t, b_t, start_t = xs
        S_BHKV = jnp.where(start_t[:, None, None, None], 0.0, S_BHKV) * jnp.exp(g_t)[..., None, None]
        delta_BHV = b_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", S_BHKV, k_t))
        S_BHKV = S_BHKV + k_t[..., :, None] * delta_BHV[..., None, :]
        return S_BHKV, jnp.einsum("bhkv,bhk->bhv", S_BHKV, q_t)

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q32, k32, v32, g32, b32, starts)]
    S_final, o_TBHV = jax.lax.scan(step, S0, time_major)
    o = jnp.moveaxis(o_TBHV, 0, 1).astype(v.dtype)
    return o, (S_final if output_final_state else None)


def _chunk_intra(q_C, k_C, v_C, g_C, b_C, doc_C, carry_C):
    """Per-chunk quantities, batched over leading dims; inputs [..., C, *] fp32.

    doc_C: document counter per token; carry_C: True where the token still belongs to the document that was open at
    the chunk start (so it reads the carried state). Returns u, w, the masked q k^T decay matrix P, the decayed q,
    the key weights for the chunk-end state, the chunk-end decay and whether the carried state survives the chunk.
    """
    C = g_C.shape[-1]
    gamma = jnp.cumsum(g_C, axis=-1)
    same_doc = doc_C[..., :, None] == doc_C[..., None, :]
    causal = jnp.tril(jnp.ones((C, C), bool))
    keep = causal & same_doc
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay_CC = jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)  # Gamma, masked by causality and document

    kk = jnp.einsum("...ik,...jk->...ij", k_C, k_C)
    strict = b_C[..., :, None] * kk * decay_CC * (1.0 - jnp.eye(C, dtype=jnp.float32))
    state_gate = jnp.where(carry_C, jnp.exp(gamma), 0.0)  # e^{gamma_i} for tokens that read the carried state
    rhs = jnp.concatenate([b_C[..., None] * v_C, (b_C * state_gate)[..., None] * k_C], axis=-1)
    sol = _mm(unit_lower_inverse(strict), rhs)  # (I + strictlower(diag(beta) K K^T * Gamma))^-1 rhs
    V = v_C.shape[-1]
    u, w = sol[..., :V], sol[..., V:]

    P = jnp.einsum("...ik,...jk->...ij", q_C, k_C) * decay_CC
    q_decayed = q_C * state_gate[..., None]
    last_doc = doc_C[..., -1:]
    to_end = jnp.where(doc_C == last_doc, jnp.exp(jnp.where(doc_C == last_doc, gamma[..., -1:] - gamma, 0.0)), 0.0)
    k_to_end = k_C * to_end[..., None]
    end_decay = jnp.where(carry_C[..., -1], jnp.exp(gamma[..., -1]), 0.0)
    return u, w, P, q_decayed, k_to_end, end_decay


def _mm(a, b):
    return jnp.einsum("...ij,...jk->...ik", a, b, precision=jax.lax.Precision.HIGHEST)


def unit_lower_inverse(L, *, matmul=_mm, identity=None):
    """(I + L)^-1 for strictly lower-triangular L [..., C, C]: L is nilpotent (L^C = 0), so the inverse is
    sum_{k<C} (-L)^k = prod_j (I + (-L)^(2^j)), 2 log2(C) - 2 matrix products. Matmuls only, on purpose: a LAPACK
    triangular solve on a CPU host with several fake devices can starve the collectives' thread pool (observed as a
    hang), and the Pallas kernel runs this same function with its in-kernel `matmul` and an iota `identity`."""
    C = L.shape[-1]
    M = -L
    X = (jnp.eye(C, dtype=L.dtype) if identity is None else identity) + M
    p = 1
    while 2 * p < C:
        M = matmul(M, M)
        X = X + matmul(X, M)
        p *= 2
    return X


def gated_delta_rule_chunked(q, k, v, g, beta, *, segment_ids=None, scale=None, use_qk_l2norm=True,
                             initial_state=None, output_final_state=False, chunk_size=64, _reset_state=True):
    """Chunked (WY) gated delta rule, equal to `gated_delta_rule_recurrent` up to float rounding.

    Intra-chunk terms are computed for all chunks at once; the state passes chunk to chunk in a rematerialized scan,
    so backward keeps only the chunk-start states. Document boundaries inside a chunk mask the decay matrix and stop
    the carried state; T need not be a multiple of `chunk_size` (padding tokens have beta = 0 and change nothing).
    """
    B, T, _, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    C = int(chunk_size)
    q32, k32, v32, g32, b32 = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    starts = document_starts(segment_ids, T, B) & _reset_state
    S0 = _initial_state(initial_state, B, Hv, K, V)

    pad = (-T) % C
    N = (T + pad) // C
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=1)  # [B, T]
    if pad:  # padding continues the last document with g = 0, beta = 0: the state passes through unchanged
        q32, k32, v32 = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q32, k32, v32))
        g32, b32 = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (g32, b32))
        doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")

    def to_chunks(x):  # [B, T', Hv, *] -> [B, N, Hv, C, *]
        x = x.reshape(B, N, C, Hv, *x.shape[3:])
        return jnp.moveaxis(x, 3, 2)

    doc_BNC = doc.reshape(B, N, C)
    # A token reads the carried state iff no document started in its chunk at or before it.
    carry_BNC = doc_BNC == (doc_BNC[:, :, :1] - _starts_at_chunk_start(starts, pad, B, N, C))
    doc_BNHC = jnp.broadcast_to(doc_BNC[:, :, None, :], (B, N, Hv, C))
    carry_BNHC = jnp.broadcast_to(carry_BNC[:, :, None, :], (B, N, Hv, C))
    u, w, P, q_dec, k_end, end_decay = _chunk_intra(
        to_chunks(q32), to_chunks(k32), to_chunks(v32), to_chunks(g32), to_chunks(b32), doc_BNHC, carry_BNHC
    )

    @jax.checkpoint
    def step(S_BHKV, xs):
        u_c, w_c, P_c, qd_c, ke_c, ed_c = xs
        v_new = u_c - jnp.einsum("bhck,bhkv->bhcv", w_c, S_BHKV)
        o_c = jnp.einsum("bhck,bhkv->bhcv", qd_c, S_BHKV) + jnp.einsum("bhij,bhjv->bhiv", P_c, v_new)
        S_BHKV = ed_c[..., None, None] * S_BHKV + jnp.einsum("bhck,bhcv->bhkv", ke_c, v_new)
        return S_BHKV, o_c

    chunk_major = [jnp.moveaxis(x, 1, 0) for x in (u, w, P, q_dec, k_end, end_decay)]
    S_final, o_NBHCV = jax.lax.scan(step, S0, chunk_major)
    o = jnp.moveaxis(o_NBHCV, 0, 1)  # [B, N, Hv, C, V]
    o = jnp.moveaxis(o, 2, 3).reshape(B, N * C, Hv, V)[:, :T]
    return o.astype(v.dtype), (S_final if output_final_state else None)


def _starts_at_chunk_start(starts, pad, B, N, C):
    """[B, N, 1] int: 1 where a document starts exactly at a chunk's first token (then nothing reads the carry)."""
    s = jnp.pad(starts, ((0, 0), (0, pad))) if pad else starts
    return s.reshape(B, N, C)[:, :, :1].astype(jnp.int32)
