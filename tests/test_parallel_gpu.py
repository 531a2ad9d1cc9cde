"""Sharded training math equals one device on real GPUs: tests/test_parallel.py's tiny Qwen3 / Qwen3-MoE /
Qwen3.5-MoE models (skewed routing for the MoE ones) under FSDP, TP x FSDP, EP and EP x FSDP over the visible GPUs
(NCCL collectives), with the MoE experts on the GPU grouped GEMM (triton) and on the reference path (eager), and the
expert-parallel exchange both padded (all_to_all) and ragged (ragged_all_to_all).

Run on a machine with 2+ GPUs: `NCCL_NVLS_ENABLE=0 scripts/gpu_check.sh -k parallel_gpu`.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_parallel import FAMILIES, B, T, V, assert_same_loss_and_grads, loss_and_grads, make_model
from xorl_jax.models.common import ModelOptions
from xorl_jax.parallel import rules as R
from xorl_jax.parallel.mesh import build_mesh


def _gpus() -> int:
    try:
        return jax.device_count() if jax.default_backend() == "gpu" else 0
    except RuntimeError:
        return 0


N_GPUS = _gpus()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(N_GPUS < 2, reason=f"needs 2+ GPUs (JAX backend {jax.default_backend()}, "
                                                    f"{N_GPUS} GPUs)")]


def _mesh_devices() -> int:
    """The largest power of two <= the GPU count, at most 8: it divides the batch (8 rows) and the 8 experts."""
    n = 1
    while n * 2 <= min(N_GPUS, 8):
        n *= 2
    return n


def mesh_sizes(name: str, n: int) -> dict | None:
    """Mesh `name` on n devices, or None where it does not fit."""
    if name == "fsdp":
        return dict(data_parallel_shard_size=n)
    if name == "tp2_fsdp":
        return dict(data_parallel_shard_size=n // 2, tensor_parallel_size=2)
    if name == "ep":
        return dict(data_parallel_shard_size=n, expert_parallel_size=n)
    if name == "ep_half_fsdp2":
        return dict(data_parallel_shard_size=n, expert_parallel_size=n // 2) if n >= 4 else None
    raise ValueError(name)


MESHES = ("fsdp", "tp2_fsdp", "ep", "ep_half_fsdp2")
CASES = []
for family in FAMILIES:
    moe = family != "qwen3"
    for mesh_name in MESHES:
        if not moe and mesh_name.startswith("ep"):
            continue
        for impl in (("eager", "triton") if moe else ("eager",)):
            for dispatch in (("padded", "ragged") if mesh_name.startswith("ep") else ("padded",)):
                CASES.append((family, mesh_name, impl, dispatch))


def with_implementation(model, family: str, impl: str, dispatch: str = "padded"):
    """The same model (same weights, skewed routers included) with another moe_implementation / EP exchange."""
    if impl == "eager" and dispatch == "padded":
        return model
    cls, cfg = FAMILIES[family]()
    other = cls(cfg, ModelOptions(moe_implementation=impl, ep_exchange=dispatch), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    return other


@pytest.mark.parametrize("family,mesh_name,impl,dispatch", CASES)
def test_sharded_loss_and_grads_equal_one_device_on_gpus(family, mesh_name, impl, dispatch):
    n = _mesh_devices()
    sizes = mesh_sizes(mesh_name, n)
    if sizes is None:
        pytest.skip(f"mesh {mesh_name} needs 4+ GPUs, have {N_GPUS}")
    if impl == "triton":
        from xorl_jax.kernels.gmm import triton_available

        if not triton_available():
            pytest.skip("jax-triton is not installed")
    skew = family != "qwen3"
    cfg, model = make_model(family, skew=skew)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
    aux = 0.01 if cfg.num_experts else 0.0
    mesh = build_mesh(**sizes, model_config=cfg, devices=jax.devices()[:n])
    # fp32 with full-precision matmuls (no TF32) everywhere, so the only differences left are summation orders:
    # cuBLAS / Triton tile splits, NCCL reduction order and the per-shard partial sums of FSDP/TP. Those move
    # results by a few fp32 ulps times the number of terms (~1e-6 relative here), far inside rtol 1e-5 for the
    # loss. Gradient entries that nearly cancel get an absolute floor of 1e-5 of the tensor's largest entry; a
    # wrong exchange, a missing psum or a dropped token changes values by O(1) of that scale.
    with jax.default_matmul_precision("highest"):
        ref_loss, ref_grads = loss_and_grads(model, ids, aux)  # one GPU, the dense reference experts
        loss, grads = loss_and_grads(with_implementation(model, family, impl, dispatch), ids, aux, mesh)
    assert np.isfinite(float(loss))
    assert_same_loss_and_grads(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("mesh_name", ["fsdp", "tp2_fsdp"])
def test_cudnn_packed_attention_with_rows_split_over_gpus(mesh_name):
    """bf16 packed-document attention on cuDNN with rows (and heads under TP) split over the GPUs equals the fp32
    reference on one device; rows with different document counts (each device's own layout must reach its kernel)."""
    from test_attention import _inputs, _segments

    from xorl_jax.kernels.attention import attention, attention_reference, packed_layout
    from xorl_jax.parallel.rules import batch_sharding, use_mesh

    n = _mesh_devices()
    sizes = mesh_sizes(mesh_name, n)
    if sizes["data_parallel_shard_size"] < 2:
        pytest.skip(f"mesh {mesh_name} needs rows split over 2+ GPUs, have {N_GPUS}")
    rows = sizes["data_parallel_shard_size"]
    mesh = build_mesh(**sizes, devices=jax.devices()[:n])
    T, H, K, d = 2048, 16, 4, 128
    q, k, v = _inputs(rows, T, H, K, d, jnp.bfloat16, seed=3)
    layouts = [[300, 700, 500, 548], [T], [T // 2, T // 2], [100] * 20 + [T - 2000]]
    seg = _segments(rows, T, [layouts[r % len(layouts)] for r in range(rows)])
    w = jax.random.normal(jax.random.key(4), (rows, T, H, d), jnp.float32)

    def loss(q, k, v, seg):
        out = attention(q, k, v, segment_ids=seg, implementation="cudnn", layout=packed_layout(seg))
        return jnp.sum(out.astype(jnp.float32) * w)

    def ref_loss(q, k, v, seg):
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        return jnp.sum(attention_reference(f32(q), f32(k), f32(v), segment_ids=seg) * w)

    grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1, 2)))  # noqa: E731
    g_ref = grad(ref_loss)(q, k, v, seg)
    put = lambda a: jax.device_put(a, batch_sharding(mesh))  # noqa: E731
    with use_mesh(mesh):
        g = grad(loss)(put(q), put(k), put(v), put(seg))
    for name, a, b in zip("qkv", g, g_ref):
        a = np.asarray(a.astype(jnp.float32))
        for r in range(rows):
            assert np.all(np.isfinite(a[r])), f"d{name} row {r}: non-finite"
            rel = float(np.linalg.norm(a[r] - b[r]) / np.linalg.norm(b[r]))
            assert rel < 3e-2, (name, r, rel)


@pytest.mark.parametrize("family,mesh_name", [("qwen3", "fsdp"), ("qwen3_moe", "ep"), ("qwen3_5_moe", "ep")])
def test_bf16_packed_documents_sharded_equal_one_gpu(family, mesh_name):
    """The path real runs take and the fp32 cases above do not: bf16 compute (cuDNN attention), packed documents
    (segment ids, different per row), GPU kernels; rows split over the GPUs against the same model on one GPU.
    bf16 sums in another order move attention gradients by ~1e-2 relative; a device reading another's rows moves
    them by O(1)."""
    import dataclasses

    from xorl_jax.kernels.gmm import triton_available

    cls, cfg = FAMILIES[family]()
    cfg = dataclasses.replace(cfg, head_dim=64)
    opts = ModelOptions(dtype="bfloat16", moe_implementation="triton" if triton_available() else "eager")
    model = cls(cfg, opts, rngs=nnx.Rngs(0))
    n = _mesh_devices()
    mesh = build_mesh(**mesh_sizes(mesh_name, n), model_config=cfg, devices=jax.devices()[:n])
    rows, T = 8, 256
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, V, (rows, T)), jnp.int32)
    seg = np.zeros((rows, T), np.int32)
    for r in range(rows):  # 1 to 12 documents per row, at random cut points
        cuts = np.sort(rng.choice(np.arange(1, T), size=r * 11 // 7, replace=False))
        seg[r] = np.searchsorted(cuts, np.arange(T), side="right") + 1
    positions = np.zeros((rows, T), np.int32)
    for r in range(rows):
        starts = np.r_[0, np.flatnonzero(np.diff(seg[r])) + 1]
        for s, e in zip(starts, np.r_[starts[1:], T]):
            positions[r, s:e] = np.arange(e - s)
    seg, positions = jnp.asarray(seg), jnp.asarray(positions)
    graphdef, state = nnx.split(model)

    def loss(state, ids, positions, seg):
        logits = nnx.merge(graphdef, state)(ids, positions, seg).logits[:, :-1].astype(jnp.float32)
        same_doc = seg[:, 1:] == seg[:, :-1]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * same_doc) / jnp.sum(same_doc)

    f = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grads = f(state, ids, positions, seg)
    with R.use_mesh(mesh):
        put = lambda a: jax.device_put(a, R.batch_sharding(mesh))  # noqa: E731
        sharded = jax.device_put(state, R.param_shardings(model, mesh))
        got_loss, grads = f(sharded, put(ids), put(positions), put(seg))
    assert np.isfinite(float(got_loss))
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-2)
    flat_ref = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        a, b = np.asarray(g[...], np.float32), np.asarray(flat_ref[path][...], np.float32)
        assert np.all(np.isfinite(a)), ".".join(map(str, path))
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
        name = ".".join(map(str, path))
        # routing near-ties flip with the last bf16 bit, which moves the experts' and routers' gradients by up to
        # ~0.1 on these tiny models (8 CPU devices); attention parameters stay near 1e-2
        assert rel < (5e-2 if "self_attn" in name else 0.25), (name, rel)
