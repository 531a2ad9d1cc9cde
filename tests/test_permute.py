"""MoE row permutations: values and gradients equal plain indexing (whose backward is a scatter-add)."""

import jax
import jax.numpy as jnp
import numpy as np

from xorl_jax.layers.permute import inverse_permutation, take_copies, take_rows, take_unique


def _perm(seed, n):
    return jnp.asarray(np.random.default_rng(seed).permutation(n), jnp.int32)


def test_inverse_permutation():
    p = _perm(0, 50)
    inv = inverse_permutation(p)
    np.testing.assert_array_equal(np.asarray(p)[np.asarray(inv)], np.arange(50))
    np.testing.assert_array_equal(inv, np.argsort(np.asarray(p)))


def test_take_rows_matches_indexing_with_gradients():
    x = jax.random.normal(jax.random.key(1), (37, 5))
    w = jax.random.normal(jax.random.key(2), (37, 5))
    p = _perm(3, 37)
    inv = inverse_permutation(p)
    ours = lambda x: jnp.sum(jnp.sin(take_rows(x, p, inv)) * w)
    plain = lambda x: jnp.sum(jnp.sin(x[p]) * w)
    np.testing.assert_array_equal(take_rows(x, p, inv), x[p])
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)


def test_take_copies_matches_indexing_with_gradients():
    N, k, D = 13, 3, 4
    x = jax.random.normal(jax.random.key(4), (N, D))
    w = jax.random.normal(jax.random.key(5), (N * k, D))
    experts = jax.random.randint(jax.random.key(6), (N * k,), 0, 5)
    order = jnp.argsort(experts, stable=True)
    inv = inverse_permutation(order)
    ours = lambda x: jnp.sum(jnp.tanh(take_copies(x, order, inv, k)) * w)
    plain = lambda x: jnp.sum(jnp.tanh(x[order // k]) * w)
    np.testing.assert_array_equal(take_copies(x, order, inv, k), x[order // k])
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)
    # under jit, and bf16 cotangents summed in fp32 stay within one bf16 rounding of the fp32 gradient
    g16 = jax.jit(jax.grad(lambda x: jnp.sum(take_copies(x, order, inv, k).astype(jnp.float32) * w)))(
        x.astype(jnp.bfloat16))
    want = jax.grad(lambda x: jnp.sum(x[order // k] * w))(x)
    np.testing.assert_allclose(np.asarray(g16, np.float32), want, rtol=1e-2, atol=2e-2)


def test_take_unique_matches_indexing_with_gradients():
    x = jax.random.normal(jax.random.key(7), (3, 5, 4))  # [ranks, slots, D]; some slots are never read
    rows = jnp.asarray([2, 0, 1, 0, 2, 1], jnp.int32)
    slots = jnp.asarray([0, 3, 1, 0, 4, 2], jnp.int32)  # distinct (rank, slot) pairs
    w = jax.random.normal(jax.random.key(8), (6, 4))
    ours = lambda x: jnp.sum(jnp.sin(take_unique(x, rows, slots)) * w)
    plain = lambda x: jnp.sum(jnp.sin(x[rows, slots]) * w)
    np.testing.assert_array_equal(take_unique(x, rows, slots), x[rows, slots])
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)
