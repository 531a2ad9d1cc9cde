"""Grouped expert GEMM: `gmm(x, w, group_sizes, implementation=...)`.

y_MN[rows of g] = x_MK[rows of g] @ w_EKN[g], rows sorted by group, group_sizes_E int32 on device; rows past
sum(group_sizes) give zeros. Differentiable w.r.t. x and w for every implementation.
implementation:
  "auto"       triton on an NVIDIA GPU where jax_triton imports, else "reference"
  "triton"     jax-triton kernels (triton.py); RuntimeError where unavailable
  "reference"  exact jnp (fp32 accumulation, one masked product per group): CPU default, small shapes
  "ragged_dot" jax.lax.ragged_dot (dense masked product on GPU: slow, memory hungry)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from xorl_jax.kernels.gmm.reference import gmm_ragged_dot, gmm_reference

IMPLEMENTATIONS = ("auto", "triton", "reference", "ragged_dot")
# The name every grouped GEMM's output carries, so a remat policy can keep it (whatever the implementation, it is
# a matmul that a `dot_general` test does not see: the Triton kernels are custom calls).
CHECKPOINT_NAME = "grouped_matmul"


def _unavailable_reason() -> str | None:
    try:
        devices = jax.devices()
    except RuntimeError as err:  # no backend at all
        return str(err)
    if not devices or devices[0].platform != "gpu":
        return f"default device is {devices[0].platform if devices else 'none'}, not an NVIDIA GPU"
    version = getattr(devices[0].client, "platform_version", "") or ""
    if "rocm" in version.lower() or "hip" in version.lower():
        return f"device is an AMD GPU ({devices[0].device_kind})"
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except ImportError as err:
        return f"jax_triton/triton do not import ({err})"
    return None


@functools.lru_cache(maxsize=None)
def _cached_unavailable_reason() -> str | None:
    return _unavailable_reason()


def triton_available() -> bool:
    """True on an NVIDIA GPU where jax_triton and triton import."""
    return _cached_unavailable_reason() is None


def gmm(x, w, group_sizes, implementation: str = "auto"):
    """x [M, K], w [E, K, N], group_sizes [E] int32 -> y [M, N] in x.dtype, named CHECKPOINT_NAME for remat."""
    return checkpoint_name(_gmm(x, w, group_sizes, implementation), CHECKPOINT_NAME)


def _gmm(x, w, group_sizes, implementation: str):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"gmm implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gmm needs x [M, K] and w [E, K, N] with one K; got x {x.shape} and w {w.shape}")
    if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"gmm needs integer group_sizes of shape [E] = ({w.shape[0]},); got {group_sizes.dtype} {group_sizes.shape}"
        )
    group_sizes = group_sizes.astype(jnp.int32)
    if implementation == "auto":
        implementation = "triton" if triton_available() else "reference"
    if implementation == "reference":
        return gmm_reference(x, w, group_sizes)
    if implementation == "ragged_dot":
        return gmm_ragged_dot(x, w.astype(x.dtype), group_sizes)
    reason = _cached_unavailable_reason()
    if reason is not None:
        raise RuntimeError(
            f"gmm implementation 'triton' is not available on this device: {reason}; "
            "use moe_implementation: native or eager"
        )
    # imported here: triton.py imports triton and jax_triton, optional GPU dependencies absent from CPU installs
    from xorl_jax.kernels.gmm.triton import gmm_triton

    return gmm_triton(x, w.astype(x.dtype), group_sizes)


def gmm_gather(x_SK, w, group_sizes, order, inverse, copies: int, implementation: str = "triton"):
    """gmm(x_SK[order // copies], w, group_sizes) without writing the gathered rows to memory: the rows of x are
    copied `copies` times (copy c of row s is entry s * copies + c) and taken in the order `order`, a permutation of
    the S * copies entries whose inverse is `inverse` (the MoE dispatch: token copies sorted by expert). "triton":
    the kernels read each row from x in place; "reference": the jnp gather then gmm_reference (tests, CPU). The input
    gradient sums each row's copies in fp32. Output named CHECKPOINT_NAME."""
    M = order.shape[0]
    if x_SK.ndim != 2 or M != x_SK.shape[0] * copies or inverse.shape != order.shape:
        raise ValueError(f"gmm_gather needs x [S, K] and order/inverse of S * copies entries; got x {x_SK.shape}, "
                         f"order {order.shape}, inverse {inverse.shape}, copies {copies}")
    source = (order // copies).astype(jnp.int32)
    if implementation == "reference":
        return gmm(x_SK[source], w, group_sizes, implementation="reference")
    if implementation != "triton":
        raise ValueError(f"gmm_gather implementation {implementation!r} is not one of ('triton', 'reference')")
    reason = _cached_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"gmm_gather implementation 'triton' is not available on this device: {reason}")
    from xorl_jax.kernels.gmm.triton import gmm_gather_triton  # optional GPU dependency, as in _gmm

    y = gmm_gather_triton(x_SK, w.astype(x_SK.dtype), group_sizes.astype(jnp.int32), source,
                          inverse.astype(jnp.int32), copies)
    return checkpoint_name(y, CHECKPOINT_NAME)


__all__ = ["CHECKPOINT_NAME", "gmm", "gmm_gather", "gmm_reference", "gmm_ragged_dot", "triton_available",
           "IMPLEMENTATIONS"]
