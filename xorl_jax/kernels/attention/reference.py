"""The jnp reference of causal, document-masked (packed) multi-head attention with GQA: fp32 scores and softmax,
causal & same-segment mask. Runs everywhere; every other path is tested against it.

Shapes: B batch, T tokens, H query heads, K kv heads (H % K == 0), d head dim.
segment_ids [B, T] int32: tokens attend only to earlier tokens of the same segment (documents of a packed row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mask_BTT(segment_ids_BT, T):
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    if segment_ids_BT is None:
        return causal
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal & same


def attention_reference(q_BTHd, k_BTKd, v_BTKd, *, segment_ids=None, scale=None):
    B, T, H, d = q_BTHd.shape
    K = k_BTKd.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q_BTHd.reshape(B, T, K, H // K, d)  # query head h uses kv head h // (H/K)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_BTKd, preferred_element_type=jnp.float32) * scale
    mask = _mask_BTT(segment_ids, T)[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BTKd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BTKd)
    return out.reshape(B, T, H, d)
