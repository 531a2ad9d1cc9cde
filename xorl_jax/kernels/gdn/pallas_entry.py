"""The Pallas Gated DeltaNet entry point: the split kernels (`pallas_split.py`, the default) or the fused layout
(`pallas.py`), one contract. pallas_split builds on pallas.py's helpers, so the choice between them lives here."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xorl_jax.kernels.gdn.pallas import (F32, FUSED_LAUNCH, INTRA_DEFAULT, KERNELS, KERNELS_DEFAULT, LAUNCH,
                                         STATE_GRADS_DEFAULT, Launch, _intra_kernel_inputs, _intra_pass, _intra_xla,
                                         _state_pass)
from xorl_jax.kernels.gdn.pallas_split import document_runs, split_pass
from xorl_jax.kernels.gdn.reference import _initial_state, document_starts


def gated_delta_rule_pallas(q, k, v, g, beta, *, segment_ids=None, scale=None, use_qk_l2norm=True,
                            initial_state=None, output_final_state=False, chunk_size=64, interpret=None,
                            intra=None, state_grads=None, launch: Launch | None = None, kernels=None):
    """Same contract as `reference.gated_delta_rule_chunked`; products take bf16 operands when v is bf16.

    `intra`: "pallas" (intra-chunk kernels) or "xla" (batched XLA products); None = INTRA_DEFAULT.
    `state_grads`: "pallas" (`_state_grads_kernel`) or "xla" (einsums) for the state pass's per-chunk cotangents;
    None = STATE_GRADS_DEFAULT.
    `launch`: the kernels' Triton launch settings (`Launch`; None = LAUNCH for "split", FUSED_LAUNCH for "fused").
    `kernels`: "split" or "fused" (see KERNELS_DEFAULT); `intra` and `state_grads` choose among the fused layout's
    variants and are ignored by "split".

    GPU constraints (Triton): dk and dv powers of two >= 16, chunk_size 16, 32 or 64.
    `interpret=None` runs the kernels in Pallas interpret mode unless the default backend is a GPU.
    """
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q {q.shape}, k {k.shape} must be [B,T,Hk,dk] and v {v.shape} [B,T,Hv,dv]")
    B, T, Hk, K = q.shape
    H, V = v.shape[2], v.shape[3]
    if H % Hk:
        raise ValueError(f"value heads {H} must be a multiple of key heads {Hk}")
    if g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"g {g.shape} and beta {beta.shape} must both be [B, T, Hv] = {(B, T, H)}")
    C = int(chunk_size)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if not interpret:
        for name, d in (("dk", K), ("dv", V), ("chunk_size", C)):
            if d < 16 or d & (d - 1):
                raise ValueError(f"gdn pallas kernel needs {name} a power of two >= 16, got {d}; "
                                 "use implementation='chunked'")
    dd = jnp.bfloat16 if v.dtype == jnp.bfloat16 else F32
    starts = document_starts(segment_ids, T, B)
    h0 = _initial_state(initial_state, B, H, K, V)
    kernels = KERNELS_DEFAULT if kernels is None else kernels
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if launch is None:
        launch = LAUNCH if kernels == "split" else FUSED_LAUNCH
    if kernels == "split":
        intra_in, ed = _intra_kernel_inputs(q, k, v, g, beta, starts, C, scale, use_qk_l2norm, dd)
        Tp = intra_in[0].shape[1]
        first, nxt = document_runs(intra_in[6], B, Tp // C, C, segment_ids is not None)
        o, s_final = split_pass(*intra_in, ed, first, nxt, h0, C, bool(interpret), launch)
        return o[:, :T].astype(v.dtype), (s_final if output_final_state else None)
    intra = INTRA_DEFAULT if intra is None else intra
    state_grads = STATE_GRADS_DEFAULT if state_grads is None else state_grads
    if state_grads not in ("pallas", "xla"):
        raise ValueError(f"state_grads must be 'pallas' or 'xla', got {state_grads!r}")
    if intra == "xla":
        u, w, P, qd, ke, ed = _intra_xla(q, k, v, g, beta, starts, C, scale, use_qk_l2norm, dd)
        o, s_final = _state_pass(u, w, P, qd, ke, ed, h0, C, bool(interpret), state_grads, launch)
        o = jnp.moveaxis(o, 1, 2)[:, :T].astype(v.dtype)
        return o, (s_final if output_final_state else None)
    if intra != "pallas":
        raise ValueError(f"intra must be 'pallas' or 'xla', got {intra!r}")

    intra_in, ed = _intra_kernel_inputs(q, k, v, g, beta, starts, C, scale, use_qk_l2norm, dd)
    u, w, P, qd, ke = _intra_pass(*intra_in, C, bool(interpret), launch)
    o, s_final = _state_pass(u, w, P, qd, ke, ed, h0, C, bool(interpret), state_grads, launch)
    o = jnp.moveaxis(o, 1, 2)[:, :T].astype(v.dtype)  # [B, H, Tp, V] -> [B, T, H, V]
    return o, (s_final if output_final_state else None)
