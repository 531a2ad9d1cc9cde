"""Gated DeltaNet with the sequence split over fake CPU devices equals one device: ring (in the ring order of
parallel/context.py), Ulysses, both, and the conv halo; forward and gradients, with packed documents."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from xorl_jax.kernels.gdn.reference import gated_delta_rule_chunked
from xorl_jax.layers.conv import causal_conv1d_silu
from xorl_jax.parallel import context_gdn as cg
from xorl_jax.parallel.rules import shard_map_compat

B, T, HK, HV, DK, DV = 3, 128, 2, 4, 8, 8


def segments():
    """Row 0: documents of random lengths crossing piece boundaries, padding at the end; row 1: one document;
    row 2: a document starting at every multiple of T/8 (every piece boundary of the layouts tested)."""
    rng = np.random.default_rng(0)
    seg = np.zeros((B, T), np.int32)
    t, doc = 0, 1
    while t < T - 5:
        n = int(min(T - 5 - t, rng.choice([1, 3, 11, 29, 40])))
        seg[0, t:t + n], t, doc = doc, t + n, doc + 1
    seg[1] = 1
    seg[2] = np.arange(T) // (T // 8) + 1
    return jnp.asarray(seg)


def inputs(seed, hk=HK):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, hk, DK))
    k = jax.random.normal(ks[1], (B, T, hk, DK))
    v = jax.random.normal(ks[2], (B, T, HV, DV))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, HV)) - 1.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV)))
    return q, k, v, g, beta


def layout(ring, ulysses):
    """Token permutation: position i of the laid-out sequence holds global token perm[i]; devices hold equal
    consecutive runs of it in linear (ring-major) order."""
    order = cg.device_pieces(ring, ulysses)
    size = T // order.size
    return np.concatenate([np.arange(s * size, (s + 1) * size) for s in order.reshape(-1)])


def run_split(fn, args, ring, ulysses, ):
    """fn(*local shards) under shard_map over a (ring, ulysses) mesh; global inputs/outputs in natural order."""
    mesh = Mesh(np.asarray(jax.devices()[:ring * ulysses]).reshape(ring, ulysses), ("ring", "ulysses"))
    perm = layout(ring, ulysses)
    inv = np.argsort(perm)
    spec = P(None, ("ring", "ulysses"))
    sharded = shard_map_compat(fn, mesh, tuple(spec for _ in args), spec)
    return sharded(*(a[:, perm] for a in args))[:, inv]


def reference(q, k, v, g, beta, seg):
    return gated_delta_rule_chunked(q, k, v, g, beta, segment_ids=seg, chunk_size=16)[0]


def split_gdn(ring, ulysses):
    def core(q, k, v, g, beta, seg):
        return cg.context_parallel_gated_delta_rule(q, k, v, g, beta, seg, ring_axis="ring", ring=ring,
                                                    ulysses_axis="ulysses", ulysses=ulysses,
                                                    implementation="chunked")

    return jax.jit(lambda *a: run_split(core, a, ring, ulysses))


@pytest.mark.parametrize("ring,ulysses", [
    (2, 1), (4, 1),  # ring
    (1, 4),  # Ulysses; 4 ranks do not split 2 key heads: q, k repeated (2 ranks split them: the next case)
    (2, 2),  # both
])
def test_split_gdn_matches_one_device(ring, ulysses):
    q, k, v, g, beta = inputs(1)
    seg = segments()
    want = jax.jit(reference)(q, k, v, g, beta, seg)
    got = split_gdn(ring, ulysses)(q, k, v, g, beta, seg)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    if ring == 2 and ulysses == 1:  # the incoming state matters: without the ring's correction outputs differ
        alone = jax.jit(lambda *a: run_split(
            lambda *x: cg.gated_delta_rule(*x[:5], segment_ids=x[5], implementation="chunked")[0],
            a, ring, 1))(q, k, v, g, beta, seg)
        assert np.abs(np.asarray(alone) - np.asarray(want))[:2].max() > 1e-2


@pytest.mark.parametrize("ring,ulysses", [(4, 1)])  # with Ulysses too: test_gdn_layer_split_matches_one_device
def test_split_gdn_gradients(ring, ulysses):
    q, k, v, g, beta = inputs(2)
    seg = segments()
    r = jax.random.normal(jax.random.key(9), (B, T, HV, DV))
    split = split_gdn(ring, ulysses)
    grads = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, seg) * r), argnums=range(5)))(q, k, v, g, beta)
    for name, got, want in zip("q k v g beta".split(), grads(split), grads(reference)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=name)


@pytest.mark.parametrize("ring,ulysses,packed", [(1, 4, True), (4, 1, True), (2, 4, True), (2, 2, False)])
def test_conv_halo_matches_one_device(ring, ulysses, packed):
    C, Kc = 6, 4
    x = jax.random.normal(jax.random.key(3), (B, T, C))
    w = jax.random.normal(jax.random.key(4), (C, Kc))
    seg = segments() if packed else None
    want = jax.jit(causal_conv1d_silu)(x, w, seg)
    order = cg.device_pieces(ring, ulysses)

    def conv(x, *seg):
        return cg.conv_with_halo(x, w, seg[0] if seg else None, axes=("ring", "ulysses"), order=order)

    args = (x, seg) if packed else (x,)
    got = jax.jit(lambda *a: run_split(conv, a, ring, ulysses))(*args)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    r = jax.random.normal(jax.random.key(5), want.shape)
    g_want = jax.grad(lambda x: jnp.sum(causal_conv1d_silu(x, w, seg) * r))(x)
    g_got = jax.jit(jax.grad(lambda x: jnp.sum(run_split(conv, (x, seg) if packed else (x,), ring, ulysses) * r)))(x)
    np.testing.assert_allclose(g_got, g_want, atol=1e-6, rtol=1e-6)


def test_layout_is_the_ring_order():
    """device_pieces describes what the context-parallel contract lays out: consecutive runs of the ring order."""
    from xorl_jax.parallel.context import to_ring_order

    for ring, ulysses in [(1, 4), (2, 1), (4, 1), (2, 2), (2, 4)]:
        np.testing.assert_array_equal(layout(ring, ulysses), to_ring_order(jnp.arange(T)[None], ring=ring)[0])


def test_ulysses_heads_must_divide():
    assert cg.gdn_ulysses_problem(6, 4) == ("linear_num_value_heads 6 is not divisible by ulysses_parallel_size 4; "
                                            "pick a Ulysses size that divides it (or use ringattn_parallel_size)")
    assert cg.gdn_ulysses_problem(4, 4) is None


@pytest.mark.parametrize("ring,ulysses", [(2, 2)])
def test_gdn_layer_split_matches_one_device(ring, ulysses):
    """The Qwen3.5 GatedDeltaNet layer under a mesh with ring/ulysses axes, fed the ring order, equals one device:
    outputs and parameter gradients."""
    from flax import nnx

    from xorl_jax.layers.gdn import GatedDeltaNet
    from xorl_jax.parallel import context as cp
    from xorl_jax.parallel.mesh import make_mesh
    from xorl_jax.parallel.rules import use_mesh

    layer = GatedDeltaNet(hidden=16, key_heads=HK, value_heads=HV, key_dim=DK, value_dim=DV, conv_kernel=4, eps=1e-6,
                          implementation="chunked", rngs=nnx.Rngs(0))
    graph, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(6), (B, T, 16))
    seg = segments()
    r = jax.random.normal(jax.random.key(7), (B, T, 16))
    to_ring = lambda a: cp.to_ring_order(a, ring=ring)  # noqa: E731

    def outputs_and_grads(split):  # the split run is fed (and answers) in the ring order
        def loss(p, x, seg):
            y = nnx.merge(graph, p)(to_ring(x), to_ring(seg)) if split else nnx.merge(graph, p)(x, seg)
            y = cp.from_ring_order(y, ring=ring) if split else y
            return jnp.sum(y * r), y

        return jax.jit(jax.grad(loss, has_aux=True))(params, x, seg)

    want_g, want_y = outputs_and_grads(False)
    mesh = make_mesh({"data": 1, "fsdp": 1, "ring": ring, "expert": 1, "ulysses": ulysses, "tensor": 1},
                     jax.devices()[:ring * ulysses])
    with use_mesh(mesh):
        got_g, got_y = outputs_and_grads(True)
    np.testing.assert_allclose(got_y, want_y, atol=2e-5, rtol=2e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(got_g), nnx.to_flat_state(want_g)):
        np.testing.assert_allclose(a.get_value(), b.get_value(), atol=1e-4, rtol=1e-4, err_msg=str(path))


def test_zero_start_pass_two_calls_equal_one():
    """Where the Pallas kernel cannot take dv + dk, the zero-start outputs and the transition come from two calls
    (here the Pallas kernel in interpret mode) and equal the one widened call of the jnp reference."""
    ks = jax.random.split(jax.random.key(8), 5)
    q, k = (jax.random.normal(kk, (1, 32, 2, 8)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (1, 32, 2, 12))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (1, 32, 2)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (1, 32, 2)))
    seg = jnp.asarray(np.repeat([[1, 2]], 16, axis=1))
    run = jax.jit(cg._zero_start_pass, static_argnums=(6, 7, 8))
    one = run(q, k, v, g, beta, seg, "chunked", None, True)
    two = run(q, k, v, g, beta, seg, "pallas", None, True)
    for name, a, b in zip(("o", "Q", "B", "A"), one, two):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
    assert np.abs(np.asarray(one[3])).max() == 0.0  # a document starts inside: nothing of the incoming state is left
    assert np.abs(np.asarray(one[1][:, :16])).max() > 0.1  # before it, outputs read the incoming state
