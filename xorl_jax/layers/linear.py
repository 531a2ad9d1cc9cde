"""Parameter helpers shared by every layer.

Every parameter carries its logical axis names in the `axes` metadata key; `parallel/rules.py` maps those names
to mesh axes. Model code never builds a mesh or a PartitionSpec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

# The name of a weight cast to the compute dtype (fp32 parameters, bf16 compute), so a remat policy can keep it for
# the backward: recomputing the cast there rereads the fp32 weight, and with unrolled layers makes XLA copy each
# layer's fp32 slice of the stacked parameters out so the backward can read it. Kept, it costs 2 bytes per parameter
# of the layer until the backward has used it. Whether `dots_attention_saveable` keeps it: models.common.SAVED_NAMES
# and weight_casts_kept (unrolled layers, no layer transform).
WEIGHTS_NAME = "compute_weights"


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


def cast(w: nnx.Param, dtype, name: str = WEIGHTS_NAME) -> jax.Array:
    """Parameter value in the compute dtype (params stay fp32; compute casts at use), named `name` for the remat
    policy only where a cast happens: a weight already in the compute dtype would be saved as a second copy of itself
    for nothing. Outside a remat region the name changes nothing."""
    value = w[...]
    if value.dtype == jnp.dtype(dtype):
        return value
    return checkpoint_name(value.astype(dtype), name)
