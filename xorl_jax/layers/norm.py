"""RMSNorm variants of the Qwen family.

- Qwen3 / Qwen3-MoE: `w * cast_in(x * rsqrt(mean(x^2) + eps))`, weight initialised to 1.
- Qwen3.5 (zero-centred): `cast_in(x * rsqrt(mean(x^2) + eps) * (1 + w))` computed in fp32, weight initialised to 0.
- Qwen3.5 gated norm (linear attention): `cast_in(cast_in(w * cast_in(rmsnorm(x))) * silu(z))`, plain w.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xorl_jax.layers.linear import param


def _normalize(x32, eps):
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, zero_centered: bool = False, axis_name: str = "norm", rngs: nnx.Rngs):
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = param(rngs, (dim,), (axis_name,), init="zeros" if zero_centered else "ones")

    def __call__(self, x):
        in_dtype = x.dtype
        y32 = _normalize(x.astype(jnp.float32), self.eps)
        w = self.weight[...]
        if self.zero_centered:
            return (y32 * (1.0 + w.astype(jnp.float32))).astype(in_dtype)
        return w.astype(in_dtype) * y32.astype(in_dtype)


class GatedRMSNorm(nnx.Module):
    """Per-head norm over the last dim, gated by silu(z) (Qwen3.5 linear-attention output norm)."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), ("norm",), init="ones")

    def __call__(self, x, z):
        in_dtype = x.dtype
        y = _normalize(x.astype(jnp.float32), self.eps).astype(in_dtype)
        y = (self.weight[...].astype(in_dtype) * y).astype(in_dtype)
        return (y * jax.nn.silu(z.astype(jnp.float32))).astype(in_dtype)
