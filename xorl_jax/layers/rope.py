"""Rotary position embedding, rotate-half (NeoX) style, with optional partial rotary dims.

Shapes: B batch, T tokens, H heads, d head dim, r rotary dims (r <= d, even).
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_cos_sin(positions_BT, rotary_dim: int, theta: float, dtype):
    """cos/sin tables [B, T, r] for integer positions; frequencies in fp32 as HF computes them."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, r/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BTHd, cos_BTr, sin_BTr):
    """Rotate the first r dims of every head; the rest pass through unchanged (partial rotary)."""
    r = cos_BTr.shape[-1]
    cos, sin = cos_BTr[:, :, None, :], sin_BTr[:, :, None, :]
    if r == x_BTHd.shape[-1]:
        return x_BTHd * cos + _rotate_half(x_BTHd) * sin
    x_rot, x_pass = x_BTHd[..., :r], x_BTHd[..., r:]
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    return jnp.concatenate([x_rot, x_pass], axis=-1)
