"""Parameter helpers shared by every layer.

Every parameter carries its logical axis names in the `axes` metadata key; `parallel/rules.py` maps those names
to mesh axes. Model code never builds a mesh or a PartitionSpec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, axes, *, std: float = 0.02, init: str = "normal", dtype=jnp.float32) -> nnx.Param:
    """A parameter with logical axes. init: normal(std) | ones | zeros."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, axes=tuple(axes))


def cast(w: nnx.Param, dtype) -> jax.Array:
    """Parameter value in the compute dtype (params stay fp32; compute casts at use)."""
    return w[...].astype(dtype)
