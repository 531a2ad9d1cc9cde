"""SwiGLU with the hand-written backward equals autodiff of the plain jnp expression (stacked and halved layouts,
fp32 and bf16), and its backward writes one concatenation instead of a pad + add per half."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xorl_jax.layers.swiglu import swiglu


def _plain(h, axis):
    if h.shape[axis] == 2:
        gate, up = (jax.lax.index_in_dim(h, i, axis, keepdims=False) for i in (0, 1))
    else:
        gate, up = jnp.split(h, 2, axis=axis)
    return jax.nn.silu(gate.astype(jnp.float32)).astype(h.dtype) * up


@pytest.mark.parametrize("shape,axis", [((3, 5, 2, 8), -2), ((7, 16), -1), ((4, 3, 2, 6), 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_matches_autodiff_of_plain_jnp(shape, axis, dtype, tol):
    h = (3 * jax.random.normal(jax.random.PRNGKey(0), shape)).astype(dtype)
    out_shape = jax.eval_shape(lambda h: _plain(h, axis), h).shape
    g = jax.random.normal(jax.random.PRNGKey(1), out_shape).astype(dtype)
    ours, vjp = jax.vjp(lambda h: swiglu(h, axis), h)
    ref, vjp_ref = jax.vjp(lambda h: _plain(h, axis), h)
    assert ours.dtype == ref.dtype == dtype and ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    (dh,), (dh_ref,) = vjp(g), vjp_ref(g)
    assert dh.dtype == dtype
    # bf16: ours keeps the products in fp32 until one final rounding, autodiff rounds after each op
    np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(dh_ref, np.float32), rtol=3 * tol,
                               atol=3 * tol * float(jnp.max(jnp.abs(dh_ref.astype(jnp.float32)))))


def test_backward_builds_no_padded_halves():
    h = jnp.ones((4, 2, 64), jnp.float32)
    text = jax.jit(jax.grad(lambda h: jnp.sum(swiglu(h, -2)))).lower(h).as_text()
    assert "pad" not in text
    text_ref = jax.jit(jax.grad(lambda h: jnp.sum(_plain(h, -2)))).lower(h).as_text()
    assert "pad" in text_ref  # the check can tell the two apart
