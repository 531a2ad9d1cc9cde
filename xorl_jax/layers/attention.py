"""Self-attention of the Qwen family: q/k RMSNorm per head, then RoPE, GQA, optional sigmoid output gate.

Qwen3: plain output. Qwen3.5 (`gated=True`): q_proj also yields a per-dimension gate (per head the first d outputs
are the query, the next d the gate), `out * sigmoid(gate)` before o_proj, zero-centred q/k norms, partial rotary.
Shapes: B batch, T tokens, D hidden, H query heads, K kv heads, d head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xorl_jax.kernels.attention import attention
from xorl_jax.layers.linear import cast, param
from xorl_jax.layers.norm import RMSNorm
from xorl_jax.layers.rope import apply_rope
from xorl_jax.parallel.context import context_parallel
from xorl_jax.parallel.context_attention import context_attention


class Attention(nnx.Module):
    def __init__(
        self,
        *,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        gated: bool = False,
        zero_centered_norm: bool = False,
        dtype=jnp.float32,
        implementation: str = "auto",
        rngs: nnx.Rngs,
    ):
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        self.gated = gated
        self.head_dim = head_dim
        self.dtype = dtype
        self.implementation = implementation
        q_out = 2 * head_dim if gated else head_dim
        self.q_proj = param(rngs, (hidden, heads, q_out), ("embed", "heads", "head_dim"))
        self.k_proj = param(rngs, (hidden, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(rngs, (hidden, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(rngs, (heads, head_dim, hidden), ("heads", "head_dim", "embed"))
        self.q_norm = RMSNorm(head_dim, eps, zero_centered=zero_centered_norm, rngs=rngs)
        self.k_norm = RMSNorm(head_dim, eps, zero_centered=zero_centered_norm, rngs=rngs)

    def __call__(self, x_BTD, cos, sin, segment_ids=None, layout=None):
        dt = self.dtype
        q, gate, k, v = self._qkv(x_BTD, cos, sin)
        if context_parallel().active:  # the sequence is split over devices: Ulysses and/or ring attention
            out = context_attention(q, k, v, segment_ids=segment_ids, implementation=self.implementation)
        else:
            out = attention(q, k, v, segment_ids=segment_ids, implementation=self.implementation, layout=layout)
        if gate is not None:
            out = out * jax.nn.sigmoid(gate)
        return jnp.einsum("bthe,hed->btd", out.astype(dt), cast(self.o_proj, dt))

    def _qkv(self, x_BTD, cos, sin):
        """q (normed, rotated), the output gate (None unless gated), k (normed, rotated), v: for training and
        sampling alike."""
        dt = self.dtype
        x = x_BTD.astype(dt)
        q = jnp.einsum("btd,dhe->bthe", x, cast(self.q_proj, dt))
        gate = None
        if self.gated:
            q, gate = q[..., : self.head_dim], q[..., self.head_dim :]
        k = jnp.einsum("btd,dke->btke", x, cast(self.k_proj, dt))
        v = jnp.einsum("btd,dke->btke", x, cast(self.v_proj, dt))
        # Norm first, RoPE second (the order Qwen3 uses; the parity tests catch a swap).
        return apply_rope(self.q_norm(q), cos, sin), gate, apply_rope(self.k_norm(k), cos, sin), v

    def cached(self, x_BTD, cos, sin, cache=None, *, segment_ids=None, cache_valid=None, layout=None):
        """Attention for sampling; returns (output [B,T,D], (k, v) [B,T,K,d]: the new tokens' cache entries).

        cache None (prefill): the tokens attend causally within their segment, as __call__ (same kernel).
        cache (k_cache, v_cache) [B,K,S,d] (decode): the tokens attend to the cached entries where cache_valid
        [B,S] holds and causally to each other."""
        q, gate, k, v = self._qkv(x_BTD, cos, sin)
        if cache is None:
            out = attention(q, k, v, segment_ids=segment_ids, implementation=self.implementation, layout=layout)
        else:
            out = attention_with_cache(q, k, v, cache[0], cache[1], cache_valid)
        if gate is not None:
            out = out * jax.nn.sigmoid(gate)
        dt = self.dtype
        return jnp.einsum("bthe,hed->btd", out.astype(dt), cast(self.o_proj, dt)), KVEntries(k, v)


class KVEntries(NamedTuple):
    """An attention layer's keys and values: new tokens' entries [B, T, K, d], or a whole cache [B, K, S, d] (each kv
    head's entries contiguous, the layout the decode products read without a transpose)."""

    k: jax.Array
    v: jax.Array


def attention_with_cache(q_BTHd, k_BTKd, v_BTKd, k_cache_BKSd, v_cache_BKSd, cache_valid_BS, *, scale=None):
    """New tokens' attention over cached keys (where `cache_valid_BS`) and, causally, over themselves: one softmax
    over both, with the numerics of `kernels.attention.attention_reference` (fp32 scores, probabilities in v's
    dtype). Decoding is memory bound (T = 1 reads the whole cache), so plain XLA products serve."""
    B, T, H, d = q_BTHd.shape
    K, S = k_BTKd.shape[2], k_cache_BKSd.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q_BTHd.reshape(B, T, K, H // K, d)
    old = jnp.einsum("btkgd,bksd->bkgts", q, k_cache_BKSd.astype(q.dtype), preferred_element_type=jnp.float32)
    new = jnp.einsum("btkgd,bskd->bkgts", q, k_BTKd, preferred_element_type=jnp.float32)
    low = jnp.finfo(jnp.float32).min
    old = jnp.where(cache_valid_BS[:, None, None, None, :], old * scale, low)
    new = jnp.where(jnp.tril(jnp.ones((T, T), bool)), new * scale, low)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(v_BTKd.dtype)
    out = (jnp.einsum("bkgts,bksd->btkgd", probs[..., :S], v_cache_BKSd.astype(v_BTKd.dtype))
           + jnp.einsum("bkgts,bskd->btkgd", probs[..., S:], v_BTKd))
    return out.reshape(B, T, H, d)
