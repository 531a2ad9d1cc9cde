"""Pallas gated delta rule: interpret mode on CPU against the jnp reference; GPU-marked checks on a real GPU."""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from xorl_jax.kernels.gdn import gated_delta_rule
from xorl_jax.kernels.gdn.pallas import Launch
from xorl_jax.kernels.gdn.pallas_entry import gated_delta_rule_pallas
from xorl_jax.kernels.gdn.reference import gated_delta_rule_chunked, gated_delta_rule_recurrent

from test_gdn import make_inputs, random_segments


def _grads_fn(fn, v_shape, h0_shape, seg, seed=7):
    """Jitted gradients of a fixed random projection of fn's output and final state, w.r.t. all six inputs."""
    r_o = jax.random.normal(jax.random.key(seed), v_shape)
    r_s = jax.random.normal(jax.random.key(seed + 1), h0_shape)

    def loss(q, k, v, g, beta, h0):
        o, s = fn(q, k, v, g, beta, segment_ids=seg, initial_state=h0, output_final_state=True)
        return jnp.sum(o.astype(jnp.float32) * r_o) + jnp.sum(s * r_s)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def _loss_grads(fn, q, k, v, g, beta, h0, seg, seed=7):
    return _grads_fn(fn, v.shape, h0.shape, seg, seed)(q, k, v, g, beta, h0)


INTERPRET_SHAPES = [  # B, T, Hk, Hv, K, V, chunk
    (2, 37, 1, 2, 16, 32, 16),  # T not a multiple of the chunk, Hv != Hk
    (1, 32, 2, 2, 16, 16, 16),  # T a multiple of the chunk
]


# split at T a multiple of the chunk: test_interpret_split_document_runs_match_recurrence
@pytest.mark.parametrize("shape,kernels", [(INTERPRET_SHAPES[0], "split"), (INTERPRET_SHAPES[1], "fused")])
def test_interpret_matches_reference_forward_and_grads(shape, kernels):
    B, T, Hk, Hv, K, V, C = shape
    q, k, v, g, beta, h0 = make_inputs(20, B, T, Hk, Hv, K, V)
    seg = random_segments(21, B, T)
    pallas = lambda *a, **kw: gated_delta_rule_pallas(*a, chunk_size=C, interpret=True, kernels=kernels, **kw)
    o_p, s_p = jax.jit(lambda *a: pallas(*a[:5], segment_ids=seg, initial_state=a[5], output_final_state=True))(
        q, k, v, g, beta, h0)
    o_r, s_r = gated_delta_rule_recurrent(q, k, v, g, beta, segment_ids=seg, initial_state=h0, output_final_state=True)
    np.testing.assert_allclose(o_p, o_r, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s_p, s_r, atol=2e-5, rtol=2e-5)
    g_p = _loss_grads(pallas, q, k, v, g, beta, h0, seg)
    g_r = _loss_grads(lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=C, **kw), q, k, v, g, beta, h0, seg)
    for name, a, b in zip("q k v g beta h0".split(), g_p, g_r):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5, err_msg=name)


def test_interpret_split_document_runs_match_recurrence():
    """The split state passes run each document run as its own program. Documents of one token at the row start, a
    start on a chunk's first token, two starts in one chunk and a start in the last chunk give the recurrence's
    outputs, final state and (against the chunked form) gradients, also with empty run slots computing their clamped
    peel and the state grads folded into the intra backward; a row without documents runs as one run."""
    from xorl_jax.kernels.gdn.pallas_split import document_runs

    T, C, docs = 80, 16, [1, 1, 14, 20, 3, 25, 16]
    B, Hk, Hv, K, V = 1, 1, 2, 16, 16
    q, k, v, g, beta, h0 = make_inputs(50, B, T, Hk, Hv, K, V)
    seg = jnp.asarray(np.concatenate([np.full(n, i + 1) for i, n in enumerate(docs)])[None], jnp.int32)
    starts = np.cumsum(docs)[:-1]
    carry = np.ones((B, T), np.int32)  # as the kernels' inputs hold it: 0 from a start to its chunk's end
    for s in starts:
        carry[0, s : (s // C + 1) * C] = 0
    first, nxt = document_runs(jnp.asarray(carry), B, T // C, C, True)
    want = sorted({0} | {int(s) // C for s in starts})  # [0, 1, 2, 4]
    assert list(np.asarray(first[0])) == want + [T // C] * (T // C - len(want))
    assert list(np.asarray(nxt[0, : len(want)])) == want[1:] + [T // C]
    pallas = lambda *a, **kw: gated_delta_rule_pallas(*a, chunk_size=C, interpret=True, kernels="split", **kw)

    for segments, launch in ((seg, Launch()), (seg, Launch(skip_empty_runs=False)), (None, Launch())):
        o_p, s_p = jax.jit(lambda *a: pallas(*a[:5], segment_ids=segments, initial_state=a[5], launch=launch,
                                             output_final_state=True))(q, k, v, g, beta, h0)
        o_r, s_r = gated_delta_rule_recurrent(q, k, v, g, beta, segment_ids=segments, initial_state=h0,
                                              output_final_state=True)
        np.testing.assert_allclose(o_p, o_r, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(s_p, s_r, atol=2e-5, rtol=2e-5)
    # the backward with the options off by default (the default backward: the tests above and below)
    g_r = _loss_grads(lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=C, **kw), q, k, v, g, beta, h0, seg)
    options = Launch(skip_empty_runs=False, fold_state_grads=True)
    g_p = _loss_grads(lambda *a, **kw: pallas(*a, launch=options, **kw), q, k, v, g, beta, h0, seg)
    for name, a, b in zip("q k v g beta h0".split(), g_p, g_r):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5, err_msg=name)


@pytest.mark.parametrize("intra", ["split", "pallas"])
def test_remat_keeps_the_kernels_forward_products_and_gradients_hold(intra):
    """The kernels name their forward products: a policy saving that name keeps them (the backward does not run
    the forward kernels again; `dots_attention_saveable` leaves them out by default, measured no faster), and the
    gradients are those of no remat."""
    import contextlib
    import io

    from xorl_jax.kernels.gdn import CHECKPOINT_NAME

    B, T, Hk, Hv, K, V, C = INTERPRET_SHAPES[0]
    q, k, v, g, beta, h0 = make_inputs(30, B, T, Hk, Hv, K, V)
    seg = random_segments(31, B, T)
    layout = dict(kernels="split") if intra == "split" else dict(kernels="fused", intra=intra)
    pallas = lambda *a, **kw: gated_delta_rule_pallas(*a, chunk_size=C, interpret=True, **layout, **kw)
    policy = jax.checkpoint_policies.save_only_these_names(CHECKPOINT_NAME)
    remat = lambda *a, **kw: jax.checkpoint(lambda *x: pallas(*x, **kw), policy=policy)(*a)  # noqa: E731
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda *a: jnp.sum(remat(*a, segment_ids=seg)[0]), q, k, v, g, beta)
    assert "named 'gdn_kernel'" in out.getvalue()
    for name, a, b in zip("q k v g beta h0".split(), _loss_grads(remat, q, k, v, g, beta, h0, seg),
                          _loss_grads(pallas, q, k, v, g, beta, h0, seg)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6, err_msg=name)


def test_interpret_packed_equals_per_document():
    B, T, Hk, Hv, K, V, C = 1, 40, 1, 1, 16, 16, 16
    q, k, v, g, beta, _ = make_inputs(22, B, T, Hk, Hv, K, V)
    seg = jnp.asarray([[1] * 7 + [2] * 20 + [3] * 13])
    run = jax.jit(lambda q, k, v, g, b, s: gated_delta_rule_pallas(q, k, v, g, b, segment_ids=s, chunk_size=C,
                                                                   interpret=True)[0])
    packed = run(q, k, v, g, beta, seg)
    for s, e in [(0, 7), (7, 27), (27, 40)]:
        alone = run(*(x[:, s:e] for x in (q, k, v, g, beta)), seg[:, s:e])
        np.testing.assert_allclose(packed[:, s:e], alone, atol=2e-5)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


_GPU_SHAPE = (2, 1000, 2, 4, 128, 128)  # B, T, Hk, Hv, K, V


@functools.lru_cache(maxsize=None)
def _gpu_case(dtype_name):
    """Inputs (q, k, v, beta in `dtype_name`), segments and the fp32 reference results, computed once per dtype
    (compiling the fp32 reference dominates these tests' time)."""
    B, T, Hk, Hv, K, V = _GPU_SHAPE
    q, k, v, g, beta, h0 = make_inputs(30, B, T, Hk, Hv, K, V)
    seg = random_segments(31, B, T)
    q, k, v, beta = (x.astype(jnp.dtype(dtype_name)) for x in (q, k, v, beta))
    with jax.default_matmul_precision("float32"):
        ref_inputs = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
        o_r, s_r = jax.jit(lambda *a: gated_delta_rule_chunked(*a, segment_ids=seg, initial_state=h0,
                                                               output_final_state=True))(*ref_inputs)
        g_r = _loss_grads(gated_delta_rule_chunked, *ref_inputs, h0, seg)
    return (q, k, v, g, beta, h0), seg, (o_r, s_r, g_r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,layout", [
    (jnp.float32, dict(kernels="split")),
    (jnp.bfloat16, dict(kernels="split")),
    (jnp.bfloat16, dict(kernels="fused", intra="pallas", state_grads="pallas")),
    (jnp.bfloat16, dict(kernels="fused", intra="xla", state_grads="xla")),
    (jnp.bfloat16, dict(kernels="split", launch=Launch(intra_bwd_grads="float32", skip_empty_runs=False))),
], ids=["split-f32", "split-bf16", "fused-bf16", "fused-xla-bf16", "split-before-bf16"])
def test_gpu_matches_fp32_reference_and_is_deterministic(dtype, layout):
    (q, k, v, g, beta, h0), seg, (o_r, s_r, g_r) = _gpu_case(jnp.dtype(dtype).name)
    pallas = lambda *a, **kw: gated_delta_rule_pallas(*a, interpret=False, **layout, **kw)
    run = jax.jit(lambda *a: pallas(*a, segment_ids=seg, initial_state=h0, output_final_state=True))
    o_p, s_p = run(q, k, v, g, beta)
    o_p2, s_p2 = run(q, k, v, g, beta)
    tol = 2e-3 if dtype == jnp.float32 else 2e-2
    assert np.all(np.isfinite(np.asarray(o_p, np.float32)))
    assert _rel(o_p, o_r) < tol and _rel(s_p, s_r) < tol, (_rel(o_p, o_r), _rel(s_p, s_r))
    np.testing.assert_array_equal(np.asarray(o_p, np.float32), np.asarray(o_p2, np.float32))
    grads = _grads_fn(pallas, v.shape, h0.shape, seg)
    g_p = grads(q, k, v, g, beta, h0)
    g_p2 = grads(q, k, v, g, beta, h0)
    for name, a, a2, b in zip("q k v g beta h0".split(), g_p, g_p2, g_r):
        assert _rel(a, b) < 2 * tol, (name, _rel(a, b))
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(a2, np.float32), err_msg=name)


@pytest.mark.gpu
def test_gpu_auto_dispatch_runs():
    q, k, v, g, beta, _ = make_inputs(32, 1, 256, 1, 2, 128, 128)
    o_auto, _ = gated_delta_rule(q, k, v, g, beta)
    with jax.default_matmul_precision("float32"):
        o_ref, _ = gated_delta_rule_chunked(q, k, v, g, beta)
    assert _rel(o_auto, o_ref) < 2e-3


def test_interpret_xla_intra_variant_matches_reference():
    B, T, Hk, Hv, K, V, C = 1, 37, 1, 2, 16, 16, 16
    q, k, v, g, beta, h0 = make_inputs(23, B, T, Hk, Hv, K, V)
    seg = random_segments(24, B, T)
    pallas = lambda *a, **kw: gated_delta_rule_pallas(*a, chunk_size=C, interpret=True, kernels="fused", intra="xla",
                                                      **kw)
    g_p = _loss_grads(pallas, q, k, v, g, beta, h0, seg)
    g_r = _loss_grads(gated_delta_rule_recurrent, q, k, v, g, beta, h0, seg)
    for name, a, b in zip("q k v g beta h0".split(), g_p, g_r):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5, err_msg=name)


def test_interpret_state_grads_kernel_matches_einsums():
    """The per-chunk cotangent kernel of the state pass against the batched products it replaces (fp32: exact)."""
    from xorl_jax.kernels.gdn import pallas as P

    B, H, C, N, K, V = 1, 2, 16, 3, 16, 32
    ks = jax.random.split(jax.random.key(25), 5)
    do, dvn, vn = (jax.random.normal(kk, (B, H, N * C, V)) for kk in ks[:3])
    h, dh = (jax.random.normal(kk, (B, H, N, K, V)) for kk in ks[3:])
    dw, dqd, dP, dke, ded = P._state_grads_call(do, dvn, vn, h, dh, C=C, interpret=True)
    chunks = lambda x: x.reshape(B, H, N, C, x.shape[-1])
    want = P._state_grads_xla(do, dvn, vn, h, dh, C)
    for name, got, ref in zip(("dw", "dqd", "dP", "dke"), (dw, dqd, dP, dke), want):
        np.testing.assert_allclose(chunks(got), ref, atol=1e-4, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(ded.sum(-1), want[4], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", [dict(kernels="split"),
                                    dict(kernels="split", launch=Launch(intra_bwd_grads="float32")),
                                    dict(kernels="fused", intra="pallas", state_grads="xla")],
                         ids=["split", "split-f32grads", "fused-xla-state-grads"])
def test_interpret_bf16_close_to_fp32_reference(layout):
    """bf16 inputs take bf16 products in every kernel: gradients stay within bf16 rounding of the fp32 reference."""
    B, T, Hk, Hv, K, V, C = 1, 40, 1, 2, 16, 16, 16
    q, k, v, g, beta, h0 = make_inputs(26, B, T, Hk, Hv, K, V)
    seg = random_segments(27, B, T)
    q16, k16, v16, b16 = (x.astype(jnp.bfloat16) for x in (q, k, v, beta))
    ref_in = [x.astype(jnp.float32) for x in (q16, k16, v16)] + [g, b16.astype(jnp.float32)]
    pallas = lambda *a, **kw: gated_delta_rule_pallas(*a, chunk_size=C, interpret=True, **layout, **kw)
    g_p = _loss_grads(pallas, q16, k16, v16, g, b16, h0, seg)
    g_r = _loss_grads(gated_delta_rule_recurrent, *ref_in, h0, seg)
    for name, a, b in zip("q k v g beta h0".split(), g_p, g_r):
        assert np.all(np.isfinite(np.asarray(a, np.float32))), name
        assert _rel(a, b) < 1.5e-2, (name, _rel(a, b))  # measured 2e-3 to 5e-3


def test_launch_settings_reach_every_kernel():
    """The Triton launch settings passed in (a frozen `Launch`) are the ones each of the five kernels is built with,
    forward and backward; traced only, for the GPU (compiling needs one), with the defaults left as they were."""
    from xorl_jax.kernels.gdn.pallas import LAUNCH, Launch

    launch = Launch(state_fwd=(2, 1), state_bwd=(2, 3), state_grads=(4, 2), intra_fwd=(2, 2), intra_bwd=(4, 1),
                    out_fwd=(8, 2), dvl=(2, 3))
    q, k, v, g, beta, _ = make_inputs(40, 1, 64, 2, 2, 16, 16, jnp.bfloat16)

    def built_with(kernels):
        def loss(q, k, v):
            o, _ = gated_delta_rule_pallas(q, k, v, g, beta, chunk_size=16, interpret=False, launch=launch,
                                           kernels=kernels)
            return jnp.sum(o.astype(jnp.float32))

        return {name: (p.num_warps, p.num_stages)
                for name, p in kernels_in(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)}

    def kernels_in(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield str(eqn.params["name"]), eqn.params["compiler_params"]
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from kernels_in(inner)

    fused, split = built_with("fused"), built_with("split")
    assert fused == {f"gdn_{kernel}": getattr(launch, kernel) for kernel in
                     ("state_fwd", "state_bwd", "state_grads", "intra_fwd", "intra_bwd")}, fused
    split_kernels = ("intra_fwd", "state_fwd", "out_fwd", "dvl", "state_bwd", "state_grads", "intra_bwd")
    assert split == {f"gdn_split_{kernel}": getattr(launch, kernel) for kernel in split_kernels}, split
    assert LAUNCH == Launch() and LAUNCH.state_fwd == (4, 1) and LAUNCH.intra_bwd == (8, 1)


@pytest.mark.parametrize("launch", [dict(), dict(fold_state_grads=True, skip_empty_runs=False)],
                         ids=["defaults", "folded"])
def test_split_kernels_lower_to_triton_here(launch):
    """The split path's forward and backward lower to Triton for CUDA on any machine (Pallas's Triton lowering runs on
    the host; only the GPU compile needs a GPU), so a kernel the lowering rejects fails here, not on a GPU."""
    from xorl_jax.kernels.gdn.pallas import Launch

    B, T, Hk, Hv, K, V = 1, 200, 2, 4, 64, 64
    q, k, v, g, beta, _ = make_inputs(41, B, T, Hk, Hv, K, V, jnp.bfloat16)
    seg = jnp.asarray(np.concatenate([np.full(70, 1), np.full(130, 2)])[None], jnp.int32)

    def fwd_bwd(q, k, v, g, beta):
        fn = lambda *a: gated_delta_rule_pallas(*a, segment_ids=seg, interpret=False, launch=Launch(**launch))[0]
        o, vjp = jax.vjp(fn, q, k, v, g, beta)
        return o, vjp(o)

    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=[triton])(q, k, v, g, beta)
    text = exported.mlir_module()
    kernels = ["intra_fwd", "state_fwd", "out_fwd", "dvl", "state_bwd"]
    kernels += ["intra_bwd_folded"] if launch else ["state_grads", "intra_bwd"]
    for name in kernels:
        assert f'name = "gdn_split_{name}"' in text, name
