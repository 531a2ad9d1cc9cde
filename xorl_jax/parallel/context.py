"""Context parallelism: the sequence of every activation split over the `ring` and `ulysses` mesh axes.

Contract for layers (attention, Gated DeltaNet, anything that mixes tokens):

- Sizes: `context_parallel()` returns a frozen `ContextParallel(ring, ulysses)` for the mesh of the current
  `rules.use_mesh` (sizes 1 outside one). Nothing is stored on the model: the same module runs with or without it.
- Layout: between layers a [B, T, ...] activation has B split over the batch axes (data, fsdp, expert) and T over
  ("ring", "ulysses"), ring-major: device (ring r, ulysses u) holds block r * U + u of T / (R * U) tokens (the
  logical name "seq" maps there; flattened [B * T] tokens use "tokens"). Token-wise layers need nothing.
- Ring order: with ring > 1 the model runs on the sequence in *ring order* (`to_ring_order`, applied to input ids,
  positions and segment ids once at the model's entry): T is cut into 2R chunks and ring rank r holds chunks r and
  2R-1-r (the zigzag that gives each rank the same causal work). `ring_token_index(n, ...)` gives a device's
  original token indices; `hidden_states` come out in ring order (`to_ring_order` the labels), logits in the
  original order. With ring = 1 the order is the original one.
- Ulysses: inside a `shard_map`, `seq_to_heads(x)` turns this device's [b, T/(R*U), h, d] into [b, T/R, h/U, d]
  (all-to-all over "ulysses": the whole ring block, 1/U of the heads) and `heads_to_seq` undoes it. The head count
  given to one device must divide by U (`repeat_kv_heads` widens too few KV heads).
- Wrapping a layer's core: `context_shard_map(fn, in_names, out_names)` is `shard_map` over the whole mesh with specs
  from the activation rules' logical names (e.g. ("batch", "seq", "heads", None)); inside `fn` the mesh context is
  hidden, so kernels called there (`rules.per_shard`, `constrain`) run as plain local calls, and `fn` may use
  collectives over "ring" / "ulysses" (`jax.lax.axis_index(RING)` is the ring rank).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from xorl_jax.parallel import rules as rules_lib

RING, ULYSSES = "ring", "ulysses"
CONTEXT_AXES = (RING, ULYSSES)  # the order in which the sequence is split (ring-major)


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    ring: int = 1
    ulysses: int = 1

    @property
    def size(self) -> int:
        return self.ring * self.ulysses

    @property
    def active(self) -> bool:
        return self.size > 1


def context_parallel() -> ContextParallel:
    """The context-parallel sizes of the current mesh (`rules.use_mesh`); 1 x 1 without one."""
    ctx = rules_lib.current()
    if ctx is None:
        return ContextParallel()
    return ContextParallel(ring=ctx.axis_size(RING), ulysses=ctx.axis_size(ULYSSES))


# ------------------------------------------------------------------------------------------------ ring order
def ring_chunk_order(ring: int) -> np.ndarray:
    """The original chunk held at each chunk slot of the ring order: [0, 2R-1, 1, 2R-2, ...]."""
    return np.stack([np.arange(ring), 2 * ring - 1 - np.arange(ring)], axis=1).reshape(-1)


def _permute_chunks(x, order: np.ndarray, axis: int):
    axis = axis % x.ndim
    n = len(order)
    if x.shape[axis] % n:
        raise ValueError(f"{x.shape[axis]} tokens do not split into {n} chunks of the ring order; make the sequence "
                         f"length a multiple of {n}")
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    return jnp.take(x.reshape(shape), jnp.asarray(order), axis=axis).reshape(x.shape)


def to_ring_order(x, axis: int = 1, ring: int | None = None):
    """Original token order -> ring order along `axis` (a no-op when ring is 1); for global (jit-level) arrays."""
    ring = context_parallel().ring if ring is None else ring
    return x if ring == 1 else _permute_chunks(x, ring_chunk_order(ring), axis)


def from_ring_order(x, axis: int = 1, ring: int | None = None):
    """Ring order -> original order along `axis` (a no-op when ring is 1)."""
    ring = context_parallel().ring if ring is None else ring
    return x if ring == 1 else _permute_chunks(x, np.argsort(ring_chunk_order(ring)), axis)


def ring_token_index(n_block: int, ring: int, ulysses: int = 1, *, after_ulysses: bool = True):
    """Inside a `context_shard_map` body: the original index of each of this device's tokens, int32.

    after_ulysses=True: `n_block` tokens of the whole ring block (as after `seq_to_heads`); False: this device's own
    `n_block` tokens before the all-to-all (1/U of the ring block)."""
    r = jax.lax.axis_index(RING) if ring > 1 else 0
    block = n_block if after_ulysses else n_block * ulysses
    if ring == 1:
        idx = jnp.arange(block, dtype=jnp.int32)
    else:
        c = block // 2
        a = jnp.arange(c, dtype=jnp.int32)
        idx = jnp.concatenate([r * c + a, (2 * ring - 1 - r) * c + a])
    if after_ulysses or ulysses == 1:
        return idx
    u = jax.lax.axis_index(ULYSSES)
    return jax.lax.dynamic_slice_in_dim(idx, u * n_block, n_block)


# ------------------------------------------------------------------------------------------------ ulysses
def seq_to_heads(x, axis: str = ULYSSES, seq_axis: int = 1, head_axis: int = 2):
    """Inside shard_map: [.., T/n, .., h, ..] -> [.., T, .., h/n, ..] over mesh axis `axis` (size n)."""
    return jax.lax.all_to_all(x, axis, split_axis=head_axis, concat_axis=seq_axis, tiled=True)


def heads_to_seq(x, axis: str = ULYSSES, seq_axis: int = 1, head_axis: int = 2):
    """The inverse of `seq_to_heads`."""
    return jax.lax.all_to_all(x, axis, split_axis=seq_axis, concat_axis=head_axis, tiled=True)


def gather_seq(x, axis: str = ULYSSES, seq_axis: int = 1):
    """Inside shard_map: the ring block of a per-token array that has no heads (e.g. segment ids)."""
    return jax.lax.all_gather(x, axis, axis=seq_axis, tiled=True)


def repeat_kv_heads(k, heads_local: int, kv_local: int, ulysses: int, head_axis: int = 2):
    """KV heads repeated so that the all-to-all gives each Ulysses rank the KV heads its query heads use.

    GQA keeps query head h on KV head h // (H / K); after repeating each KV head U / K times (U a multiple of K)
    that stays true with U KV heads, one per rank. Returns k unchanged when K already divides by U."""
    if kv_local % ulysses == 0:
        return k
    if ulysses % kv_local or heads_local % ulysses:
        raise ValueError(f"{kv_local} KV heads and {heads_local} query heads per device do not split over "
                         f"ulysses_parallel_size {ulysses}")
    return jnp.repeat(k, ulysses // kv_local, axis=head_axis)


def ulysses_heads_problem(heads: int, kv_heads: int, tensor: int, ulysses: int) -> str | None:
    """Why these head counts cannot run under Ulysses (None when they can): heads per tensor rank must divide by U,
    KV heads per tensor rank must divide by U or divide U (then they are repeated)."""
    if ulysses == 1:
        return None
    h = heads // tensor if heads % tensor == 0 else heads
    k = kv_heads // tensor if kv_heads % tensor == 0 else kv_heads
    if h % ulysses:
        return f"{h} attention heads per tensor rank are not divisible by ulysses_parallel_size {ulysses}"
    if k % ulysses and ulysses % k:
        return (f"{k} KV heads per tensor rank neither divide nor are divisible by ulysses_parallel_size "
                f"{ulysses}")
    return None


def row_length_problem(tokens: int, ring: int, ulysses: int) -> str | None:
    """Why rows of `tokens` cannot be split over these ranks (None when they can): ring order needs 2R equal chunks,
    each ring block U equal runs."""
    need = (2 * ring if ring > 1 else 1) * ulysses
    if tokens % need:
        return (f"rows of {tokens} tokens do not split into {need} equal pieces "
                f"({'2 x ringattn_parallel_size x ' if ring > 1 else ''}ulysses_parallel_size); set "
                f"data.pad_to_multiple_of (or data.sample_packing_sequence_len) to a multiple of {need}")
    return None


# ------------------------------------------------------------------------------------------------ shard_map
def _spec(ctx, names, shape):
    spec = rules_lib.logical_to_spec(names, ctx.rules.activations, ctx.mesh)
    if shape is not None:
        for dim, axes in enumerate(spec):
            n = int(np.prod([ctx.mesh.shape[a] for a in rules_lib._as_tuple(axes)]))
            if shape[dim] % n:
                raise ValueError(f"dimension {dim} of size {shape[dim]} ({names[dim]}) does not split over mesh axes "
                                 f"{axes} ({n} ways)" + (": make the sequence length a multiple of the "
                                 "context-parallel size" if names[dim] in ("seq", "tokens") else ""))
    return spec


def context_shard_map(fn, in_names, out_names):
    """`fn` run per device on its shards, split by logical activation names (None = a replicated argument, e.g. a
    weight; a None name inside = that dimension unsplit). out_names: the names of the one output, or a list of them
    for a tuple of outputs. Every split must divide its dimension (the caller names a head axis only when the
    tensor axis divides it). Inside `fn` the mesh context is hidden, so kernels run as plain local calls; outside a
    multi-device mesh `fn` is called as it is."""

    def wrapped(*args):
        ctx = rules_lib.current()
        if ctx is None or ctx.mesh.size == 1:
            return fn(*args)
        in_specs = tuple(P() if n is None else _spec(ctx, n, a.shape) for n, a in zip(in_names, args))
        many = isinstance(out_names, list)
        out_specs = tuple(_spec(ctx, n, None) for n in out_names) if many else _spec(ctx, out_names, None)

        def local(*a):
            with rules_lib.without_mesh():
                return fn(*a)

        return rules_lib.shard_map_compat(local, ctx.mesh, in_specs, out_specs)(*args)

    return wrapped
