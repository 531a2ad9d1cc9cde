"""Gated delta rule jnp references: chunked == recurrent, packing, resets, and HF transformers' torch version."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from xorl_jax.kernels.gdn import gated_delta_rule
from xorl_jax.kernels.gdn import reference

# jit: eager op-by-op dispatch is what makes these tests slow on CPU, not the math
_STATIC = ("scale", "use_qk_l2norm", "output_final_state", "_reset_state")
gated_delta_rule_chunked = jax.jit(reference.gated_delta_rule_chunked, static_argnames=_STATIC + ("chunk_size",))
gated_delta_rule_recurrent = jax.jit(reference.gated_delta_rule_recurrent, static_argnames=_STATIC)


def make_inputs(seed, B, T, Hk, Hv, K, V, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, Hk, K), dtype)
    k = jax.random.normal(ks[1], (B, T, Hk, K), dtype)
    v = jax.random.normal(ks[2], (B, T, Hv, V), dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv)) - 1.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hv))).astype(dtype)
    h0 = jax.random.normal(ks[5], (B, Hv, K, V))
    return q, k, v, g, beta, h0


def random_segments(seed, B, T, pad_tail=True):
    """Rows of consecutive documents 1..n with random lengths (some of length 1), optionally zero padding at the end."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc = 0, 1
        end = T - (rng.integers(0, 4) if pad_tail else 0)
        while t < end:
            n = int(min(end - t, rng.choice([1, 2, rng.integers(3, max(4, T // 2))])))
            seg[b, t : t + n] = doc
            t, doc = t + n, doc + 1
    return jnp.asarray(seg)


SHAPES = [  # B, T, Hk, Hv, K, V, chunk
    (2, 32, 2, 2, 8, 8, 16),  # T a multiple of the chunk, Hv == Hk
    (2, 37, 1, 4, 8, 6, 16),  # T not a multiple, Hv != Hk, dk != dv
    (1, 70, 2, 4, 16, 8, 64),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_matches_recurrent_forward(shape, packed):
    B, T, Hk, Hv, K, V, C = shape
    q, k, v, g, beta, h0 = make_inputs(0, B, T, Hk, Hv, K, V)
    seg = random_segments(1, B, T) if packed else None
    o_r, s_r = gated_delta_rule_recurrent(q, k, v, g, beta, segment_ids=seg, initial_state=h0, output_final_state=True)
    o_c, s_c = gated_delta_rule_chunked(q, k, v, g, beta, segment_ids=seg, initial_state=h0, output_final_state=True,
                                        chunk_size=C)
    assert o_c.shape == (B, T, Hv, V) and s_c.shape == (B, Hv, K, V)
    np.testing.assert_allclose(o_c, o_r, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s_c, s_r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_chunked_matches_recurrent_gradients(shape):
    B, T, Hk, Hv, K, V, C = shape
    q, k, v, g, beta, h0 = make_inputs(2, B, T, Hk, Hv, K, V)
    seg = random_segments(3, B, T)
    r_o = jax.random.normal(jax.random.key(7), (B, T, Hv, V))
    r_s = jax.random.normal(jax.random.key(8), (B, Hv, K, V))

    def loss(fn, *args):
        o, s = fn(*args[:5], segment_ids=seg, initial_state=args[5], output_final_state=True)
        return jnp.sum(o * r_o) + jnp.sum(s * r_s)

    chunked = lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=C, **kw)
    argnums = tuple(range(6))
    g_r = jax.grad(lambda *a: loss(gated_delta_rule_recurrent, *a), argnums)(q, k, v, g, beta, h0)
    g_c = jax.jit(jax.grad(lambda *a: loss(chunked, *a), argnums))(q, k, v, g, beta, h0)
    for name, a, b in zip("q k v g beta h0".split(), g_c, g_r):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5, err_msg=name)


def _per_document(fn, q, k, v, g, beta, seg):
    """Runs each document of each row alone (zero initial state); returns outputs in packed layout."""
    out = np.zeros(v.shape, np.float32)
    seg = np.asarray(seg)
    for b in range(seg.shape[0]):
        starts = [0] + [t for t in range(1, seg.shape[1]) if seg[b, t] != seg[b, t - 1]] + [seg.shape[1]]
        for s, e in zip(starts[:-1], starts[1:]):
            o, _ = fn(q[b : b + 1, s:e], k[b : b + 1, s:e], v[b : b + 1, s:e], g[b : b + 1, s:e], beta[b : b + 1, s:e])
            out[b, s:e] = np.asarray(o[0])
    return out


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_packed_equals_per_document_and_reset_is_needed(impl):
    B, T, Hk, Hv, K, V = 2, 45, 2, 4, 8, 8
    q, k, v, g, beta, _ = make_inputs(4, B, T, Hk, Hv, K, V)
    g = g * 0.1  # slow decay, so a leaked state would be plainly visible
    seg = random_segments(5, B, T)
    fn = gated_delta_rule_chunked if impl == "chunked" else gated_delta_rule_recurrent
    kw = dict(chunk_size=16) if impl == "chunked" else {}
    alone = _per_document(lambda *a: fn(*a, **kw), q, k, v, g, beta, seg)
    packed, _ = fn(q, k, v, g, beta, segment_ids=seg, **kw)
    np.testing.assert_allclose(packed, alone, atol=2e-5, rtol=2e-5)
    leaky, _ = fn(q, k, v, g, beta, segment_ids=seg, _reset_state=False, **kw)
    assert np.abs(np.asarray(leaky) - alone).max() > 1e-2  # the test sees a missing reset


def test_reset_at_chunk_start_and_final_state_is_last_document():
    """A document starting exactly on a chunk boundary, and the final state equal to the last document run alone."""
    B, T, Hk, Hv, K, V = 1, 48, 1, 2, 8, 8
    q, k, v, g, beta, h0 = make_inputs(6, B, T, Hk, Hv, K, V)
    seg = jnp.asarray([[1] * 16 + [2] * 16 + [3] * 16])
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, segment_ids=seg, initial_state=h0, output_final_state=True,
                                    chunk_size=16)
    o_last, s_last = gated_delta_rule_chunked(*(x[:, 32:] for x in (q, k, v, g, beta)), output_final_state=True,
                                              chunk_size=16)
    np.testing.assert_allclose(o[:, 32:], o_last, atol=1e-5)
    np.testing.assert_allclose(s, s_last, atol=1e-5)
    o_first, _ = gated_delta_rule_chunked(*(x[:, :16] for x in (q, k, v, g, beta)), initial_state=h0, chunk_size=16)
    np.testing.assert_allclose(o[:, :16], o_first, atol=1e-5)


def test_bf16_inputs_give_bf16_output_close_to_fp32():
    q, k, v, g, beta, _ = make_inputs(9, 1, 40, 2, 2, 16, 16)
    o32, _ = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=16)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    o16, _ = gated_delta_rule_chunked(*bf, g, beta.astype(jnp.bfloat16), chunk_size=16)
    assert o16.dtype == jnp.bfloat16
    np.testing.assert_allclose(o16.astype(jnp.float32), o32, atol=0.1)


def test_dispatcher():
    q, k, v, g, beta, _ = make_inputs(10, 1, 20, 1, 2, 8, 8)
    o_auto, _ = gated_delta_rule(q, k, v, g, beta)
    o_rec, _ = gated_delta_rule(q, k, v, g, beta, implementation="recurrent")
    np.testing.assert_allclose(o_auto, o_rec, atol=2e-5)
    with pytest.raises(ValueError, match="not one of"):
        gated_delta_rule(q, k, v, g, beta, implementation="fla")
    q2, k2 = (jnp.concatenate([x, x], axis=2) for x in (q, k))  # 2 key heads, 3 value heads
    v3, g3, b3 = v[:, :, :1].repeat(3, 2), g[..., :1].repeat(3, 2), beta[..., :1].repeat(3, 2)
    with pytest.raises(ValueError, match="multiple of key heads"):
        gated_delta_rule(q2, k2, v3, g3, b3)


@pytest.mark.parametrize("which", ["chunk", "recurrent"])
def test_matches_hf_transformers_torch(which):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    fn = hf.torch_chunk_gated_delta_rule if which == "chunk" else hf.torch_recurrent_gated_delta_rule
    B, T, Hk, Hv, K, V = 2, 75, 2, 4, 16, 8
    q, k, v, g, beta, h0 = make_inputs(11, B, T, Hk, Hv, K, V)
    t = lambda x: torch.from_numpy(np.array(x, np.float32))
    o_hf, s_hf = fn(t(q), t(k), t(v), t(g), t(beta), initial_state=t(h0), output_final_state=True,
                    use_qk_l2norm_in_kernel=True)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    np.testing.assert_allclose(o, o_hf.numpy(), atol=3e-5, rtol=3e-5)
    np.testing.assert_allclose(s, s_hf.numpy(), atol=3e-5, rtol=3e-5)
