"""Causal depthwise conv1d + SiLU: HF parity, per-document reset, dtypes."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from xorl_jax.layers import conv

causal_conv1d_silu = jax.jit(conv.causal_conv1d_silu, static_argnames=("_reset_window",))


def _inputs(seed, B=2, T=23, C=6, K=4):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, T, C)), jax.random.normal(kw, (C, K)) * 0.5


def test_matches_hf_causal_conv1d():
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    x, w = _inputs(0)
    ref = hf.causal_conv1d_fn(torch.from_numpy(np.array(x)).transpose(1, 2), torch.from_numpy(np.array(w)),
                              activation="silu")
    np.testing.assert_allclose(causal_conv1d_silu(x, w), ref.transpose(1, 2).numpy(), atol=1e-5, rtol=1e-5)


def test_packed_equals_per_document_and_reset_is_needed():
    x, w = _inputs(1, B=2, T=20)
    seg = jnp.asarray([[1] * 5 + [2] * 1 + [3] * 12 + [0] * 2, [1] * 2 + [2] * 18])
    packed = np.asarray(causal_conv1d_silu(x, w, seg))
    alone = np.zeros_like(packed)
    s_np = np.asarray(seg)
    for b in range(2):
        cuts = [0] + [t for t in range(1, 20) if s_np[b, t] != s_np[b, t - 1]] + [20]
        for s, e in zip(cuts[:-1], cuts[1:]):
            alone[b, s:e] = np.asarray(causal_conv1d_silu(x[b : b + 1, s:e], w))[0]
    np.testing.assert_allclose(packed, alone, atol=1e-6)
    leaky = np.asarray(causal_conv1d_silu(x, w, seg, _reset_window=False))
    assert np.abs(leaky - alone).max() > 1e-2
    np.testing.assert_allclose(leaky, causal_conv1d_silu(x, w), atol=1e-6)


def test_gradients_respect_documents():
    x, w = _inputs(2, B=1, T=12, C=3)
    seg = jnp.asarray([[1] * 6 + [2] * 6])
    # the output at the first token of document 2 must not depend on document 1
    jac = jax.jacrev(lambda x: causal_conv1d_silu(x, w, seg)[0, 6].sum())(x)
    assert np.abs(np.asarray(jac[0, :6])).max() == 0.0
    assert np.abs(np.asarray(jac[0, 6])).max() > 0.0


def test_dtype_and_shape_errors():
    x, w = _inputs(3)
    y = causal_conv1d_silu(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), causal_conv1d_silu(x, w), atol=0.05)
    with pytest.raises(ValueError, match="conv weight"):
        causal_conv1d_silu(x, w.T)
