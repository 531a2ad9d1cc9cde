"""Expert parallelism (shard_map all-to-all, dropless) equals the dense one-device reference, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xorl_jax.layers.experts import experts_dense, experts_sorted, in_token_chunks, route
from xorl_jax.parallel.expert import experts_ep, resolve_exchange
from xorl_jax.parallel.mesh import build_mesh

N, D, E, F, K = 64, 16, 8, 12, 2


def inputs(skew: bool, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(ks[0], (N, D))
    logits = jax.random.normal(ks[1], (N, E))
    if skew:  # nearly every token picks experts 0 and 1, both on expert rank 0: worst case for the exchange
        logits = logits + jnp.array([20.0, 19.0] + [0.0] * (E - 2))
    _, top_w, top_i = route(logits, K, True)
    w_gu = 0.3 * jax.random.normal(ks[2], (E, D, 2, F))
    w_down = 0.3 * jax.random.normal(ks[3], (E, F, D))
    return x, top_i, top_w, w_gu, w_down


@pytest.mark.parametrize("sizes", [dict(data_parallel_shard_size=8, expert_parallel_size=8),
                                   dict(data_parallel_shard_size=8, expert_parallel_size=4),
                                   dict(data_parallel_shard_size=4, expert_parallel_size=2, tensor_parallel_size=2),
                                   dict(data_parallel_replicate_size=2, data_parallel_shard_size=4,
                                        expert_parallel_size=4)])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("capacity_factor", [2.0, 1e-3])  # default; tiny = every device overflows to worst case
def test_ep_matches_dense_values_and_grads(sizes, skew, capacity_factor):
    mesh = build_mesh(**sizes)
    x, top_i, top_w, w_gu, w_down = inputs(skew)
    if skew:
        assert np.mean(np.asarray(top_i) < 2) > 0.9  # at most two expert ranks receive everything

    def loss(fn, x, top_w, w_gu, w_down):
        y = fn(x, top_i, top_w, w_gu, w_down)
        return jnp.sum(y * jnp.cos(jnp.arange(N * D).reshape(N, D))), y

    ref_fn = experts_dense
    ep_fn = lambda *a: experts_ep(*a, mesh=mesh, implementation="native", capacity_factor=capacity_factor)
    (l_ref, y_ref), g_ref = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)(ref_fn, x, top_w, w_gu, w_down)
    (l_ep, y_ep), g_ep = jax.jit(jax.value_and_grad(lambda *a: loss(ep_fn, *a), argnums=(0, 1, 2, 3), has_aux=True))(
        x, top_w, w_gu, w_down)
    np.testing.assert_allclose(np.asarray(y_ep), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l_ep), float(l_ref), rtol=1e-5)
    for name, a, b in zip(("x", "top_w", "w_gate_up", "w_down"), g_ep, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("path", ["sorted", "ep8", "ep2_tp2"])
def test_token_chunks_match_one_pass(path):
    """Tokens through the experts in chunks (lax.map, the last one padded) give the one-pass values and gradients:
    3 tokens per chunk, so 64 tokens take 22 chunks on one device and 8 tokens per device take 3 under EP 8."""
    cap = 3 * K * D
    x, top_i, top_w, w_gu, w_down = inputs(False)
    if path == "sorted":
        fn = in_token_chunks(lambda *a: experts_sorted(*a, implementation="native"), K, D, max_copy_elements=cap)
    else:
        mesh = build_mesh(**(dict(data_parallel_shard_size=8, expert_parallel_size=8) if path == "ep8" else
                             dict(data_parallel_shard_size=4, expert_parallel_size=2, tensor_parallel_size=2)))
        fn = lambda *a: experts_ep(*a, mesh=mesh, implementation="native", max_copy_elements=cap)  # noqa: E731
    cot = jnp.cos(jnp.arange(N * D).reshape(N, D))
    grad = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda *a: jnp.sum(f(a[0], top_i, *a[1:]) * cot), argnums=(0, 1, 2, 3)))
    hlo = grad(fn).lower(x, top_w, w_gu, w_down).as_text()
    assert "while" in hlo  # the chunk loop is there
    (l_got, g_got), (l_ref, g_ref) = grad(fn)(x, top_w, w_gu, w_down), grad(experts_dense)(x, top_w, w_gu, w_down)
    np.testing.assert_allclose(float(l_got), float(l_ref), rtol=1e-5)
    for name, a, b in zip(("x", "top_w", "w_gate_up", "w_down"), g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)


def test_padded_capacity_and_which_branch_runs():
    from xorl_jax.parallel.expert import padded_capacity

    assert padded_capacity(16384, 8) == 4096 and padded_capacity(16384, 2) == 16384  # never above the worst case
    assert padded_capacity(20, 4) == 16 and padded_capacity(4, 4) == 2  # multiples of 8 above 8
    assert padded_capacity(16, 8, 1e-3) == 1
    # Balanced routing takes the [R, cap, D] buffers, skewed routing the worst case: the compiled step has both
    # (a conditional), and only the taken one runs (values checked in the test above).
    mesh = build_mesh(data_parallel_shard_size=8, expert_parallel_size=8)
    x, top_i, top_w, w_gu, w_down = inputs(False)
    hlo = jax.jit(lambda *a: experts_ep(*a, mesh=mesh, implementation="native")).lower(
        x, top_i, top_w, w_gu, w_down).compile().as_text()
    assert "conditional" in hlo


def test_differentiated_exchange_keeps_no_worst_case_residuals():
    """The backward of the padded exchange keeps the usual branch's residuals and the worst-case branch's operands,
    never worst-case-sized buffers (which a plain cond would write as zeros at every step)."""
    mesh = build_mesh(data_parallel_shard_size=8, expert_parallel_size=8)
    x, top_i, top_w, w_gu, w_down = inputs(False)
    loss = lambda x, g, d: jnp.sum(experts_ep(x, top_i, top_w, g, d, mesh=mesh, implementation="native") ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w_gu, w_down)

    def cond_outputs(j):
        for e in j.eqns:
            if e.primitive.name == "cond":
                yield from (v.aval.shape for v in e.outvars)
            for p in e.params.values():
                for q in p if isinstance(p, (tuple, list)) else [p]:
                    inner = getattr(q, "jaxpr", q)
                    if hasattr(inner, "eqns"):
                        yield from cond_outputs(inner)

    shapes = list(cond_outputs(jaxpr.jaxpr))
    R, copies = 8, (N // 8) * K  # expert ranks, token copies per device
    assert shapes, "the exchange has its conditional"
    assert not [s for s in shapes if s[:1] == (R * copies,) or s[:2] == (R, copies)], shapes


def test_ep_errors_are_clear():
    mesh = build_mesh(data_parallel_shard_size=8, expert_parallel_size=8)
    x, top_i, top_w, w_gu, w_down = inputs(False)
    with pytest.raises(ValueError, match="num_experts 6 is not divisible"):
        experts_ep(x, top_i, top_w, w_gu[:6], w_down[:6], mesh=mesh)
    with pytest.raises(ValueError, match="not one of"):
        resolve_exchange("fast")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="ragged"):
            resolve_exchange("ragged")


@pytest.mark.gpu
def test_ragged_exchange_matches_padded_on_gpu():
    n = jax.device_count()
    if n < 2:
        pytest.skip(f"needs 2+ GPUs for an expert axis, found {n}")
    mesh = build_mesh(data_parallel_shard_size=n, expert_parallel_size=n)
    x, top_i, top_w, w_gu, w_down = inputs(True)
    outs = [jax.jit(lambda *a, ex=ex: experts_ep(*a, mesh=mesh, exchange=ex))(x, top_i, top_w, w_gu, w_down)
            for ex in ("padded", "ragged")]
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), rtol=1e-5, atol=1e-5)


def _bench_ep():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_ep.py")
    spec = importlib.util.spec_from_file_location("bench_ep", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.gpu
def test_ep_matches_one_device_at_moe_layer_size_on_gpus():
    """Qwen3-30B-A3B's MoE layer (hidden 2048, 128 experts top-8, 8192 tokens per GPU, bf16) over 2 GPUs, EP 2:
    outputs and gradients within bf16 error of one GPU running each GPU's tokens, and the one-GPU layer on all
    16384 tokens (token chunks) within the same error. The whole batch in one pass disagreed (0.21 of the largest
    token gradient on an H200, 2026-11-23): that is why the layer chunks; printed, not asserted."""
    if jax.device_count() < 2:
        pytest.skip(f"needs 2+ GPUs for an expert axis, found {jax.device_count()}")
    res = _bench_ep().main(["--check", "--iters", "1", "--warmup", "0", "--moe", "triton", "--devices", "2",
                            "--exchanges", "padded"])["results"]
    print("one pass over 16384 tokens vs per-GPU chunks:", res["one device, whole batch"])
    for name in ("EP2 padded", "one device, layer"):
        err = res[name]["check_max_rel_err_vs_chunked"]
        assert err < 3e-2, f"{name} vs one GPU per 8192 tokens: max relative error {err:.2e} ({res[name]['per_leaf']})"


def test_bench_ep_tiny_on_four_devices(tmp_path):
    """benchmarks/bench_ep.py --tiny on 4 of the fake devices: runs, and its EP step (padded exchange at two capacity
    factors) gives the one-device loss and gradients."""
    import json

    if jax.device_count() < 4:
        pytest.skip(f"needs 4 devices, found {jax.device_count()}")
    bench = _bench_ep()
    out = tmp_path / "ep.json"
    res = bench.main(["--tiny", "--devices", "4", "--ep", "2", "--routing", "skewed", "--capacity-factors", "2,0.5",
                      "--json", str(out)])
    assert json.loads(out.read_text())["devices"] == 4 and res["ep"] == 2
    one = res["results"]["one device"]
    # factor 0.5 under skewed routing takes the worst-case fallback buffer; both must equal one device
    padded = [res["results"]["EP2 padded cf 2"], res["results"]["EP2 padded cf 0.5"]]
    for r in [one] + padded:
        assert r["ms"] > 0 and r["tokens_per_s_per_device"] > 0 and "ratio_vs_one_device" in r
    for r in padded:
        assert r["check_max_rel_err"] < 1e-5
    assert "EP2 ragged" in res["results"]
