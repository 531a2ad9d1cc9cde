"""Ring attention: each ring rank keeps its queries and passes its keys and values around the ring.

Runs inside a shard_map over the `ring` mesh axis, on one ring block per device, in the ring order of
`parallel.context` (rank r holds the sequence's chunks r and 2R-1-r): every step attends the local queries to the
block received, and the partial results are merged by their log-sum-exp. That order gives every rank the same
causal work: after the first (diagonal) step, keys from a rank j < r are visible through their first chunk only
(to every local query), keys from a rank j > r only to the local second chunk: each step costs half a block.

Masks come from the original token indices (causal) and the segment ids travelling with the keys (packed
documents, exact wherever their boundaries fall). Each block is the jnp reference (fp32 scores) on every backend.

Shapes (per device): b rows, S = 2c tokens of the ring block, H query heads, K kv heads (H % K == 0), d head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # the log-sum-exp of a row that sees nothing in a block (finite: no NaN in merges or gradients)


QUERY_CHUNK = 1024  # queries per piece of a block: float32 scores of [b, H, 1024, keys] at a time


def block_attention(q_bSHd, k_bSKd, v_bSKd, mask_bST, scale, query_chunk: int = QUERY_CHUNK):
    """(out [b, S, H, d] fp32, normalised over this block's keys; lse [b, S, H] fp32, NEG where a row sees none).

    Queries are independent, so a long block runs `query_chunk` of them at a time (lax.map), each piece
    rematerialised in the backward pass: memory [b, H, query_chunk, keys] instead of [b, H, S, keys]."""
    S = q_bSHd.shape[1]
    if S <= query_chunk or S % query_chunk:
        return _block_attention(q_bSHd, k_bSKd, v_bSKd, mask_bST, scale)
    n = S // query_chunk

    def piece(args):
        q, mask = args
        return jax.checkpoint(_block_attention, static_argnums=(4,))(q, k_bSKd, v_bSKd, mask, scale)

    qs = jnp.moveaxis(q_bSHd.reshape(q_bSHd.shape[0], n, query_chunk, *q_bSHd.shape[2:]), 1, 0)
    masks = jnp.moveaxis(mask_bST.reshape(mask_bST.shape[0], n, query_chunk, mask_bST.shape[-1]), 1, 0)
    o, lse = jax.lax.map(piece, (qs, masks))
    return (jnp.moveaxis(o, 0, 1).reshape(q_bSHd.shape[:3] + o.shape[-1:]),
            jnp.moveaxis(lse, 0, 1).reshape(q_bSHd.shape[:3]))


def _block_attention(q_bSHd, k_bSKd, v_bSKd, mask_bST, scale):
    b, S, H, d = q_bSHd.shape
    K = k_bSKd.shape[2]
    q = q_bSHd.reshape(b, S, K, H // K, d)
    s = jnp.einsum("bskgd,btkd->bkgst", q, k_bSKd, preferred_element_type=jnp.float32) * scale
    mask = mask_bST[:, None, None]
    s = jnp.where(mask, s, NEG)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    seen = l > 0
    o = jnp.einsum("bkgst,btkd->bskgd", (p / jnp.where(seen, l, 1.0)).astype(v_bSKd.dtype), v_bSKd,
                   preferred_element_type=jnp.float32)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)[..., 0]  # [b, K, g, S]
    return o.reshape(b, S, H, d), jnp.moveaxis(lse, 3, 1).reshape(b, S, H)


def merge(o1, lse1, o2, lse2):
    """Two partial attentions over disjoint key sets -> the attention over their union."""
    lse = jnp.logaddexp(lse1, lse2)
    return o1 * jnp.exp(lse1 - lse)[..., None] + o2 * jnp.exp(lse2 - lse)[..., None], lse


def _mask(idx_q, idx_k, seg_q, seg_k):
    causal = idx_q[:, None] >= idx_k[None, :]
    return causal[None] & (seg_q[:, :, None] == seg_k[:, None, :])


def ring_attention(q, k, v, segment_ids, token_index, *, axis: str, ring: int, scale=None):
    """q [b, S, H, d], k/v [b, S, K, d], segment_ids [b, S] int32, token_index [S] int32 (the original indices of
    this device's tokens, `parallel.context.ring_token_index`); inside a shard_map over `axis` of size `ring`."""
    b, S, H, d = q.shape
    scale = d**-0.5 if scale is None else scale
    c = S // 2
    r = jax.lax.axis_index(axis)
    shift = [(i, (i + 1) % ring) for i in range(ring)]
    o, lse = block_attention(q, k, v, _mask(token_index, token_index, segment_ids, segment_ids), scale)
    kv = (k, v, segment_ids, token_index)
    for step in range(1, ring):
        kv = jax.lax.ppermute(kv, axis, shift)  # now holding the block of rank (r - step) mod ring
        kb, vb, seg_k, idx_k = kv

        def lower(kb=kb, vb=vb, seg_k=seg_k, idx_k=idx_k):  # every local query, the block's first chunk
            mask = _mask(token_index, idx_k[:c], segment_ids, seg_k[:, :c])
            return block_attention(q, kb[:, :c], vb[:, :c], mask, scale)

        def higher(kb=kb, vb=vb, seg_k=seg_k, idx_k=idx_k):  # the local second chunk, the whole block
            mask = _mask(token_index[c:], idx_k, segment_ids[:, c:], seg_k)
            o2, lse2 = block_attention(q[:, c:], kb, vb, mask, scale)
            return (jnp.concatenate([jnp.zeros_like(o2), o2], axis=1),
                    jnp.concatenate([jnp.full_like(lse2, NEG), lse2], axis=1))

        source = (r - step) % ring
        ob, lseb = jax.lax.cond(source < r, lower, higher)
        o, lse = merge(o, lse, ob, lseb)
    return o.astype(q.dtype)


def ring_attention_reference(q, k, v, segment_ids, token_index, *, scale=None):
    """The same attention on one device over the whole (possibly reordered) sequence: the test's reference."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    o, _ = block_attention(q, k, v, _mask(token_index, token_index, segment_ids, segment_ids), scale)
    return o.astype(q.dtype)
