"""The Tinker losses (xorl_jax.rl_losses) against numpy transcriptions of their documented formulas: values and
gradients with respect to the learner's log-probabilities, masks, config defaults and overrides."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xorl_jax import rl_losses


def _batch(seed=0, shape=(3, 7)):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.5, 0.6, shape).astype(np.float32)
    q = (lp + rng.normal(0, 0.4, shape)).astype(np.float32)  # ratios on both sides of the clip range
    adv = rng.normal(0, 1, shape).astype(np.float32)
    w = (rng.random(shape) > 0.3).astype(np.float32)
    mask = np.ones(shape, np.float32)
    mask[0, -2:] = 0  # padding
    return lp, dict(logprobs=q, advantages=adv, weights=w, mask=mask)


def _numpy_loss(name, lp, x, cfg):
    m = x["mask"] * (x["weights"] if name != "cross_entropy" else 1.0)
    q, a = x["logprobs"], x["advantages"]
    r = np.exp(lp - q)
    if name == "cross_entropy":
        per = -lp * x["weights"] * x["mask"]
    elif name == "importance_sampling":
        per = -(r * a) * m
    elif name == "ppo":
        per = -np.minimum(r * a, np.clip(r, cfg["clip_low_threshold"], cfg["clip_high_threshold"]) * a) * m
    elif name == "cispo":
        per = -(np.clip(r, cfg["clip_low_threshold"], cfg["clip_high_threshold"]) * lp * a) * m
    elif name == "dro":
        per = -(lp * a - 0.5 * cfg["beta"] * (lp - q) ** 2) * m
    return per.sum()


def _numpy_grad(name, lp, x, cfg):
    """d loss / d lp, written out by hand for each formula."""
    m = x["mask"] * (x["weights"] if name != "cross_entropy" else 1.0)
    q, a = x["logprobs"], x["advantages"]
    r = np.exp(lp - q)
    if name == "cross_entropy":
        return -x["weights"] * x["mask"]
    if name == "importance_sampling":
        return -r * a * m
    if name == "ppo":
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        clipped = np.clip(r, lo, hi)
        unclipped_wins = r * a <= clipped * a  # min picks the unclipped term: its gradient flows
        return np.where(unclipped_wins, -r * a, 0.0) * m
    if name == "cispo":
        return -np.clip(r, cfg["clip_low_threshold"], cfg["clip_high_threshold"]) * a * m
    if name == "dro":
        return -(a - cfg["beta"] * (lp - q)) * m


@pytest.mark.parametrize("name", rl_losses.LOSS_NAMES)
@pytest.mark.parametrize("config", [None, "custom"])
def test_loss_and_gradient_match_formula(name, config):
    lp, x = _batch()
    user = None
    if config == "custom":
        user = {"ppo": {"clip_low_threshold": 0.7, "clip_high_threshold": 1.1},
                "cispo": {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5},
                "dro": {"beta": 0.05}}.get(name)
    cfg = rl_losses.resolved_config(name, user)
    inputs = {k: jnp.asarray(v) for k, v in x.items()}
    value, grad = jax.value_and_grad(lambda l: rl_losses.loss_sum(name, l, inputs, cfg))(jnp.asarray(lp))
    np.testing.assert_allclose(float(value), _numpy_loss(name, lp, x, cfg), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), _numpy_grad(name, lp, x, cfg), rtol=1e-5, atol=1e-6)


def test_defaults_as_documented():
    assert rl_losses.resolved_config("ppo", None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert rl_losses.resolved_config("cispo", None) == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert rl_losses.resolved_config("dro", None) == {"beta": 1.0}


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="loss_fn_config.beta: not a setting of ppo"):
        rl_losses.resolved_config("ppo", {"beta": 0.1})


def test_per_token_thresholds_override_config():
    lp, x = _batch(1)
    cfg = rl_losses.resolved_config("ppo", None)
    lo = np.full(lp.shape, 0.9, np.float32)
    hi = np.full(lp.shape, 1.05, np.float32)
    inputs = {k: jnp.asarray(v) for k, v in x.items()} | {"clip_low_threshold": jnp.asarray(lo),
                                                           "clip_high_threshold": jnp.asarray(hi)}
    got = float(rl_losses.loss_sum("ppo", jnp.asarray(lp), inputs, cfg))
    want = _numpy_loss("ppo", lp, x, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05})
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_target_logprobs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    tgt = rng.integers(0, 11, (2, 5))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(ref, tgt[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(rl_losses.target_logprobs(jnp.asarray(logits), jnp.asarray(tgt))), want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", rl_losses.LOSS_NAMES)
def test_loss_chosen_at_run_time_equals_static(name):
    """One compiled program serves every loss (the server's): same values and gradients as the static choice."""
    lp, x = _batch(2)
    cfg = rl_losses.resolved_config(name, None)
    inputs = {k: jnp.asarray(v) for k, v in x.items()}
    full = dict(inputs, clip_low_threshold=jnp.full(lp.shape, cfg.get("clip_low_threshold", 0.0)),
                clip_high_threshold=jnp.full(lp.shape, cfg.get("clip_high_threshold", 1.0)),
                beta=jnp.float32(cfg.get("beta", 0.0)))
    index = jnp.int32(rl_losses.LOSS_NAMES.index(name))
    f_static = lambda l: rl_losses.loss_sum(name, l, inputs, cfg)  # noqa: E731
    f_any = jax.jit(lambda l, i: jnp.sum(rl_losses.token_objective_by_index(i, l, full)))
    v1, g1 = jax.value_and_grad(f_static)(jnp.asarray(lp))
    v2, g2 = jax.value_and_grad(f_any)(jnp.asarray(lp), index)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-6, atol=1e-7)


def _reference_logprobs(h, w, targets, soft_cap=None):
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    return rl_losses.target_logprobs(logits, targets)


@pytest.mark.parametrize("chunk_size,soft_cap", [(1, None), (6, None), (16, 30.0), (4096, None)])
def test_chunked_target_logprobs_and_gradients_equal_unchunked(chunk_size, soft_cap):
    """Position chunks (T = 7 is no multiple of most chunk widths: padded) give the full-logits values and, for any
    per-token cotangent (an RL loss's), the same gradients for the hidden states and the head."""
    from xorl_jax.loss import chunked_target_logprobs

    rng = np.random.default_rng(1)
    B, T, D, V = 3, 7, 8, 37
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    chunked = lambda h, w: chunked_target_logprobs(h, w, tgt, chunk_size=chunk_size, soft_cap=soft_cap)  # noqa: E731
    reference = lambda h, w: _reference_logprobs(h, w, tgt, soft_cap)  # noqa: E731
    np.testing.assert_allclose(chunked(h, w), reference(h, w), rtol=1e-5, atol=1e-5)
    objective = lambda f: lambda h, w: jnp.sum(f(h, w) * cot)  # noqa: E731
    got = jax.grad(objective(chunked), argnums=(0, 1))(h, w)
    want = jax.grad(objective(reference), argnums=(0, 1))(h, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # a frozen head (LoRA): only the hidden states are differentiated
    dh = jax.grad(lambda h: objective(chunked)(h, w))(h)
    np.testing.assert_allclose(dh, want[0], rtol=1e-5, atol=1e-5)


def test_chunked_target_logprobs_never_hold_the_whole_logits():
    """The compiled forward and backward of a per-token objective on [B, T, V] = [2, 512, 8192] need far less
    scratch memory than the 32 MiB of its fp32 logits (the unchunked version needs several times that)."""
    from xorl_jax.loss import chunked_target_logprobs

    B, T, D, V = 2, 512, 16, 8192
    h = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    tgt = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def scratch(f):
        step = jax.jit(jax.grad(lambda h, w, t: jnp.sum(f(h, w, t)), argnums=(0, 1)))
        return step.lower(h, w, tgt).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = B * T * V * 4
    chunked = scratch(lambda h, w, t: chunked_target_logprobs(h, w, t, chunk_size=128))
    full = scratch(lambda h, w, t: _reference_logprobs(h, w, t))
    assert full >= logits_bytes  # the measure sees the logits where they exist
    assert chunked < logits_bytes / 3, (chunked, full)  # a few [128, V] chunks (4 MiB each)
