"""Chunked cross-entropy, token chunks (gradients computed in the forward) and vocabulary chunks: equal to the
full-logits reference (values and gradients), ignore_index, bf16 inputs, soft cap, padded chunking, sharded over
devices, and memory bounded by the chunk in forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xorl_jax.loss import _logsumexp_rows, _plan, chunked_cross_entropy, cross_entropy_reference

METHODS = ("tokens", "vocab")


def _inputs(seed, shape=(3, 7), D=16, V=50, ignore_frac=0.25, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = jax.random.normal(k1, (*shape, D), jnp.float32)
    w = jax.random.normal(k2, (D, V), jnp.float32) * 0.5
    labels = jax.random.randint(k3, shape, 0, V)
    labels = jnp.where(jax.random.uniform(k4, shape) < ignore_frac, -100, labels)
    return h.astype(dtype), w.astype(dtype), labels


def _loss_and_grads(fn, h, w, labels, **kw):
    def f(h, w):
        loss, n = fn(h, w, labels, **kw)
        return loss, n

    (loss, n), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
    return loss, n, grads


def _assert_matches_reference(h, w, labels, soft_cap=None, **kw):
    """Loss, count and both gradients of the chunked loss equal the full-logits reference (fp32)."""
    loss, n, (dh, dw) = _loss_and_grads(chunked_cross_entropy, h, w, labels, soft_cap=soft_cap, **kw)
    ref, n_ref, (dh_ref, dw_ref) = _loss_and_grads(cross_entropy_reference, np.asarray(h), np.asarray(w),
                                                   np.asarray(labels), soft_cap=soft_cap)
    assert int(n) == int(n_ref) == int(jnp.sum(labels != -100))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-6)


def test_one_pass_logsumexp_matches_jax_on_random_and_edge_rows():
    """The token chunks' single-pass logsumexp (running max and rescaled sum) against jax.nn.logsumexp."""
    ours, theirs = jax.jit(_logsumexp_rows), jax.jit(lambda z: jax.nn.logsumexp(z, axis=-1))
    for seed, shape in enumerate([(5, 3), (16, 4099)]):
        z = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 40.0
        np.testing.assert_allclose(ours(z), theirs(z), rtol=1e-6, atol=1e-5)
    inf, nan = np.inf, np.nan
    z = np.array([[-inf, -inf, 0.5], [-inf, -inf, -inf], [1e30, -1e30, 3.0], [nan, 1.0, 2.0], [88.0, 89.0, -90.0]],
                 np.float32)
    np.testing.assert_array_equal(np.isnan(ours(z)), [False, False, False, True, False])
    np.testing.assert_allclose(ours(z), theirs(z), rtol=1e-6)


# (300, 200): chunks wide enough to be aligned to 128 columns, so padded to 2 x 256
@pytest.mark.parametrize("V,chunk", [(50, 8), (50, 64), (53, 10), (48, 7), (50, 1), (300, 200)])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_vocab_chunks_match_reference_fp32(V, chunk, soft_cap):
    h, w, labels = _inputs(0, V=V)
    _assert_matches_reference(h, w, labels, soft_cap=soft_cap, method="vocab", vocab_chunk=chunk)


# 21 tokens: chunks that divide them, that leave a padded last chunk, one token, all tokens in one chunk
@pytest.mark.parametrize("chunk", [7, 4, 1, 21, 64])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_token_chunks_match_reference_fp32(chunk, soft_cap):
    h, w, labels = _inputs(0, V=53)
    _assert_matches_reference(h, w, labels, soft_cap=soft_cap, method="tokens", chunk_size=chunk)


def test_plan_prefers_dividing_chunk_counts_and_pads_otherwise():
    # 151936 = 2^7 * 1187 has no divisor in 19..38 leaving multiples of 128: 19 chunks of 8064 (0.8% padding)
    p = _plan(151936, 8192, jnp.float32, None)
    assert (p.n_chunks, p.chunk, p.padded) == (19, 8064, True)
    p = _plan(152064, 8192, jnp.float32, None)  # 152064 = 22 * 6912: aligned without padding
    assert (p.n_chunks, p.chunk, p.padded) == (22, 6912, False)
    p = _plan(53, 10, jnp.float32, None)  # 53 is prime: padded to 6 chunks of 9
    assert (p.n_chunks, p.chunk, p.padded) == (6, 9, True)


@pytest.mark.parametrize("method", METHODS)
def test_ignore_index_tokens_do_not_count_or_get_gradient(method):
    h, w, labels = _inputs(1, ignore_frac=0.5)
    _, _, (dh, _) = _loss_and_grads(chunked_cross_entropy, h, w, labels, chunk_size=16, method=method)
    ignored = np.asarray(labels == -100)
    assert ignored.any() and (~ignored).any()
    assert not np.any(np.asarray(dh)[ignored])
    # Changing the hidden state of ignored tokens changes nothing.
    h2 = jnp.where(ignored[..., None], 100.0, h)
    a = chunked_cross_entropy(h, w, labels, chunk_size=16, method=method)[0]
    b = chunked_cross_entropy(h2, w, labels, chunk_size=16, method=method)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_custom_ignore_index(method):
    h, w, labels = _inputs(2, ignore_frac=0.0)
    labels = labels.at[0, :3].set(7)
    loss, n = chunked_cross_entropy(h, w, labels, chunk_size=16, method=method, ignore_index=7)
    ref, n_ref = cross_entropy_reference(h, w, labels, ignore_index=7)
    assert int(n) == int(n_ref) < labels.size
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_all_ignored_gives_zero_loss_count_and_gradients(method):
    h, w, labels = _inputs(3)
    labels = jnp.full_like(labels, -100)
    loss, n, (dh, dw) = _loss_and_grads(chunked_cross_entropy, h, w, labels, chunk_size=16, method=method)
    assert float(loss) == 0.0 and int(n) == 0 and n.dtype == jnp.int32 and loss.dtype == jnp.float32
    assert not np.any(dh) and not np.any(dw)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs(method):
    h, w, labels = _inputs(4, shape=(4, 32), D=64, V=300, dtype=jnp.bfloat16)
    loss, n, (dh, dw) = _loss_and_grads(chunked_cross_entropy, h, w, labels, chunk_size=64, method=method)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16 and loss.dtype == jnp.float32
    # Reference on the same bf16-rounded values in fp32: only the matmul rounding differs.
    ref, _, (dh_ref, dw_ref) = _loss_and_grads(cross_entropy_reference, h.astype(jnp.float32),
                                               w.astype(jnp.float32), labels)
    np.testing.assert_allclose(loss, ref, rtol=1e-3)
    np.testing.assert_allclose(dh.astype(jnp.float32), dh_ref, rtol=5e-2, atol=5e-3)
    np.testing.assert_allclose(dw.astype(jnp.float32), dw_ref, rtol=5e-2, atol=5e-3)


def test_rejects_mismatched_shapes():
    h, w, labels = _inputs(5)
    with pytest.raises(ValueError, match="head_w must be"):
        chunked_cross_entropy(h, w.T, labels)
    with pytest.raises(ValueError, match="labels shape"):
        chunked_cross_entropy(h, w, labels[:, :3])


def _temp_bytes(fn, *args):
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    return stats.temp_size_in_bytes


@pytest.mark.parametrize("method", METHODS)
def test_memory_is_bounded_by_the_chunk(method):
    N, D, V, K = 2048, 64, 16384, 64  # K tokens per chunk: [64, V] logits, or [N, 512] for vocab chunks
    h = jnp.zeros((N, D), jnp.float32)
    w = jnp.zeros((D, V), jnp.float32)
    labels = jnp.zeros((N,), jnp.int32)
    full_logits = N * V * 4  # 128 MiB

    def chunked(h, w):
        loss = lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=K, method=method)[0]  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(h, w)

    def naive(h, w):
        return jax.grad(lambda h, w: cross_entropy_reference(h, w, labels)[0], argnums=(0, 1))(h, w)

    chunked_temp = _temp_bytes(chunked, h, w)
    assert _temp_bytes(naive, h, w) >= full_logits  # the check can tell the two apart
    # A few 4 MiB chunk buffers, the [N, D] / [D, V] accumulators and the [D, V] chunked copies; far below N*V*4.
    assert chunked_temp < full_logits / 8, chunked_temp


@pytest.mark.parametrize("method", METHODS)
def test_sharded_over_tokens_and_vocab_matches_reference(method):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("data", "tensor"))
    h, w, labels = _inputs(6, shape=(8, 12), D=16, V=96)
    h = jax.device_put(h, NamedSharding(mesh, P("data", None, None)))
    w = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    labels = jax.device_put(labels, NamedSharding(mesh, P("data", None)))
    _assert_matches_reference(h, w, labels, chunk_size=16, method=method)


@pytest.mark.parametrize("shape", [(2, 2, 2, 1), (2, 4, 1, 1), (1, 2, 4, 1), (1, 1, 8, 1)])
def test_head_gradient_is_reduce_scattered_to_the_fsdp_shards(shape):
    """Under data x fsdp x expert meshes each device gets its FSDP rows of the summed head gradient (replicas over
    `data` add the whole of it); the gathered gradient equals the reference, and so does the loss."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from xorl_jax.loss import _head_grad_split
    from xorl_jax.parallel.rules import current, use_mesh

    axes = ("data", "fsdp", "expert", "tensor")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), axes)
    h, w, labels = _inputs(10, shape=(8, 6), D=16, V=40)
    batch = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1)
    h = jax.device_put(h, NamedSharding(mesh, P(batch, None, None)))
    with use_mesh(mesh, "full"):
        scatter, summed = _head_grad_split(current(), batch, 16)
        _assert_matches_reference(h, w, labels, chunk_size=5)
        grad_w = jax.grad(lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=5)[0], argnums=1)
        text = jax.jit(grad_w).lower(h, w).as_text()
    assert "reduce_scatter" in text
    assert set(scatter) == {a for a in ("fsdp", "expert") if mesh.shape[a] > 1}
    assert summed == (("data",) if mesh.shape["data"] > 1 else ())


@pytest.mark.parametrize("tp", [1, 2])
def test_under_a_mesh_context_each_device_runs_its_tokens(tp):
    """Inside `use_mesh` the token chunks run per device (shard_map over the batch axes, the head gradient summed
    once); a tensor-parallel mesh that splits the vocab takes the vocab chunks instead. Both equal the reference."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from xorl_jax.parallel.rules import use_mesh

    axes = ("data", "fsdp", "expert", "tensor")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4 // tp, 1, tp), axes)
    h, w, labels = _inputs(8, shape=(8, 12), D=16, V=96)
    h = jax.device_put(h, NamedSharding(mesh, P(("data", "fsdp"), None, None)))
    w = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor" if tp > 1 else None)))
    with use_mesh(mesh, "full"):
        _assert_matches_reference(h, w, labels, chunk_size=5)
        text = jax.jit(lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=5)[0]).lower(h, w).as_text()
    assert ("shard_map" in text or "manual" in text) == (tp == 1)  # per-device token chunks only without TP


@pytest.mark.parametrize("bad", [50, 1000, -1])
@pytest.mark.parametrize("method", METHODS)
def test_out_of_range_label_gives_nan(bad, method):
    h, w, labels = _inputs(7, V=50, ignore_frac=0.0)
    loss, n = chunked_cross_entropy(h, w, labels.at[1, 2].set(bad), chunk_size=16, method=method)
    assert np.isnan(float(loss)) and int(n) == labels.size


def test_bench_loss_script_runs_tiny():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_loss.py"), "--tiny"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith(("jnp reference", "chunked"))]
    assert len(rows) == 4 and all(float(r.split()[-1]) < 1e-5 for r in rows)  # every loss equals the reference


def test_frozen_head_skips_its_gradient_matmul():
    """When only the hidden states are differentiated (a frozen head, as under LoRA), the token-chunked loss runs
    two head matmuls per chunk instead of three, and dh is unchanged."""
    h, w, labels = _inputs(9, V=53)

    def dots(fn):
        return jax.jit(fn).lower(h, w).compile().as_text().count(" dot(")

    loss_of = lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=7, method="tokens")[0]  # noqa: E731
    both = jax.grad(loss_of, argnums=(0, 1))
    only_h = jax.grad(loss_of, argnums=0)
    assert dots(lambda h, w: only_h(h, w)) < dots(lambda h, w: both(h, w))
    np.testing.assert_allclose(only_h(h, w), both(h, w)[0], rtol=1e-6)
    _, dh_ref = jax.value_and_grad(lambda h: cross_entropy_reference(h, w, labels)[0])(h)
    np.testing.assert_allclose(only_h(h, w), dh_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_logits_equal_the_reference_on_rounded_logits(method, dtype):
    """logits_dtype=bfloat16 (model.lm_head_fp32: false) rounds the logits to bf16 before the softmax, as HF's bf16
    head does; with bf16 inputs the matmul writes them in bf16 directly (XLA may keep excess precision there, so
    that case is only checked to be close)."""
    h, w, labels = _inputs(11, shape=(4, 16), D=32, V=300, dtype=dtype)

    def reference(h, w):
        logits = jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
        logp = jax.nn.log_softmax(logits.astype(jnp.bfloat16).astype(jnp.float32), axis=-1)
        valid = labels != -100
        picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(valid, picked, 0.0))

    ours = chunked_cross_entropy(h, w, labels, chunk_size=16, method=method, logits_dtype=jnp.bfloat16)[0]
    exact = chunked_cross_entropy(h, w, labels, chunk_size=16, method=method)[0]
    if dtype == jnp.float32:
        np.testing.assert_allclose(ours, reference(h, w), rtol=2e-6)
        assert abs(float(exact) - float(ours)) > 1e-3  # the rounding is visible, so the check can fail
    else:
        np.testing.assert_allclose(ours, reference(h, w), rtol=1e-5)
