"""Gated DeltaNet token mixer of Qwen3.5 (the "linear_attention" layers).

x -> in_proj_qkv -> causal depthwise conv + SiLU (reset at document starts) -> q | k | v heads;
beta = sigmoid(in_proj_b x); g = -exp(A_log) * softplus(in_proj_a x + dt_bias) (fp32, <= 0);
o = gated delta rule(q, k, v, g, beta) with the state reset at document starts; gated RMSNorm with silu(in_proj_z x);
out_proj. Value head h reads key head h // (Hv / Hk).
Shapes: B batch, T tokens, D hidden, C conv channels (2*Hk*dk + Hv*dv), Kc conv width,
Hk/Hv key/value heads, dk/dv key/value head dims.

Under context parallelism (ring and/or Ulysses axes of the mesh, see parallel/context.py) T is split over devices:
the conv takes its halo from the previous piece and the recurrence runs as parallel/context_gdn.py describes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xorl_jax.kernels.gdn import gated_delta_rule
from xorl_jax.layers.conv import causal_conv1d_silu, causal_conv1d_silu_step
from xorl_jax.layers.linear import cast, param
from xorl_jax.layers.norm import GatedRMSNorm
from xorl_jax.parallel import context as cp
from xorl_jax.parallel.context_gdn import context_parallel_gated_delta_rule, conv_with_halo, device_pieces
from xorl_jax.parallel.rules import current, logical_to_spec, per_shard, shard_map_compat


GDN_IMPLEMENTATIONS = ("auto", "pallas", "chunked", "recurrent")
_ROWS2, _ROWS3, _ROWS4 = ("batch", None), ("batch", None, None), ("batch", None, None, None)
_SEQ2, _SEQ3, _SEQ4 = ("batch", "seq"), ("batch", "seq", None), ("batch", "seq", None, None)


def resolve_gdn_implementation(name: str) -> str:
    """Validate the name; "auto" is resolved per device by the kernel dispatcher in `kernels.gdn`."""
    if name not in GDN_IMPLEMENTATIONS:
        raise ValueError(f"gdn_implementation {name!r} is not one of {GDN_IMPLEMENTATIONS}")
    return name


class GatedDeltaNet(nnx.Module):
    def __init__(
        self,
        *,
        hidden: int,
        key_heads: int,
        value_heads: int,
        key_dim: int,
        value_dim: int,
        conv_kernel: int,
        eps: float,
        dtype=jnp.float32,
        implementation: str = "auto",
        rngs: nnx.Rngs,
    ):
        if value_heads % key_heads:
            raise ValueError(f"linear_num_value_heads {value_heads} is not a multiple of linear_num_key_heads {key_heads}")
        self.dtype = dtype
        self.implementation = implementation
        self.key_heads, self.value_heads = key_heads, value_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        channels = 2 * key_heads * key_dim + value_heads * value_dim
        self.in_proj_qkv = param(rngs, (hidden, channels), ("embed", "gdn_channels"))
        self.in_proj_z = param(rngs, (hidden, value_heads, value_dim), ("embed", "gdn_heads", "head_dim"))
        self.in_proj_b = param(rngs, (hidden, value_heads), ("embed", "gdn_heads"))
        self.in_proj_a = param(rngs, (hidden, value_heads), ("embed", "gdn_heads"))
        self.conv1d = param(rngs, (channels, conv_kernel), ("gdn_channels", None), std=0.3)
        self.dt_bias = param(rngs, (value_heads,), ("gdn_heads",), init="ones")
        self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, value_heads)), axes=("gdn_heads",))
        self.norm = GatedRMSNorm(value_dim, eps, rngs=rngs)
        self.out_proj = param(rngs, (value_heads, value_dim, hidden), ("gdn_heads", "head_dim", "embed"))

    def _heads(self, x, qkv):
        """The core's inputs from the layer input `x` [B,T,D] and the convolved q|k|v channels: q, k [B,T,Hk,dk],
        v [B,T,Hv,dv], the output gate z, beta, and the log decay g (fp32)."""
        dt = self.dtype
        B, T, _ = x.shape
        nk, nv = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        q = qkv[..., :nk].reshape(B, T, self.key_heads, self.key_dim)
        k = qkv[..., nk : 2 * nk].reshape(B, T, self.key_heads, self.key_dim)
        v = qkv[..., 2 * nk : 2 * nk + nv].reshape(B, T, self.value_heads, self.value_dim)
        z = jnp.einsum("btd,dhe->bthe", x, cast(self.in_proj_z, dt))
        beta = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, cast(self.in_proj_b, dt)))
        a = jnp.einsum("btd,dh->bth", x, cast(self.in_proj_a, dt))
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        )
        return q, k, v, z, beta, g

    def __call__(self, x_BTD, segment_ids=None, valid=None):
        dt = self.dtype
        B, T, _ = x_BTD.shape
        x = x_BTD.astype(dt)
        if valid is not None:  # padding contributes nothing (as HF's padding mask does)
            x = x * valid[..., None].astype(dt)
        split = cp.context_parallel()
        qkv = jnp.einsum("btd,dc->btc", x, cast(self.in_proj_qkv, dt))
        if split.active:
            qkv = _conv_split(qkv, cast(self.conv1d, dt), segment_ids, split)
        else:
            qkv = causal_conv1d_silu(qkv, cast(self.conv1d, dt), segment_ids)
        q, k, v, z, beta, g = self._heads(x, qkv)
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        impl = self.implementation
        if split.active:
            o = _core_split(q, k, v, g, beta, segment_ids, split, impl)
            o = self.norm(o.astype(dt), z)
            return jnp.einsum("bthe,hed->btd", o, cast(self.out_proj, dt))
        # Rows are independent: each device runs the recurrence on its own rows, so the kernel is never
        # gathered and the chunk loop holds no collectives.
        o = per_shard(lambda q, k, v, g, beta, seg: gated_delta_rule(q, k, v, g, beta, segment_ids=seg,
                                                                     use_qk_l2norm=True, implementation=impl)[0],
                      in_names=(_ROWS4, _ROWS4, _ROWS4, _ROWS3, _ROWS3, _ROWS2), out_names=_ROWS4,
                      )(q, k, v, g, beta, segment_ids)
        o = self.norm(o.astype(dt), z)
        return jnp.einsum("bthe,hed->btd", o, cast(self.out_proj, dt))

    # ---------------------------------------------------------------------------------------- decoding (sampling)
    def cached(self, x_BTD, cache=None, *, segment_ids=None, valid=None):
        """The layer for sampling; returns (output [B,T,D], (state [B,Hv,dk,dv] fp32, conv window [B,Kc-1,C])):
        what the next tokens need, the recurrent state and the last Kc-1 conv inputs.

        cache None (prefill): as __call__ (padding zeroed, state and conv reset where `segment_ids` change: a
        left-padded row starts clean at its first token). cache (state, window): the tokens continue from it."""
        dt = self.dtype
        B, T, _ = x_BTD.shape
        x = x_BTD.astype(dt)
        if valid is not None:
            x = x * valid[..., None].astype(dt)
        qkv = jnp.einsum("btd,dc->btc", x, cast(self.in_proj_qkv, dt))
        w = cast(self.conv1d, dt)
        Kc = w.shape[1]
        if cache is None:
            window = jnp.pad(qkv, ((0, 0), (max(Kc - 1 - T, 0), 0), (0, 0)))[:, -(Kc - 1):] if Kc > 1 else qkv[:, :0]
            qkv = causal_conv1d_silu(qkv, w, segment_ids)
            state = None
        else:
            state, window = cache
            qkv, window = causal_conv1d_silu_step(qkv, window, w)
        q, k, v, z, beta, g = self._heads(x, qkv)
        if state is None:
            seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
            impl = self.implementation
            o, state = _rows_per_device(
                lambda q, k, v, g, beta, seg: gated_delta_rule(q, k, v, g, beta, segment_ids=seg, use_qk_l2norm=True,
                                                               output_final_state=True, implementation=impl),
                (_ROWS4, _ROWS4, _ROWS4, _ROWS3, _ROWS3, _ROWS2), (_ROWS4, _ROWS4))(q, k, v, g, beta, seg)
        else:  # a few tokens from a carried state: the recurrence itself
            o, state = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, initial_state=state,
                                        output_final_state=True, implementation="recurrent")
        o = self.norm(o.astype(dt), z)
        return jnp.einsum("bthe,hed->btd", o, cast(self.out_proj, dt)), DeltaNetState(state, window)


class DeltaNetState(NamedTuple):
    """What a Gated DeltaNet layer carries between decoding steps."""

    state: jax.Array  # [B, Hv, dk, dv] fp32 recurrent state
    window: jax.Array  # [B, Kc-1, C] the last Kc-1 conv inputs


def _rows_per_device(fn, in_names, out_names):
    """`parallel.rules.per_shard` for a function of several outputs: each device runs `fn` on its own rows."""

    def wrapped(*args):
        ctx = current()
        if ctx is None or ctx.mesh.size == 1:
            return fn(*args)
        spec = lambda names: logical_to_spec(names, ctx.rules.activations)  # noqa: E731
        in_specs = tuple(spec(n) for n in in_names)
        for a, s in zip(args, in_specs):
            for dim, axes in zip(a.shape, s):
                size = 1
                for ax in ((axes,) if isinstance(axes, str) else (axes or ())):
                    size *= ctx.mesh.shape[ax]
                if dim % size:
                    return fn(*args)
        return shard_map_compat(fn, ctx.mesh, in_specs, tuple(spec(n) for n in out_names))(*args)

    return wrapped

def _conv_split(qkv, w, segment_ids, split):
    """The causal conv on a sequence split over the context axes: each piece takes its predecessor's tail."""
    order = device_pieces(split.ring, split.ulysses)
    axes = tuple(a for a, n in zip(cp.CONTEXT_AXES, (split.ring, split.ulysses)) if n > 1)
    conv = lambda x, w, *seg: conv_with_halo(x, w, seg[0] if seg else None, axes=axes, order=order)  # noqa: E731
    if segment_ids is None:
        return cp.context_shard_map(conv, (_SEQ3, None), _SEQ3)(qkv, w)
    return cp.context_shard_map(conv, (_SEQ3, None, _SEQ2), _SEQ3)(qkv, w, segment_ids)


def _core_split(q, k, v, g, beta, segment_ids, split, implementation):
    """The gated delta rule on a sequence split over the context axes (heads over Ulysses, state over the ring)."""
    core = lambda *a: context_parallel_gated_delta_rule(  # noqa: E731
        *a, ring_axis=cp.RING, ring=split.ring, ulysses_axis=cp.ULYSSES, ulysses=split.ulysses,
        use_qk_l2norm=True, implementation=implementation)
    return cp.context_shard_map(core, (_SEQ4, _SEQ4, _SEQ4, _SEQ3, _SEQ3, _SEQ2), _SEQ4)(
        q, k, v, g, beta, segment_ids)
