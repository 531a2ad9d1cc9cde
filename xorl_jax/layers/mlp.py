"""SwiGLU MLP: down(silu(gate(x)) * up(x)). gate and up are fused in one [D, 2, F] kernel (index 0 = gate)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from xorl_jax.layers.linear import cast, param
from xorl_jax.layers.swiglu import swiglu


class MLP(nnx.Module):
    def __init__(self, *, hidden: int, intermediate: int, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.gate_up_proj = param(rngs, (hidden, 2, intermediate), ("embed", None, "mlp"))
        self.down_proj = param(rngs, (intermediate, hidden), ("mlp", "embed"))

    def __call__(self, x_BTD):
        dt = self.dtype
        h = jnp.einsum("btd,dcf->btcf", x_BTD.astype(dt), cast(self.gate_up_proj, dt))
        a = swiglu(h, -2)
        return jnp.einsum("btf,fd->btd", a, cast(self.down_proj, dt))
