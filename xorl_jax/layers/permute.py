"""Row permutations of the MoE dispatch with gather-only backward passes.

Sorting token copies by expert and putting the outputs back are row gathers by a permutation. JAX differentiates a
gather into a scatter-add, which on GPUs runs as atomic adds (order-dependent rounding, and in bf16 the k copies
of a token are summed in bf16). Since the indices here are permutations (or a permutation of k copies per token),
the transpose is another gather: these functions take the inverse permutation along and use it in the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def inverse_permutation(perm):
    """inv with inv[perm[i]] = i."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype), unique_indices=True)


@jax.custom_vjp
def take_rows(x, perm, inverse):
    """x[perm] for a permutation `perm` of x's rows whose inverse is `inverse`."""
    return x[perm]


def _take_rows_fwd(x, perm, inverse):
    return x[perm], inverse


def _take_rows_bwd(inverse, g):
    return g[inverse], None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_copies(x_ND, order, inverse, k: int):
    """x[order // k]: the k copies of each token (copy c of token n is entry n * k + c) in the order `order`, a
    permutation of N * k entries whose inverse is `inverse`. The backward sums each token's k copies in fp32."""
    return x_ND[order // k]


def _take_copies_fwd(x_ND, order, inverse, k):
    return x_ND[order // k], inverse


def _take_copies_bwd(k, inverse, g):
    copies = g[inverse].reshape(-1, k, g.shape[-1])
    return jnp.sum(copies.astype(jnp.float32), axis=1).astype(g.dtype), None, None


take_copies.defvjp(_take_copies_fwd, _take_copies_bwd)


def take_unique(x, *indices):
    """x[indices] where no two index tuples are the same: the backward writes each cotangent row to its one source
    (a scatter without atomic adds) instead of JAX's scatter-add."""
    shape, dtype = x.shape, x.dtype

    @jax.custom_vjp
    def gather(x, *idx):
        return x[idx]

    def gather_fwd(x, *idx):
        return x[idx], idx

    def gather_bwd(idx, g):
        return (jnp.zeros(shape, dtype).at[idx].set(g, unique_indices=True),) + (None,) * len(idx)

    gather.defvjp(gather_fwd, gather_bwd)
    return gather(x, *indices)
