"""SwiGLU activation silu(gate) * up on a fused gate/up projection output, with a hand-written backward.

Why not plain jnp: autodiff of `silu(h[..., 0, :]) * h[..., 1, :]` builds the gradient of each half separately and
adds them into a zero-padded full-size array (XLA's pad + add of two [.., 2, F] buffers per layer: 15 ms of a
480 ms Qwen3 1.7B step on an H200). Here the backward writes both halves of the gradient in one concatenation.

Numerics follow HF: silu in fp32 rounded to the input dtype, times `up` in the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# The name of the activation's output, so a remat policy can keep it: the down projection's weight gradient needs
# it, and keeping it costs half of what keeping the gate/up product does (which that gradient pass reads anyway).
CHECKPOINT_NAME = "mlp_activation"


def _halves(h, axis: int):
    """(gate, up) of h: along `axis`, either a size-2 axis (index 0 = gate) or two concatenated halves."""
    if h.shape[axis] == 2:
        gate, up = jnp.split(h, 2, axis=axis)
        return jnp.squeeze(gate, axis), jnp.squeeze(up, axis)
    return jnp.split(h, 2, axis=axis)


def swiglu(h, axis: int = -1):
    """silu(gate) * up for h holding [gate, up] along `axis` (a size-2 axis, or [gate | up] halves); the result is
    named CHECKPOINT_NAME for remat policies."""
    return checkpoint_name(_swiglu(h, axis), CHECKPOINT_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _swiglu(h, axis: int):
    gate, up = _halves(h, axis)
    return jax.nn.silu(gate.astype(jnp.float32)).astype(h.dtype) * up


def _swiglu_fwd(h, axis):
    return _swiglu(h, axis), h


def _swiglu_bwd(axis, h, g):
    gate, up = (x.astype(jnp.float32) for x in _halves(h, axis))
    g = g.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = g * (gate * sig).astype(h.dtype).astype(jnp.float32)
    if h.shape[axis] == 2:
        dh = jnp.stack([d_gate, d_up], axis=axis)
    else:
        dh = jnp.concatenate([d_gate, d_up], axis=axis)
    return (dh.astype(h.dtype),)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
