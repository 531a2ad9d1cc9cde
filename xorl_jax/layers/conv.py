"""Causal depthwise conv1d + SiLU with the window reset at document starts (Qwen3.5 Gated DeltaNet).

y_t[c] = silu( sum_{j<K} w[c, j] * x_{t-K+1+j}[c] ), zero-padded on the left; w[c, K-1] multiplies the current token.
A token's window holds only tokens of its own document (segment_ids change = new document).
Shapes: B batch, T tokens, C channels, K kernel width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_conv1d_silu(x_BTC, w_CK, segment_ids=None, *, _reset_window=True):
    """x [B,T,C], w [C,K] (HF conv1d.weight [C,1,K] squeezed) -> [B,T,C] in x's dtype.

    Products are taken in w's dtype (as HF does) and summed in fp32. XLA fuses the K shifted multiply-adds into one
    elementwise pass, which is all a depthwise conv with K = 4 needs. `_reset_window=False` lets windows cross
    documents (only for tests that prove the reset matters).
    """
    B, T, C = x_BTC.shape
    if w_CK.ndim != 2 or w_CK.shape[0] != C:
        raise ValueError(f"conv weight has shape {w_CK.shape}; expected [C, K] with C = {C} (squeeze HF's [C,1,K])")
    K = w_CK.shape[1]
    x = x_BTC.astype(w_CK.dtype)
    if segment_ids is not None and _reset_window:
        seg = jnp.asarray(segment_ids)
        if seg.shape != (B, T):
            raise ValueError(f"segment_ids has shape {seg.shape}; expected [B, T] = {(B, T)}")
        doc = jnp.cumsum(jnp.concatenate([jnp.zeros((B, 1), jnp.int32),
                                          (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)], axis=1), axis=1)
    else:
        doc = None
    acc = jnp.zeros((B, T, C), jnp.float32)
    for j in range(K):
        shift = K - 1 - j  # tap j reads token t - shift
        xs = jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, :T] if shift else x
        tap = (xs * w_CK[:, j]).astype(jnp.float32)
        if doc is not None and shift:
            same = jnp.pad(doc, ((0, 0), (shift, 0)), constant_values=-1)[:, :T] == doc
            tap = jnp.where(same[..., None], tap, 0.0)
        acc = acc + tap
    y = acc.astype(w_CK.dtype)
    return jax.nn.silu(y).astype(x_BTC.dtype)


def causal_conv1d_silu_step(x_BTC, window_BJC, w_CK):
    """The conv of `causal_conv1d_silu` for T new tokens continuing a sequence whose last K-1 inputs are
    `window_BJC` (J = K-1; zeros at a sequence start). Returns (y [B,T,C], the new last K-1 inputs), with the same
    products and summation order as the full conv, so decoding reproduces it."""
    B, T, C = x_BTC.shape
    K = w_CK.shape[1]
    seq = jnp.concatenate([window_BJC.astype(x_BTC.dtype), x_BTC], axis=1)  # [B, K-1+T, C]
    x = seq.astype(w_CK.dtype)
    acc = jnp.zeros((B, T, C), jnp.float32)
    for j in range(K):
        acc = acc + (x[:, j: j + T] * w_CK[:, j]).astype(jnp.float32)
    y = jax.nn.silu(acc.astype(w_CK.dtype)).astype(x_BTC.dtype)
    return y, seq[:, T:]
