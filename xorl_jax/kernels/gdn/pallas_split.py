"""Gated delta rule kernels, "split" layout: the sequential state passes do only the state recurrence, split at
document starts, and everything independent per chunk runs in parallel kernels.

Forward (3 launches): `_intra_fwd` (per chunk and head: WY inverse X, u, w), `_state_fwd` (sequential over chunks:
v_new = u - w S, S <- e^{g_last} S + k^T (te * v_new); stores each chunk's start state), `_out_fwd` (per chunk and
head: o = (q S) * sc + (q k^T * Gamma) v_new, written straight into [B, T, H, V]).
Backward (4 launches): `_dvl` (per chunk: the intra-chunk part of dv_new, P^T do), `_state_bwd` (sequential, reverse),
then the fused layout's per-chunk cotangent kernel (pallas.py) and the intra backward (`_intra_bwd`, the fused
layout's math with its products ordered to keep fewer tiles live).

Document runs: a chunk that holds a document start (at any token) does not carry the state it received to its end
(its end decay is 0), and its new document's tokens read no carried state. So the forward recurrence splits into
runs [first chunk with a start .. next chunk with a start] that run as separate programs: run r starts from S = 0 at
its first chunk f (only the new document's rows of that chunk matter there, and they do not read S), writes nothing
for chunk f (run r - 1 owns it: it ends there with the true carried state) and owns every later chunk up to the next
run's first. The backward mirrors it. With 4 packed documents in 8192 tokens the longest sequential chain is the
longest document (47 chunks) instead of the row (128), and the programs of different documents run side by side.

Shapes: B batch, Tp padded tokens, Hk key heads, H value heads, K, V head dims, C chunk, N chunks, BV the value
columns one state-pass program owns, R run slots per row (N, or 1 without documents).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from xorl_jax.kernels.gdn import pallas as P  # the fused layout's shared helpers and launch settings

F32 = jnp.float32


def document_runs(carry, B, N, C, has_documents: bool):
    """first [B, R]: each run's first chunk, sorted, N in unused slots; nxt [B, R]: the next run's first chunk (N for
    the last run and unused slots). A run starts at chunk 0 and at every chunk that holds a document start."""
    if not has_documents:
        return jnp.zeros((B, 1), jnp.int32), jnp.full((B, 1), N, jnp.int32)
    n = jnp.arange(N, dtype=jnp.int32)
    holds_start = carry.reshape(B, N, C)[:, :, -1] == 0  # the carried state does not reach this chunk's end
    first = jnp.sort(jnp.where(holds_start | (n == 0), n, N), axis=1).astype(jnp.int32)
    nxt = jnp.concatenate([first[:, 1:], jnp.full((B, 1), N, jnp.int32)], axis=1)
    return first, nxt


def _scalar(ref, i):
    return jnp.sum(ref[pl.ds(i, 1)])


def _to_end(gam_ref, doc_ref, n, C):
    """te [C]: decay from each token to the chunk end for the chunk's last document, 0 for earlier documents."""
    rows = pl.ds(n * C, C)
    gam, doc = gam_ref[rows], doc_ref[rows]
    gl, dl = gam_ref[pl.ds(n * C + C - 1, 1)], doc_ref[pl.ds(n * C + C - 1, 1)]
    return jnp.where(doc == dl, jnp.exp(gl - gam), 0.0)  # decays g <= 0: gam falls, gl - gam <= 0


def _gate(gam_ref, carry_ref, n, C):
    """sc [C]: e^gamma for tokens that read the carried state, 0 after a document start in the chunk."""
    rows = pl.ds(n * C, C)
    return jnp.where(carry_ref[rows] != 0, jnp.exp(gam_ref[rows]), 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Forward


def _intra_fwd_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, carry_ref, u_ref, w_ref, a_ref, *, C,
                      inverse_dtype):
    dd = u_ref.dtype
    k = k_ref[...]
    beta = beta_ref[...].astype(F32)
    _, decay, sc, _, row, col = P._chunk_terms(gam_ref, doc_ref, carry_ref, C)
    kk = P._dot(k, k, trans_b=True, dtype=dd)
    L = jnp.where(row > col, beta[:, None] * kk * decay, 0.0)
    matmul = functools.partial(P._dot, dtype=inverse_dtype)
    X = P.unit_lower_inverse(L, matmul=matmul, identity=jnp.where(row == col, 1.0, 0.0))
    u_ref[...] = P._dot(X, beta[:, None] * v_ref[...].astype(F32), dtype=dd).astype(dd)
    w_ref[...] = P._dot(X, (beta * sc)[:, None] * k.astype(F32), dtype=dd).astype(dd)
    a_ref[...] = X.astype(a_ref.dtype)


def _intra_fwd(qn, kn, v, gam, beta, doc, carry, *, C, interpret, launch):
    B, Tp, Hk, K = kn.shape
    H, V = v.shape[2], v.shape[3]
    dd = v.dtype
    keyed, by_head, per_token_head, per_token, chunk_out = P._intra_specs(B, Tp, Hk, H, K, V, C)
    # fp32 operands run as TF32 products on the GPU (Triton's default for an fp32 dot)
    inverse_dtype = None if launch.inverse_dtype == "float32" else jnp.dtype(launch.inverse_dtype)
    shapes = [(V, dd), (K, dd), (C, dd)]  # u, w, X (the backward's products read X at the dot dtype)
    return pl.pallas_call(
        functools.partial(_intra_fwd_kernel, C=C, inverse_dtype=inverse_dtype),
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, X), t) for X, t in shapes],
        grid=(B, Tp // C, H),
        in_specs=[keyed, keyed, by_head(V), per_token_head, per_token_head, per_token, per_token],
        out_specs=[chunk_out(X) for X, _ in shapes],
        interpret=interpret,
        compiler_params=None if interpret else P._compiler_params(launch, "intra_fwd"),
        name="gdn_split_intra_fwd",
    )(qn, kn, v, gam, beta, doc, carry)


def _state_specs(B, H, G, Tp, N, K, BV, R):
    """BlockSpecs of the state passes, grid (value blocks, B * H, run slots): the value blocks of one head run side by
    side (they read the same w and k tiles), run slot 0 of every head first."""
    b_, h_ = (lambda bh: bh // H), (lambda bh: bh % H)
    return dict(
        seq=lambda X: pl.BlockSpec((None, None, Tp, X), lambda j, bh, r: (b_(bh), h_(bh), 0, 0)),
        seq_v=pl.BlockSpec((None, None, Tp, BV), lambda j, bh, r: (b_(bh), h_(bh), 0, j)),
        keyed=pl.BlockSpec((None, Tp, None, K), lambda j, bh, r: (b_(bh), 0, h_(bh) // G, 0)),
        token_v=pl.BlockSpec((None, Tp, None, BV), lambda j, bh, r: (b_(bh), 0, h_(bh), j)),
        per_token_head=pl.BlockSpec((None, Tp, None), lambda j, bh, r: (b_(bh), 0, h_(bh))),
        per_token=pl.BlockSpec((None, Tp), lambda j, bh, r: (b_(bh), 0)),
        per_chunk=pl.BlockSpec((None, None, N), lambda j, bh, r: (b_(bh), h_(bh), 0)),
        per_run=pl.BlockSpec((None, R), lambda j, bh, r: (b_(bh), 0)),
        state=pl.BlockSpec((None, None, K, BV), lambda j, bh, r: (b_(bh), h_(bh), 0, j)),
        states=pl.BlockSpec((None, None, N, K, BV), lambda j, bh, r: (b_(bh), h_(bh), 0, 0, j)),
    )


def _state_fwd_kernel(u_ref, w_ref, k_ref, gam_ref, doc_ref, ed_ref, first_ref, nxt_ref, h0_ref,
                      vn_ref, h_ref, st_ref, *, N, C, prefetch, skip_empty):
    dd = w_ref.dtype
    r = pl.program_id(2)
    f, nx = _scalar(first_ref, r), _scalar(nxt_ref, r)
    valid = f < N

    def run():
        fl = jnp.minimum(f, N - 1)
        # Run r > 0 enters its first chunk with S = 0: v_new = u there, and only the new document's rows reach the
        # chunk end.
        rows = pl.ds(fl * C, C)
        te = _to_end(gam_ref, doc_ref, fl, C)
        S_peel = _dot(k_ref[rows, :], (u_ref[rows, :].astype(F32) * te[:, None]).astype(dd), trans_a=True)
        S0 = jnp.where(f == 0, h0_ref[...].astype(F32), S_peel)
        start = jnp.where(f == 0, 0, f + 1)
        stop = jnp.where(valid, jnp.minimum(nx, N - 1) + 1, start)

        def load(n):
            rows = pl.ds(n * C, C)
            return w_ref[rows, :], k_ref[rows, :], u_ref[rows, :], _to_end(gam_ref, doc_ref, n, C)

        def body(n, carry):
            if prefetch:
                S, (w, k, u, te) = carry
                nxt_tiles = load(jnp.minimum(n + 1, N - 1))  # issued before this chunk's products: hides latency
            else:
                S, nxt_tiles = carry, ()
                w, k, u, te = load(n)
            S_d = S.astype(dd)
            h_ref[n] = S_d
            v_new = u.astype(F32) - _dot(w, S_d)
            vn_ref[pl.ds(n * C, C), :] = v_new.astype(dd)
            ed = ed_ref[pl.ds(n, 1)]
            S = ed[:, None] * S + _dot(k, (v_new * te[:, None]).astype(dd), trans_a=True)
            return (S, nxt_tiles) if prefetch else S

        init = (S0, load(jnp.minimum(start, N - 1))) if prefetch else S0
        S = jax.lax.fori_loop(start, stop, body, init)
        S = S[0] if prefetch else S

        @pl.when(valid & (nx >= N))
        def _():
            st_ref[...] = S

    if skip_empty:
        pl.when(valid)(run)
    else:
        run()


def _dot(a, b, trans_a=False, trans_b=False, dtype=None):
    return P._dot(a, b, trans_a=trans_a, trans_b=trans_b, dtype=dtype)


def _state_fwd(u, w, kn, gam, doc, ed, first, nxt, h0, *, C, interpret, launch):
    B, H, Tp, K = w.shape
    V, N, R, G = u.shape[-1], Tp // C, first.shape[1], H // kn.shape[2]
    BV = min(V, launch.block_v_fwd)
    s = _state_specs(B, H, G, Tp, N, K, BV, R)
    out_shape = (
        jax.ShapeDtypeStruct((B, H, Tp, V), w.dtype),  # v_new
        jax.ShapeDtypeStruct((B, H, N, K, V), w.dtype),  # chunk-start states
        jax.ShapeDtypeStruct((B, H, K, V), F32),  # final state
    )
    return pl.pallas_call(
        functools.partial(_state_fwd_kernel, N=N, C=C, prefetch=launch.prefetch_fwd,
                          skip_empty=launch.skip_empty_runs),
        out_shape=out_shape,
        grid=(V // BV, B * H, R),
        in_specs=[s["seq_v"], s["seq"](K), s["keyed"], s["per_token_head"], s["per_token"], s["per_chunk"],
                  s["per_run"], s["per_run"], s["state"]],
        out_specs=[s["seq_v"], s["states"], s["state"]],
        interpret=interpret,
        compiler_params=None if interpret else P._compiler_params(launch, "state_fwd"),
        name="gdn_split_state_fwd",
    )(u, w, kn, gam, doc, ed, first, nxt, h0)


def _chunk_specs(B, Tp, Hk, H, K, V, C):
    """Per-chunk kernels, grid (B, N, H)."""
    G = H // Hk
    return dict(
        keyed=pl.BlockSpec((None, C, None, K), lambda b, n, h: (b, n, h // G, 0)),
        token_v=pl.BlockSpec((None, C, None, V), lambda b, n, h: (b, n, h, 0)),
        per_token_head=pl.BlockSpec((None, C, None), lambda b, n, h: (b, n, h)),
        per_token=pl.BlockSpec((None, C), lambda b, n, h: (b, n)),
        head_rows=lambda X: pl.BlockSpec((None, None, C, X), lambda b, n, h: (b, h, n, 0)),
        state=pl.BlockSpec((None, None, None, K, V), lambda b, n, h: (b, h, n, 0, 0)),
    )


def _out_kernel(q_ref, k_ref, gam_ref, doc_ref, carry_ref, h_ref, vn_ref, o_ref, *, C):
    dd = vn_ref.dtype
    q, k = q_ref[...], k_ref[...]
    _, decay, sc, _, _, _ = P._chunk_terms(gam_ref, doc_ref, carry_ref, C)
    inter = _dot(q, h_ref[...], dtype=dd) * sc[:, None]
    Pm = (_dot(q, k, trans_b=True, dtype=dd) * decay).astype(dd)
    o_ref[...] = (inter + _dot(Pm, vn_ref[...])).astype(o_ref.dtype)


def _out_fwd(qn, kn, gam, doc, carry, h, vn, out_dtype, *, C, interpret, launch):
    B, Tp, Hk, K = qn.shape
    H, V = vn.shape[1], vn.shape[3]
    s = _chunk_specs(B, Tp, Hk, H, K, V, C)
    return pl.pallas_call(
        functools.partial(_out_kernel, C=C),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
        grid=(B, Tp // C, H),
        in_specs=[s["keyed"], s["keyed"], s["per_token_head"], s["per_token"], s["per_token"], s["state"],
                  s["head_rows"](V)],
        out_specs=s["token_v"],
        interpret=interpret,
        compiler_params=None if interpret else P._compiler_params(launch, "out_fwd"),
        name="gdn_split_out_fwd",
    )(qn, kn, gam, doc, carry, h, vn)


# ---------------------------------------------------------------------------------------------------------------------
# Backward


def _dvl_kernel(q_ref, k_ref, gam_ref, doc_ref, carry_ref, do_ref, dvl_ref, *, C):
    dd = do_ref.dtype
    _, decay, _, _, _, _ = P._chunk_terms(gam_ref, doc_ref, carry_ref, C)
    Pm = (_dot(q_ref[...], k_ref[...], trans_b=True, dtype=dd) * decay).astype(dd)
    dvl_ref[...] = _dot(Pm, do_ref[...], trans_a=True).astype(dvl_ref.dtype)


def _dvl(qn, kn, gam, doc, carry, do, *, C, interpret, launch):
    B, Tp, Hk, K = qn.shape
    H, V = do.shape[2], do.shape[3]
    s = _chunk_specs(B, Tp, Hk, H, K, V, C)
    return pl.pallas_call(
        functools.partial(_dvl_kernel, C=C),
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, V), do.dtype),
        grid=(B, Tp // C, H),
        in_specs=[s["keyed"], s["keyed"], s["per_token_head"], s["per_token"], s["per_token"], s["token_v"]],
        out_specs=s["head_rows"](V),
        interpret=interpret,
        compiler_params=None if interpret else P._compiler_params(launch, "dvl"),
        name="gdn_split_dvl",
    )(qn, kn, gam, doc, carry, do)


def _state_bwd_kernel(dvl_ref, do_ref, q_ref, k_ref, w_ref, gam_ref, doc_ref, carry_ref, ed_ref, first_ref, nxt_ref,
                      dst_ref, dh_ref, dvn_ref, ds0_ref, *, N, C, prefetch, skip_empty):
    """Reverse pass: dv_new = dvl + te * (k dS), dS <- e^{g_last} dS + q^T (sc * do) - w^T dv_new; dS is the
    cotangent of the chunk-end state. Run r walks from the next run's first chunk (entered with dS = 0: only rows of
    earlier documents reach the chunk start, and they do not read dS) down to its own first chunk."""
    dd = w_ref.dtype
    r = pl.program_id(2)
    f, nx = _scalar(first_ref, r), _scalar(nxt_ref, r)
    valid = f < N

    def run():
        is_last = valid & (nx >= N)
        pc = jnp.minimum(nx, N - 1)
        rows = pl.ds(pc * C, C)
        sc = _gate(gam_ref, carry_ref, pc, C)
        dS_peel = (_dot(q_ref[rows, :], (do_ref[rows, :].astype(F32) * sc[:, None]).astype(dd), trans_a=True)
                   - _dot(w_ref[rows, :], dvl_ref[rows, :], trans_a=True))
        dS0 = jnp.where(is_last, dst_ref[...], dS_peel)
        top = jnp.where(is_last, N - 1, nx - 1)
        count = jnp.where(valid, top - f + 1, 0)

        def load(n):
            rows = pl.ds(n * C, C)
            return (q_ref[rows, :], k_ref[rows, :], w_ref[rows, :], do_ref[rows, :], dvl_ref[rows, :],
                    _to_end(gam_ref, doc_ref, n, C), _gate(gam_ref, carry_ref, n, C))

        def body(i, carry):
            n = top - i
            if prefetch:
                dS, (q, k, w, do, dvl, te, sc) = carry
                nxt_tiles = load(jnp.maximum(n - 1, 0))
            else:
                dS, nxt_tiles = carry, ()
                q, k, w, do, dvl, te, sc = load(n)
            dS_d = dS.astype(dd)
            dh_ref[n] = dS_d
            dv_new = dvl.astype(F32) + te[:, None] * _dot(k, dS_d)
            dvn_ref[pl.ds(n * C, C), :] = dv_new.astype(dd)
            ed = ed_ref[pl.ds(n, 1)]
            dS = (ed[:, None] * dS + _dot(q, (do.astype(F32) * sc[:, None]).astype(dd), trans_a=True)
                  - _dot(w, dv_new.astype(dd), trans_a=True))
            return (dS, nxt_tiles) if prefetch else dS

        init = (dS0, load(jnp.clip(top, 0, N - 1))) if prefetch else dS0
        dS = jax.lax.fori_loop(0, count, body, init)
        dS = dS[0] if prefetch else dS

        @pl.when(valid & (f == 0))
        def _():
            ds0_ref[...] = dS

    if skip_empty:
        pl.when(valid)(run)
    else:
        run()


def _state_bwd(dvl, do, qn, kn, w, gam, doc, carry, ed, first, nxt, dst, *, C, interpret, launch):
    B, H, Tp, K = w.shape
    V, N, R, G = dvl.shape[-1], Tp // C, first.shape[1], H // kn.shape[2]
    BV = min(V, launch.block_v_bwd)
    s = _state_specs(B, H, G, Tp, N, K, BV, R)
    out_shape = (
        jax.ShapeDtypeStruct((B, H, N, K, V), w.dtype),  # chunk-end state cotangents
        jax.ShapeDtypeStruct((B, H, Tp, V), w.dtype),  # dv_new
        jax.ShapeDtypeStruct((B, H, K, V), F32),  # initial-state cotangent
    )
    return pl.pallas_call(
        functools.partial(_state_bwd_kernel, N=N, C=C, prefetch=launch.prefetch_bwd,
                          skip_empty=launch.skip_empty_runs),
        out_shape=out_shape,
        grid=(V // BV, B * H, R),
        in_specs=[s["seq_v"], s["token_v"], s["keyed"], s["keyed"], s["seq"](K), s["per_token_head"],
                  s["per_token"], s["per_token"], s["per_chunk"], s["per_run"], s["per_run"], s["state"]],
        out_specs=[s["states"], s["seq_v"], s["state"]],
        interpret=interpret,
        compiler_params=None if interpret else P._compiler_params(launch, "state_bwd"),
        name="gdn_split_state_bwd",
    )(dvl, do, qn, kn, w, gam, doc, carry, ed, first, nxt, dst)


def _state_grads(do, dvn, vn, h, dh, *, C, interpret, launch):
    """The fused layout's per-chunk cotangent kernel, reading do in the token-major layout the output has."""
    B, Tp, H, V = do.shape
    N, K = Tp // C, h.shape[3]
    dd = vn.dtype
    rows = lambda X: pl.BlockSpec((None, None, C, X), lambda b, hh, n: (b, hh, n, 0))  # noqa: E731
    state = pl.BlockSpec((None, None, None, K, V), lambda b, hh, n: (b, hh, n, 0, 0))
    out_shape = [jax.ShapeDtypeStruct((B, H, Tp, K), dd), jax.ShapeDtypeStruct((B, H, Tp, K), dd),  # dw, dqd
                 jax.ShapeDtypeStruct((B, H, Tp, C), dd), jax.ShapeDtypeStruct((B, H, Tp, K), dd),  # dP, dke
                 jax.ShapeDtypeStruct((B, H, N, K), F32)]  # ded, per state row
    return pl.pallas_call(
        P._state_grads_kernel,
        out_shape=out_shape,
        grid=(B, H, N),
        in_specs=[pl.BlockSpec((None, C, None, V), lambda b, hh, n: (b, n, hh, 0)), rows(V), rows(V), state, state],
        out_specs=[rows(K), rows(K), rows(C), rows(K),
                   pl.BlockSpec((None, None, None, K), lambda b, hh, n: (b, hh, n, 0))],
        interpret=interpret,
        compiler_params=None if interpret else P._compiler_params(launch, "state_grads"),
        name="gdn_split_state_grads",
    )(do, dvn, vn, h, dh)


def _intra_bwd_stages(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, carry_ref, a_ref, du_ref, cts,
                      dv_ref, dgam_ref, dbeta_ref, C):
    """`pallas._intra_bwd_kernel`'s math in stages (u, then w, then L, P, qd, ke), each finishing with what it
    owns, so at most a few [C, K] fp32 tiles are live at once; q, k, v stay bf16 until a stage needs them. Stores
    dv, dgam, dbeta and returns dq, dk (fp32) for the caller to store."""
    dd = q_ref.dtype
    beta = beta_ref[...].astype(F32)
    _, decay, sc, te, row, col = P._chunk_terms(gam_ref, doc_ref, carry_ref, C)
    Xd = a_ref[...].astype(dd)
    # u = X (beta v):  d(beta v) = X^T du
    v = v_ref[...]
    U = _dot(Xd, (beta[:, None] * v.astype(F32)).astype(dd))
    dbv = _dot(Xd, du_ref[...], trans_a=True)
    dL = _dot(dbv.astype(dd), U.astype(dd), trans_b=True)
    dv_ref[...] = (beta[:, None] * dbv).astype(dv_ref.dtype)
    dbeta = jnp.sum(dbv * v.astype(F32), axis=1)
    # w = X (beta sc k):  d(beta sc k) = X^T dw;  dL = -strictlower(d(beta v) u^T + d(beta sc k) w^T)
    k = k_ref[...]
    k32 = k.astype(F32)
    W = _dot(Xd, ((beta * sc)[:, None] * k32).astype(dd))
    dbw = _dot(Xd, cts.dw(), trans_a=True)
    dL = -jnp.where(row > col, dL + _dot(dbw.astype(dd), W.astype(dd), trans_b=True), 0.0)
    dbw_k = jnp.sum(dbw * k32, axis=1)
    dk = (beta * sc)[:, None] * dbw
    dsc = beta * dbw_k
    dbeta = dbeta + sc * dbw_k
    # L = strictlower(beta_i (k k^T) * Gamma)
    dLk = dL * _dot(k, k, trans_b=True) * decay
    dbeta = dbeta + jnp.sum(dLk, axis=1)
    dgamma_mat = beta[:, None] * dLk  # d Gamma_ij * Gamma_ij
    dkk = (dL * beta[:, None] * decay).astype(dd)
    dk = dk + _dot(dkk, k) + _dot(dkk, k, trans_a=True)
    # P = (q k^T) * Gamma
    q = q_ref[...]
    dP = cts.dP().astype(F32)
    dgamma_mat = dgamma_mat + dP * _dot(q, k, trans_b=True) * decay
    dqk = (dP * decay).astype(dd)
    dk = dk + _dot(dqk, q, trans_a=True)
    # qd = q * sc
    dqd = cts.dqd().astype(F32)
    dq = _dot(dqk, k) + dqd * sc[:, None]
    dsc = dsc + jnp.sum(dqd * q.astype(F32), axis=1)
    # ke = k * te
    dke = cts.dke().astype(F32)
    dk = dk + dke * te[:, None]
    dte_te = jnp.sum(dke * k32, axis=1) * te
    idx = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
    dgam_ref[...] = (jnp.sum(dgamma_mat, axis=1) - jnp.sum(dgamma_mat, axis=0) + dsc * sc - dte_te
                     + jnp.where(idx == C - 1, jnp.sum(dte_te), 0.0))
    dbeta_ref[...] = dbeta
    return dq, dk


class _Cotangents:
    """The state pass's per-chunk cotangents, read from refs (`read`) or computed from the chunk's do, v_new, start
    state h and end-state cotangent dh (`computed`, the products of `pallas._state_grads_kernel`)."""

    def __init__(self, dw, dP, dqd, dke):
        self.dw, self.dP, self.dqd, self.dke = dw, dP, dqd, dke

    @classmethod
    def read(cls, dw_ref, dp_ref, dqd_ref, dke_ref):
        return cls(lambda: dw_ref[...], lambda: dp_ref[...], lambda: dqd_ref[...], lambda: dke_ref[...])

    @classmethod
    def computed(cls, du_ref, do_ref, vn_ref, h_ref, dh_ref, dd):
        return cls(lambda: (-_dot(du_ref[...], h_ref[...], trans_b=True)).astype(dd),
                   lambda: _dot(do_ref[...], vn_ref[...], trans_b=True),
                   lambda: _dot(do_ref[...], h_ref[...], trans_b=True),
                   lambda: _dot(vn_ref[...], dh_ref[...], trans_b=True))


def _intra_bwd_staged_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, carry_ref, a_ref,
                             du_ref, dw_ref, dp_ref, dqd_ref, dke_ref,
                             dq_ref, dk_ref, dv_ref, dgam_ref, dbeta_ref, *, C):
    dq, dk = _intra_bwd_stages(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, carry_ref, a_ref, du_ref,
                               _Cotangents.read(dw_ref, dp_ref, dqd_ref, dke_ref), dv_ref, dgam_ref, dbeta_ref, C)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


def _intra_bwd_folded_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, carry_ref, a_ref,
                             du_ref, do_ref, vn_ref, h_ref, dh_ref,
                             dq_ref, dk_ref, dv_ref, dgam_ref, dbeta_ref, ded_ref, *, C):
    """The staged intra backward with the per-chunk cotangent products done in place (no dw, dP, dqd, dke in HBM)."""
    cts = _Cotangents.computed(du_ref, do_ref, vn_ref, h_ref, dh_ref, q_ref.dtype)
    dq, dk = _intra_bwd_stages(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, carry_ref, a_ref, du_ref, cts,
                               dv_ref, dgam_ref, dbeta_ref, C)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    ded_ref[...] = jnp.sum(h_ref[...].astype(F32) * dh_ref[...].astype(F32), axis=1)  # row sums


def _intra_bwd_folded(qn, kn, v, gam, beta, doc, carry, X, du, do, vn, h, dh, *, C, interpret, launch):
    """dq, dk, dv, dgam, dbeta and ded [B, H, N, K] (row sums of the end-decay cotangent) in one launch."""
    B, Tp, Hk, K = qn.shape
    H, V = v.shape[2], v.shape[3]
    keyed, by_head, per_token_head, per_token, chunk_out = P._intra_specs(B, Tp, Hk, H, K, V, C)
    state = pl.BlockSpec((None, None, None, K, V), lambda b, n, h: (b, h, n, 0, 0))
    gd = _grads_dtype(launch, qn.dtype)
    return pl.pallas_call(
        functools.partial(_intra_bwd_folded_kernel, C=C),
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, K), gd), jax.ShapeDtypeStruct((B, Tp, H, K), gd),
                   jax.ShapeDtypeStruct((B, Tp, H, V), gd), jax.ShapeDtypeStruct((B, Tp, H), F32),
                   jax.ShapeDtypeStruct((B, Tp, H), F32), jax.ShapeDtypeStruct((B, H, Tp // C, K), F32)],
        grid=(B, Tp // C, H),
        in_specs=[keyed, keyed, by_head(V), per_token_head, per_token_head, per_token, per_token, chunk_out(C),
                  chunk_out(V), by_head(V), chunk_out(V), state, state],
        out_specs=[by_head(K), by_head(K), by_head(V), per_token_head, per_token_head,
                   pl.BlockSpec((None, None, None, K), lambda b, n, h: (b, h, n, 0))],
        interpret=interpret,
        compiler_params=None if interpret else P._compiler_params(launch, "intra_bwd"),
        name="gdn_split_intra_bwd_folded",
    )(qn, kn, v, gam, beta, doc, carry, X, du, do, vn, h, dh)


def _grads_dtype(launch, dd):
    """dtype of the intra backward's dq, dk, dv (Launch.intra_bwd_grads)."""
    if launch.intra_bwd_grads not in ("float32", "dot"):
        raise ValueError(f"Launch.intra_bwd_grads must be 'float32' or 'dot', got {launch.intra_bwd_grads!r}")
    return F32 if launch.intra_bwd_grads == "float32" else dd


def _intra_bwd(qn, kn, v, gam, beta, doc, carry, X, du, dw, dP, dqd, dke, *, C, interpret, launch):
    staged = dict(kernel=_intra_bwd_staged_kernel, name="gdn_split_intra_bwd") if launch.intra_bwd_staged else {}
    return P._intra_bwd_call(qn, kn, v, gam, beta, doc, carry, X, du, dw, dP, dqd, dke, C=C, interpret=interpret,
                             launch=launch, grads_dtype=_grads_dtype(launch, qn.dtype), **staged)


# ---------------------------------------------------------------------------------------------------------------------
# The whole pass, tied by custom_vjp


def _named(outputs):
    return [checkpoint_name(x, P.CHECKPOINT_NAME) for x in outputs]


def _forward(qn, kn, v, gam, beta, doc, carry, ed, first, nxt, h0, C, interpret, launch):
    kw = dict(C=C, interpret=interpret, launch=launch)
    u, w, X = _intra_fwd(qn, kn, v, gam, beta, doc, carry, **kw)
    vn, h, s_final = _state_fwd(u, w, kn, gam, doc, ed, first, nxt, h0, **kw)
    o = _out_fwd(qn, kn, gam, doc, carry, h, vn, v.dtype, **kw)
    return o, s_final, (w, X, h, vn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12, 13))
def split_pass(qn, kn, v, gam, beta, doc, carry, ed, first, nxt, h0, C, interpret, launch):
    """o [B, Tp, H, V] (v.dtype), final state [B, H, K, V] fp32 from the prepared kernel inputs (see
    pallas._intra_kernel_inputs) and the document runs (`document_runs`)."""
    o, s_final, _ = _forward(qn, kn, v, gam, beta, doc, carry, ed, first, nxt, h0, C, interpret, launch)
    return o, s_final


def _split_fwd(qn, kn, v, gam, beta, doc, carry, ed, first, nxt, h0, C, interpret, launch):
    o, s_final, saved = _forward(qn, kn, v, gam, beta, doc, carry, ed, first, nxt, h0, C, interpret, launch)
    w, X, h, vn = _named(saved)
    return (o, s_final), (qn, kn, v, gam, beta, doc, carry, ed, first, nxt, w, X, h, vn)


def _split_bwd(C, interpret, launch, res, cts):
    qn, kn, v, gam, beta, doc, carry, ed, first, nxt, w, X, h, vn = res
    do, dst = cts
    kw = dict(C=C, interpret=interpret, launch=launch)
    do = do.astype(w.dtype)
    dvl = _dvl(qn, kn, gam, doc, carry, do, **kw)
    dh, dvn, ds0 = _state_bwd(dvl, do, qn, kn, w, gam, doc, carry, ed, first, nxt, dst.astype(F32), **kw)
    if launch.fold_state_grads:
        dq, dk, dv, dgam, dbeta, ded = _intra_bwd_folded(qn, kn, v, gam, beta, doc, carry, X, dvn, do, vn, h, dh,
                                                         **kw)
    else:
        dw, dqd, dP, dke, ded = _state_grads(do, dvn, vn, h, dh, **kw)
        dq, dk, dv, dgam, dbeta = _intra_bwd(qn, kn, v, gam, beta, doc, carry, X, dvn, dw, dP, dqd, dke, **kw)
    B, Tp, Hk, K = qn.shape
    G = v.shape[2] // Hk
    if G > 1:  # value heads of one group share the key head
        dq, dk = (x.reshape(B, Tp, Hk, G, K).sum(axis=3, dtype=F32) for x in (dq, dk))
    return (dq.astype(qn.dtype), dk.astype(kn.dtype), dv.astype(v.dtype), dgam, dbeta.astype(beta.dtype), None, None,
            ded.sum(-1).astype(ed.dtype), None, None, ds0)


split_pass.defvjp(_split_fwd, _split_bwd)
