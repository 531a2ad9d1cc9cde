"""Grouped GEMM: jnp reference and backend choice on CPU; Triton kernels against the reference on a GPU."""

import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xorl_jax.kernels.gmm import gmm, gmm_gather, gmm_ragged_dot, gmm_reference, triton_available

GROUP_CASES = {
    "random_with_padding": lambda rng, M, E: _random_sizes(rng, M - 37, E),
    "zeros_and_skew": lambda rng, M, E: np.array([0] * (E - 3) + [M - 20, 0, 13], np.int32),
    "one_group_all": lambda rng, M, E: np.eye(E, dtype=np.int32)[E // 2] * M,
    "all_padding": lambda rng, M, E: np.zeros(E, np.int32),
    "zipf": lambda rng, M, E: _zipf_sizes(rng, M, E),
}


def _random_sizes(rng, total, E):
    cuts = np.sort(rng.integers(0, total + 1, size=E - 1))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)


def _zipf_sizes(rng, M, E):
    p = 1.0 / np.arange(1, E + 1) ** 1.2
    p = rng.permutation(p / p.sum())
    return np.bincount(rng.choice(E, size=M, p=p), minlength=E).astype(np.int32)


def _numpy_gmm(x, w, sizes):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, size in enumerate(sizes):
        y[start:start + size] = x[start:start + size] @ w[e]
        start += size
    return y


def _numpy_grads(x, w, sizes, dy):
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    start = 0
    for e, size in enumerate(sizes):
        rows = slice(start, start + size)
        dx[rows] = dy[rows] @ w[e].T
        dw[e] = x[rows].T @ dy[rows]
        start += size
    return dx, dw


def _inputs(seed, M, K, N, E, dtype, case):
    rng = np.random.default_rng(seed)
    sizes = GROUP_CASES[case](rng, M, E)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((E, K, N)) / np.sqrt(K), dtype)
    dy = jnp.asarray(rng.standard_normal((M, N)), dtype)
    return x, w, jnp.asarray(sizes), dy, sizes


# ---------------------------------------------------------------- CPU: reference, ragged_dot, dispatch


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
def test_reference_matches_numpy_forward_and_grads(case):
    x, w, gs, dy, sizes = _inputs(0, 96, 24, 20, 6, jnp.float32, case)
    y, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, implementation="reference"), x, w)
    dx, dw = vjp(dy)
    np.testing.assert_allclose(y, _numpy_gmm(x, w, sizes), rtol=1e-5, atol=1e-5)
    want_dx, want_dw = _numpy_grads(x, w, sizes, dy)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(y)[sizes.sum():] == 0)


@pytest.mark.parametrize("case", ["random_with_padding", "zeros_and_skew", "one_group_all"])
def test_ragged_dot_matches_reference_with_grads(case):
    x, w, gs, dy, _ = _inputs(1, 80, 16, 12, 5, jnp.float32, case)
    outs = {}
    for impl in ("reference", "ragged_dot"):
        y, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, implementation=impl), x, w)
        outs[impl] = (y, *vjp(dy))
    for got, want in zip(outs["ragged_dot"], outs["reference"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _routed_inputs(seed, S, copies, K, N, E, dtype):
    """Tokens x [S, K], each copied `copies` times to random experts (distinct per token), the copies sorted by expert:
    (x, w, group_sizes, order, inverse, dy over the sorted copies)."""
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.choice(E, size=copies, replace=False) for _ in range(S)]).reshape(-1)
    order = np.argsort(experts, kind="stable").astype(np.int32)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=np.int32)
    sizes = np.bincount(experts, minlength=E).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((S, K)), dtype)
    w = jnp.asarray(rng.standard_normal((E, K, N)) / np.sqrt(K), dtype)
    dy = jnp.asarray(rng.standard_normal((S * copies, N)), dtype)
    return x, w, sizes, order, inverse, dy


def _numpy_gather_gmm(x, w, sizes, order, copies, dy):
    """y, dx, dw of gmm(x[order // copies]) in float64: dx sums each token's copies."""
    source = order // copies
    xs = np.asarray(x, np.float64)[source]
    y = _numpy_gmm(xs, w, sizes)
    dxs, dw = _numpy_grads(xs, w, sizes, dy)
    dx = np.zeros(np.shape(x))
    np.add.at(dx, source, dxs)
    return y, dx, dw


def test_gather_reference_matches_numpy_forward_and_grads():
    x, w, sizes, order, inverse, dy = _routed_inputs(7, 40, 3, 24, 20, 6, jnp.float32)
    @jax.jit
    def fwd_bwd(x, w, dy):
        y, vjp = jax.vjp(lambda a, b: gmm_gather(a, b, jnp.asarray(sizes), jnp.asarray(order), jnp.asarray(inverse),
                                                 3, implementation="reference"), x, w)
        return (y, *vjp(dy))

    got = fwd_bwd(x, w, dy)
    want = _numpy_gather_gmm(x, np.asarray(w), sizes, order, 3, np.asarray(dy))
    for name, g, wnt in zip(("y", "dx", "dw"), got, want):
        np.testing.assert_allclose(g, wnt, rtol=1e-5, atol=1e-5, err_msg=name)


def test_gather_bad_arguments_name_the_culprit():
    x, w, sizes, order, inverse, _ = _routed_inputs(8, 8, 2, 8, 8, 4, jnp.float32)
    with pytest.raises(ValueError, match="order/inverse of S \\* copies entries"):
        gmm_gather(x, w, jnp.asarray(sizes), jnp.asarray(order), jnp.asarray(inverse), 3)
    with pytest.raises(ValueError, match="implementation 'native'"):
        gmm_gather(x, w, jnp.asarray(sizes), jnp.asarray(order), jnp.asarray(inverse), 2, implementation="native")
    with pytest.raises(RuntimeError, match="not available on this device"):
        gmm_gather(x, w, jnp.asarray(sizes), jnp.asarray(order), jnp.asarray(inverse), 2)


def test_reference_keeps_bf16_dtype_and_accumulates_in_fp32():
    x, w, gs, _, sizes = _inputs(2, 64, 512, 8, 4, jnp.bfloat16, "random_with_padding")
    y = jax.jit(lambda a, b, s: gmm(a, b, s, implementation="reference"))(x, w, gs)
    assert y.dtype == jnp.bfloat16
    want = _numpy_gmm(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    # only the final bf16 rounding separates them
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2 ** -7, atol=1e-2)


def test_auto_is_reference_on_cpu_and_triton_raises():
    assert not triton_available()
    x, w, gs, _, _ = _inputs(3, 32, 8, 8, 4, jnp.float32, "zipf")
    np.testing.assert_array_equal(gmm(x, w, gs), gmm_reference(x, w, gs))
    with pytest.raises(RuntimeError, match="not available on this device.*moe_implementation: native or eager"):
        gmm(x, w, gs, implementation="triton")


def test_moe_auto_without_triton_warns_only_on_a_gpu(monkeypatch, caplog):
    """On a GPU without jax-triton the MoE falls back to ragged_dot, many times slower: the user is told once."""
    from xorl_jax.layers import moe

    assert moe.resolve_moe_implementation("auto") == "native"  # CPU: the native path is the right one, no warning
    assert "ragged_dot" not in caplog.text
    monkeypatch.setattr(moe.jax, "default_backend", lambda: "gpu")
    moe._warn_gpu_without_triton.cache_clear()
    with caplog.at_level("WARNING", logger="xorl_jax"):
        assert moe.resolve_moe_implementation("auto") == "native"
        moe.resolve_moe_implementation("auto")
    assert caplog.text.count("pip install jax-triton") == 1
    moe._warn_gpu_without_triton.cache_clear()


def test_bad_arguments_name_the_culprit():
    x, w, gs, _, _ = _inputs(4, 16, 8, 8, 4, jnp.float32, "zipf")
    with pytest.raises(ValueError, match="implementation 'cuda'"):
        gmm(x, w, gs, implementation="cuda")
    with pytest.raises(ValueError, match="one K"):
        gmm(x[:, :4], w, gs)
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(x, w, gs[:3])
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(x, w, gs.astype(jnp.float32))


def test_import_does_not_load_triton():
    code = "import sys, xorl_jax.kernels.gmm; sys.exit(int('jax_triton' in sys.modules or 'triton' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_ragged_dot_helper_zeroes_padding_rows():
    x, w, gs, _, sizes = _inputs(5, 40, 8, 8, 3, jnp.float32, "random_with_padding")
    y = np.asarray(gmm_ragged_dot(x, w, gs))
    assert sizes.sum() < 40 and np.all(y[sizes.sum():] == 0)


# ---------------------------------------------------------------- GPU: Triton kernels

GPU_SHAPES = [  # (M, K, N, E): tile-aligned and ragged widths
    (1000, 256, 384, 8),
    (777, 200, 72, 5),
    (2048, 512, 256, 64),
]


def _poison_allocator(nbytes):
    """Fill freed device memory with NaN so an unwritten output tile shows up as NaN."""
    junk = [jnp.full((nbytes // 4 + 1024,), jnp.nan, jnp.float32) for _ in range(4)]
    jax.block_until_ready(junk)
    del junk


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_on_gpu(shape, case, dtype):
    M, K, N, E = shape
    x, w, gs, dy, sizes = _inputs(zlib.crc32(f"{shape}{case}".encode()), M, K, N, E, dtype, case)

    @jax.jit
    def fwd_bwd(x, w, gs, dy):
        y, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, implementation="triton"), x, w)
        return (y, *vjp(dy))

    _poison_allocator(4 * max(M * max(K, N), E * K * N))
    got = jax.block_until_ready(fwd_bwd(x, w, gs, dy))
    again = jax.block_until_ready(fwd_bwd(x, w, gs, dy))
    f32 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    want = (_numpy_gmm(f32(x), f32(w), sizes), *_numpy_grads(f32(x), f32(w), sizes, f32(dy)))
    for name, g, a, wnt in zip(("y", "dx", "dw"), got, again, want):
        assert g.dtype == dtype, name
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(a.astype(jnp.float32)),
                                      err_msg=f"{name}: two runs differ")
        g = f32(g)
        assert np.all(np.isfinite(g)), f"{name}: unwritten (NaN-poisoned) elements"
        scale = max(1.0, float(np.abs(wnt).max()))
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
        np.testing.assert_allclose(g, wnt, rtol=tol, atol=tol * scale, err_msg=name)
    total = int(sizes.sum())
    assert np.all(f32(got[0])[total:] == 0) and np.all(f32(got[1])[total:] == 0)
    for e in np.flatnonzero(sizes == 0):
        assert np.all(f32(got[2])[e] == 0), f"dw of empty group {e} is not zero"


@pytest.mark.gpu
def test_triton_auto_picks_triton_on_gpu():
    assert triton_available()
    x, w, gs, _, _ = _inputs(6, 256, 128, 128, 4, jnp.bfloat16, "zipf")
    np.testing.assert_array_equal(gmm(x, w, gs), gmm(x, w, gs, implementation="triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("M,E,real", [(131072, 64, 0.5), (131072, 128, 1.0), (65536, 64, 0.5), (65536, 128, 1.0)],
                         ids=["M128k-E64-half-padding", "M128k-E128", "M64k-E64-half-padding", "M64k-E128"])
def test_triton_matches_ragged_dot_at_moe_layer_sizes(M, E, real):
    """Qwen3-30B-A3B's expert GEMM (K 2048, N 2 x 768) at the row counts one GPU sees: 8192 tokens x top-8 (E128,
    no padding) and expert parallel over 2 GPUs (64 local experts, rows padded to the worst case). XLA's ragged_dot
    is the reference: one product per group on the host-known row ranges (a float64 numpy product at this size
    takes minutes)."""
    K, N = 2048, 1536
    ks = jax.random.split(jax.random.key(M + E), 3)
    x = jax.random.normal(ks[0], (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(ks[1], (E, K, N), jnp.float32) * K**-0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(ks[2], (M, N), jnp.float32).astype(jnp.bfloat16)
    p = np.random.default_rng(M + E).dirichlet(np.ones(E))
    gs = jnp.asarray(np.floor(p * M * real).astype(np.int32))
    total = int(gs.sum())

    @jax.jit
    def triton_fwd_bwd(x, w, dy):
        y, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, implementation="triton"), x, w)
        return (y, *vjp(dy))

    @jax.jit  # one program: op by op, 128 groups of slices took minutes
    def per_group(x, w, dy):
        mm = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)  # noqa: E731
        ends = np.cumsum(np.asarray(gs))
        ys, dxs, dws = [], [], []
        for e, (s, t) in enumerate(zip(ends - np.asarray(gs), ends)):
            ys.append(mm(x[s:t], w[e]))
            dxs.append(mm(dy[s:t], w[e].T))
            dws.append(mm(x[s:t].T, dy[s:t]))
        return jnp.concatenate(ys), jnp.concatenate(dxs), jnp.stack(dws)

    _poison_allocator(4 * M * max(K, N))
    got = [np.asarray(a.astype(jnp.float32)) for a in triton_fwd_bwd(x, w, dy)]
    want = [np.asarray(a) for a in per_group(x, w, dy)]
    for name, g, wnt in zip(("y", "dx", "dw"), got, want):
        if name != "dw":
            g, wnt = g[:total], wnt[:total]
        assert np.all(np.isfinite(g)), f"{name}: non-finite elements"
        err = float(np.abs(g - wnt).max() / np.abs(wnt).max())
        assert err < 2e-2, f"{name}: max error {err:.2e} of the largest entry"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(500, 4, 256, 384, 16), (333, 8, 200, 72, 64), (1024, 8, 512, 1536, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_gather_matches_numpy_on_gpu(shape, dtype):
    """The gathered-row kernels (token copies read from the unsorted tokens) against float64 numpy on random routing,
    poisoned memory, two runs bit-identical, and against the plain kernel on the gathered rows."""
    S, copies, K, N, E = shape
    x, w, sizes, order, inverse, dy = _routed_inputs(zlib.crc32(str(shape).encode()), S, copies, K, N, E, dtype)
    gs, order_j, inverse_j = jnp.asarray(sizes), jnp.asarray(order), jnp.asarray(inverse)

    @jax.jit
    def gathered(x, w, dy):
        y, vjp = jax.vjp(lambda a, b: gmm_gather(a, b, gs, order_j, inverse_j, copies), x, w)
        return (y, *vjp(dy))

    @jax.jit
    def plain(x, w, dy):
        y, vjp = jax.vjp(lambda a, b: gmm(a[order_j // copies], b, gs, implementation="triton"), x, w)
        return (y, *vjp(dy))

    _poison_allocator(4 * max(S * copies * max(K, N), E * K * N))
    got = jax.block_until_ready(gathered(x, w, dy))
    again = jax.block_until_ready(gathered(x, w, dy))
    f32 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
    want = _numpy_gather_gmm(f32(x), f32(w), sizes, order, copies, f32(dy))
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    for name, g, a, p, wnt in zip(("y", "dx", "dw"), got, again, plain(x, w, dy), want):
        assert g.dtype == dtype, name
        np.testing.assert_array_equal(f32(g), f32(a), err_msg=f"{name}: two runs differ")
        assert np.all(np.isfinite(f32(g))), f"{name}: unwritten (NaN-poisoned) elements"
        scale = max(1.0, float(np.abs(wnt).max()))
        np.testing.assert_allclose(f32(g), wnt, rtol=tol, atol=tol * scale, err_msg=name)
        np.testing.assert_allclose(f32(g), f32(p), rtol=tol, atol=tol * scale, err_msg=f"{name} vs plain kernel")
