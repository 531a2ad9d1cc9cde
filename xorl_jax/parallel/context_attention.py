"""Full attention under context parallelism: Ulysses all-to-all around it, ring attention across ring ranks.

The layer's q/k/v arrive sequence-split ([B, T, H, d] with T over ring x ulysses, `parallel.context`). Per device:
Ulysses (U > 1) trades the sequence split for a head split (KV heads repeated when fewer than U per tensor rank),
so each device holds its ring block of T / R tokens for H / U heads; then either the whole-sequence attention kernel
of `kernels.attention` (R = 1: cuDNN or the jnp reference, exactly as on one device) or ring attention over the ring
ranks (R > 1: the jnp reference per block, on every backend); then back to the sequence split.
"""

from __future__ import annotations

import jax.numpy as jnp

from xorl_jax.kernels.attention import attention
from xorl_jax.kernels.ring_attention import ring_attention
from xorl_jax.parallel import rules as rules_lib
from xorl_jax.parallel.context import (RING, context_parallel, context_shard_map, gather_seq, heads_to_seq,
                                       repeat_kv_heads, ring_token_index, seq_to_heads)


def context_attention(q_BTHd, k_BTKd, v_BTKd, *, segment_ids=None, scale=None, implementation="auto"):
    """Causal, document-masked GQA attention of sequence-split q/k/v (global arrays, under `rules.use_mesh`)."""
    cp = context_parallel()
    ctx = rules_lib.current()
    H, K = q_BTHd.shape[2], k_BTKd.shape[2]
    tp = ctx.axis_size("tensor") if ctx is not None else 1
    split = tp > 1 and H % tp == 0 and K % tp == 0
    q_names = ("batch", "seq", "heads" if split else None, None)
    kv_names = ("batch", "seq", "kv_heads" if split else None, None)
    packed = segment_ids is not None
    if segment_ids is None and cp.ring > 1:  # ring masks need ids to travel with the keys: one document per row
        segment_ids = jnp.ones(q_BTHd.shape[:2], jnp.int32)

    def local(q, k, v, *seg):
        seg = seg[0] if seg else None
        if cp.ulysses > 1:
            k = repeat_kv_heads(k, q.shape[2], k.shape[2], cp.ulysses)
            v = repeat_kv_heads(v, q.shape[2], v.shape[2], cp.ulysses)
            q, k, v = seq_to_heads(q), seq_to_heads(k), seq_to_heads(v)
            seg = None if seg is None else gather_seq(seg)
        if cp.ring > 1:
            index = ring_token_index(q.shape[1], cp.ring)
            out = ring_attention(q, k, v, seg, index, axis=RING, ring=cp.ring, scale=scale)
        else:
            out = attention(q, k, v, segment_ids=seg if packed else None, scale=scale, implementation=implementation)
        return heads_to_seq(out) if cp.ulysses > 1 else out

    seg_args = () if segment_ids is None else (segment_ids,)
    seg_names = () if segment_ids is None else (("batch", "seq"),)
    return context_shard_map(local, (q_names, kv_names, kv_names) + seg_names, q_names)(
        q_BTHd, k_BTKd, v_BTKd, *seg_args)
