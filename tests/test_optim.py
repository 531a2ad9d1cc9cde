"""Schedules (xorl semantics), AdamW/SGD against torch, bf16 optimizer state, weight-decay and frozen masks."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from xorl_jax.optim import (apply_updates, build_optimizer, build_schedule, clip_by_global_norm, default_decay_mask,
                            global_grad_norm, scale_by_adam_low_precision)


def xorl_lr(k, *, lr, lr_min, total, warmup_ratio, style, decay_ratio):
    """xorl's LambdaLR factors times lr, restated step by step. Linear differs on purpose: xorl's ignores
    decay_ratio and lr_min (floors at 1e-7); ours ends its ramp at decay_ratio * total and floors at lr_min."""
    warmup = int(total * warmup_ratio)
    if k < warmup:
        return lr * k / max(1, warmup)
    if style == "constant":
        return lr
    if style == "linear":
        decay_end = int(total * decay_ratio)
        return max(lr_min, lr * (decay_end - k) / max(1, decay_end - warmup))
    decay_steps = int(total * decay_ratio)
    if k > decay_steps:
        return lr_min
    progress = (k - warmup) / max(1, decay_steps - warmup)
    return lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total,warmup_ratio,decay_ratio,lr_min", [(100, 0.1, 1.0, 0.0), (37, 0.0, 1.0, 1e-5),
                                                                    (50, 0.05, 0.6, 2e-5), (10, 1.0, 1.0, 0.0),
                                                                    (20, 0.1, 0.0, 1e-5)])
def test_schedule_matches_xorl(style, total, warmup_ratio, decay_ratio, lr_min):
    kw = dict(lr=1e-4, lr_min=lr_min, warmup_ratio=warmup_ratio, decay_ratio=decay_ratio)
    sched = jax.jit(build_schedule(total_steps=total, decay_style=style, **kw))
    got = np.array([float(sched(k)) for k in range(total + 3)])
    want = np.array([xorl_lr(k, total=total, style=style, **kw) for k in range(total + 3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_schedule_hand_values():
    sched = build_schedule(lr=1.0, lr_min=0.1, total_steps=10, warmup_ratio=0.2, decay_style="cosine")
    # warmup W=2 starts at 0; the cosine runs from step 2 (lr) to step 10 (lr_min), midway at step 6.
    np.testing.assert_allclose([float(sched(k)) for k in (0, 1, 2, 6, 10, 50)], [0, 0.5, 1.0, 0.55, 0.1, 0.1],
                               atol=1e-6)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lr_decay_style 'step'"):
        build_schedule(lr=1.0, total_steps=10, decay_style="step")
    with pytest.raises(ValueError, match="lr_min"):
        build_schedule(lr=1.0, lr_min=2.0, total_steps=10)


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32),
            "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}}


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return {k: v * 3 for k, v in _tree(100 + step).items() if k != "norm"} | {
        "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}}


def _run_optax(tx, params, steps):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for s in range(steps):
        grads = jax.tree.map(jnp.asarray, _grads(s))
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _run_torch(params, steps, make_opt, max_norm, decay_names):
    tp = {k: torch.tensor(v) for k, v in [("w", params["w"]), ("b", params["b"]), ("norm", params["norm"]["scale"])]}
    for t in tp.values():
        t.requires_grad_(True)
    opt = make_opt([{"params": [tp[n] for n in tp if n in decay_names]},
                    {"params": [tp[n] for n in tp if n not in decay_names], "weight_decay": 0.0}])
    for s in range(steps):
        g = _grads(s)
        for name, arr in [("w", g["w"]), ("b", g["b"]), ("norm", g["norm"]["scale"])]:
            tp[name].grad = torch.tensor(arr)
        torch.nn.utils.clip_grad_norm_(list(tp.values()), max_norm)
        opt.step()
    return {k: v.detach().numpy() for k, v in tp.items()}


def test_adamw_matches_torch_with_clipping_and_decay_mask():
    params = _tree()
    mask = default_decay_mask(params)
    assert mask == {"w": True, "b": False, "norm": {"scale": False}}
    tx = build_optimizer(schedule=1e-2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0,
                         decay_mask=mask)
    ours, _ = _run_optax(tx, params, 4)
    ref = _run_torch(params, 4, lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                                             weight_decay=0.1), 1.0, {"w"})
    np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["b"], ref["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["norm"]["scale"], ref["norm"], rtol=1e-5, atol=1e-6)


def test_sgd_matches_torch():
    params = _tree(1)
    for kw, torch_momentum in [({"b1": 0.8}, 0.8), ({"momentum": 0.0}, 0.0)]:  # momentum defaults to b1
        tx = build_optimizer(schedule=0.1, weight_decay=0.01, optimizer="sgd", max_grad_norm=2.0,
                             decay_mask=default_decay_mask(params), **kw)
        ours, _ = _run_optax(tx, params, 3)
        ref = _run_torch(params, 3, lambda g: torch.optim.SGD(g, lr=0.1, momentum=torch_momentum,
                                                               weight_decay=0.01), 2.0, {"w"})
        np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours["b"], ref["b"], rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="'lion'"):
        build_optimizer(schedule=1e-3, optimizer="lion")
    with pytest.raises(ValueError, match="'float16'"):
        build_optimizer(schedule=1e-3, optimizer_dtype="float16")


def test_bf16_state_is_bf16_and_close_to_fp32():
    params = _tree(2)
    kw = dict(schedule=1e-2, weight_decay=0.1, max_grad_norm=1.0, decay_mask=default_decay_mask(params))
    p32, _ = _run_optax(build_optimizer(**kw), params, 5)
    p16, state = _run_optax(build_optimizer(optimizer_dtype="bfloat16", **kw), params, 5)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
        np.testing.assert_allclose(a, b, atol=2e-3)
        assert a.dtype == np.float32 and b.dtype == np.float32


def test_bf16_stochastic_rounding_keeps_small_ema_steps():
    # nu starts at 1 and the gradient is 0: nu should decay as 0.999^k. Round-to-nearest bf16 never moves
    # (0.999 rounds back to 1.0); unbiased stochastic rounding tracks the decay on average.
    def nu_after(stochastic, steps=600):
        tx = scale_by_adam_low_precision(0.9, 0.999, state_dtype=jnp.bfloat16, stochastic_rounding=stochastic)
        p = jnp.zeros((4096,))
        state = tx.init(p)
        state = state._replace(nu=jnp.ones((4096,), jnp.bfloat16))
        step = jax.jit(tx.update)
        for _ in range(steps):
            _, state = step(jnp.zeros((4096,)), state)
        return float(jnp.mean(state.nu.astype(jnp.float32)))

    assert nu_after(False) == 1.0
    assert abs(nu_after(True) - 0.999 ** 600) < 0.01


def test_frozen_params_have_no_state_and_do_not_move():
    params = jax.tree.map(jnp.asarray, _tree(3))
    trainable = {"w": True, "b": False, "norm": {"scale": False}}
    tx = build_optimizer(schedule=1e-2, weight_decay=0.1, max_grad_norm=0.5, decay_mask=default_decay_mask(params),
                         trainable_mask=trainable)
    state = tx.init(params)
    sizes = [x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0]
    assert sorted(sizes) == [12, 12]  # mu and nu of w only
    grads = jax.tree.map(jnp.asarray, _grads(0))
    updates, _ = tx.update(grads, state, params)
    assert not np.any(updates["b"]) and not np.any(updates["norm"]["scale"])
    # Clipping sees only the trainable gradient: the w update equals that of an unmasked run on w alone.
    alone = build_optimizer(schedule=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    ref, _ = alone.update({"w": grads["w"]}, alone.init({"w": params["w"]}), {"w": params["w"]})
    np.testing.assert_allclose(updates["w"], ref["w"], rtol=1e-6)
    np.testing.assert_allclose(global_grad_norm(grads, trainable), np.linalg.norm(_grads(0)["w"]), rtol=1e-6)


def test_global_grad_norm_matches_optax():
    grads = jax.tree.map(jnp.asarray, _grads(1))
    np.testing.assert_allclose(global_grad_norm(grads), optax.global_norm(grads), rtol=1e-6)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])  # clipped, untouched
def test_clip_by_global_norm_matches_optax(max_norm):
    grads = jax.tree.map(jnp.asarray, _grads(1))
    ours, _ = clip_by_global_norm(max_norm).update(grads, None)
    ref, _ = optax.clip_by_global_norm(max_norm).update(grads, None)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert (max_norm > 1) == all(np.array_equal(a, g) for a, g in zip(jax.tree.leaves(ours), jax.tree.leaves(grads)))


@functools.cache
def _tiny_moe_state():
    from xorl_jax.models.qwen3 import Qwen3Config, Qwen3MoeForCausalLM

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=48, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16)
    return nnx.state(Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)


def test_default_decay_mask_on_a_model_state():
    state = _tiny_moe_state()
    mask = default_decay_mask(state)
    assert jax.tree.structure(mask) == jax.tree.structure(state)
    flat = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): m
            for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    by_name = {"/".join(p[:-1]): m for p, m in flat.items()}
    assert by_name["embed_tokens"] and by_name["lm_head"]
    assert not by_name["norm/weight"]
    group = "layers/groups/0/"
    # Stacked [L, D] norm weights are still norms; stacked projections and routers decay.
    assert not by_name[group + "input_layernorm/weight"] and not by_name[group + "self_attn/q_norm/weight"]
    assert by_name[group + "self_attn/q_proj"] and by_name[group + "mlp/router"] and by_name[group + "mlp/down_proj"]
    # A per-head vector in a scanned stack ([L, H] with axes ("layers", "gdn_heads")) gets no decay either.
    vec = {"A_log": nnx.Param(jnp.zeros((3, 4)), axes=("layers", "gdn_heads")),
           "conv": nnx.Param(jnp.zeros((3, 8, 4)), axes=("layers", "conv_dim", "conv_kernel"))}
    vec_mask = default_decay_mask(nnx.State(vec))
    assert jax.tree.leaves(vec_mask) == [False, True]  # A_log, conv


def test_optimizer_on_nnx_state_with_frozen_and_bf16():
    state = _tiny_moe_state()
    trainable = jax.tree.map(lambda x: x.ndim > 1, state)
    tx = build_optimizer(schedule=build_schedule(lr=1e-3, total_steps=10, warmup_ratio=0.1), weight_decay=0.01,
                         optimizer_dtype="bfloat16", decay_mask=default_decay_mask(state), trainable_mask=trainable)
    opt_state = jax.jit(tx.init)(state)
    grads = jax.tree.map(jnp.ones_like, state)

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new, opt_state = step(state, opt_state)
    new, opt_state = step(new, opt_state)
    for old_leaf, new_leaf, is_trainable in zip(jax.tree.leaves(state), jax.tree.leaves(new),
                                                jax.tree.leaves(trainable)):
        moved = bool(jnp.any(old_leaf != new_leaf))
        assert moved == is_trainable
    n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    n_trainable = sum(x.size for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(trainable)) if t)
    assert n_state == 2 * n_trainable


def test_rounding_noise_is_uniform_distinct_per_seed_and_independent_of_sharding():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from xorl_jax.optim import _rounding_noise

    shape = (8, 64, 96)
    noise = jax.jit(lambda s: _rounding_noise(shape, s))
    a, b = np.asarray(noise(jnp.uint32(1))), np.asarray(noise(jnp.uint32(2)))
    assert a.max() < 2**16 and abs(a.mean() / 2**16 - 0.5) < 0.01 and np.mean(a == b) < 0.01
    assert abs(np.corrcoef(a.ravel()[:-1], a.ravel()[1:])[0, 1]) < 0.02  # neighbours uncorrelated
    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    sharded = jax.jit(lambda s: _rounding_noise(shape, s), out_shardings=NamedSharding(mesh, P("x")))
    np.testing.assert_array_equal(np.asarray(sharded(jnp.uint32(1))), a)


def test_bf16_weights_keep_updates_below_half_a_step():
    """bf16 weights of 1.0 take +1e-4 ten times (a bf16 step at 1.0 is 2^-7 = 7.8e-3): round-to-nearest keeps 1.0,
    stochastic rounding moves the mean by about 1e-3; zero updates and fp32 weights are exact, and the same step
    rounds the same way."""
    p = {"w": jnp.ones((20000,), jnp.bfloat16), "b": jnp.full((3,), 0.5, jnp.float32),
         "frozen": jnp.linspace(-2, 2, 101).astype(jnp.bfloat16)}
    u = {"w": jnp.full((20000,), 1e-4, jnp.bfloat16), "b": jnp.full((3,), 1e-4, jnp.float32),
         "frozen": jnp.zeros((101,), jnp.bfloat16)}
    nearest = optax.apply_updates(p, u)
    assert float(jnp.mean(nearest["w"].astype(jnp.float32))) == 1.0
    q = p
    for step in range(10):
        q = apply_updates(q, u, jnp.int32(step))
    np.testing.assert_allclose(float(jnp.mean(q["w"].astype(jnp.float32))), 1.001, rtol=2e-4)
    assert q["w"].dtype == jnp.bfloat16 and q["b"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q["frozen"]), np.asarray(p["frozen"]))
    np.testing.assert_allclose(np.asarray(q["b"]), 0.5 + 10 * 1e-4, rtol=1e-6)
    again = apply_updates(p, u, jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(apply_updates(p, u, jnp.int32(3))["w"]))
    assert not np.array_equal(np.asarray(again["w"]), np.asarray(apply_updates(p, u, jnp.int32(4))["w"]))
