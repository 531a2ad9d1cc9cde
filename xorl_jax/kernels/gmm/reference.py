"""Grouped GEMM references in jnp: `y[rows of g] = x[rows of g] @ w[g]`, rows sorted by group.

Shapes: M rows, K input features, N output features, E groups (experts).
x_MK, w_EKN, group_sizes_E (int32). Rows past sum(group_sizes) are padding and give zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes_E, num_rows: int):
    """Group id of each row; E for padding rows past sum(group_sizes)."""
    ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    return jnp.searchsorted(ends_E, jnp.arange(num_rows, dtype=jnp.int32), side="right").astype(jnp.int32)


def gmm_reference(x_MK, w_EKN, group_sizes_E):
    """Exact grouped GEMM: one masked full product per group, fp32 accumulation, output in x.dtype.

    Costs E full products, so it is meant for CPU and small shapes (tests, the CPU default).
    """
    M = x_MK.shape[0]
    E = w_EKN.shape[0]
    group_M = row_groups(group_sizes_E, M)

    def one_group(y_MN, e):
        part_MN = jnp.dot(x_MK, w_EKN[e], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
        return jnp.where((group_M == e)[:, None], part_MN, y_MN), None

    y_MN = jnp.zeros((M, w_EKN.shape[2]), jnp.float32)
    y_MN, _ = jax.lax.scan(one_group, y_MN, jnp.arange(E, dtype=jnp.int32))
    return y_MN.astype(x_MK.dtype)


def gmm_ragged_dot(x_MK, w_EKN, group_sizes_E):
    """`jax.lax.ragged_dot` in the input dtype (GPUs accumulate in fp32 inside the product; asking for an fp32
    output would make its backward run in fp32); padding rows are masked to zero explicitly."""
    y_MN = jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E.astype(jnp.int32))
    valid_M = jnp.arange(x_MK.shape[0]) < jnp.sum(group_sizes_E)
    return jnp.where(valid_M[:, None], y_MN, 0).astype(x_MK.dtype)
