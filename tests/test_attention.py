"""Attention backends: the jnp reference against per-document attention (CPU), cuDNN against the reference (GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xorl_jax.kernels import attention as attn_lib
from xorl_jax.kernels.attention import cudnn as attn_cudnn
from xorl_jax.kernels.attention import attention, attention_reference, resolve_attn_implementation, segment_layout


def _inputs(B=2, T=48, H=4, K=2, d=32, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, d), dtype)
    k = jax.random.normal(ks[1], (B, T, K, d), dtype)
    v = jax.random.normal(ks[2], (B, T, K, d), dtype)
    return q, k, v


def _segments(B, T, lengths_per_row):
    seg = np.zeros((B, T), np.int32)
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for i, n in enumerate(lengths):
            seg[b, start:start + n] = i + 1
            start += n
    return jnp.asarray(seg)


def test_reference_equals_per_document_attention():
    q, k, v = _inputs(B=1, T=30)
    seg = _segments(1, 30, [[7, 13, 10]])
    packed = attention_reference(q, k, v, segment_ids=seg)
    start = 0
    for n in (7, 13, 10):
        alone = attention_reference(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n])
        np.testing.assert_allclose(packed[:, start:start + n], alone, atol=1e-5)
        start += n


def test_segment_layout_counts_and_offsets():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    offsets, lengths, count = segment_layout(seg, 5)
    assert offsets.tolist() == [[0, 3, 5, 6, -1, -1]]
    assert lengths.tolist() == [[3, 2, 1, 2, -1]]
    assert count.tolist() == [4]


def test_segment_layout_matches_a_plain_loop_on_random_rows():
    rng = np.random.default_rng(0)
    seg = np.cumsum(rng.random((6, 40)) < 0.2, axis=1).astype(np.int32) + 1  # 1-15 documents per row
    for M in (3, 8, 64):
        offsets, lengths, count = (np.asarray(a) for a in segment_layout(jnp.asarray(seg), M))
        for b in range(6):
            starts = [t for t in range(40) if t == 0 or seg[b, t] != seg[b, t - 1]]
            ends = starts[1:] + [40]
            assert count[b] == len(starts)
            kept = min(M, len(starts))
            want_len = [e - s for s, e in zip(starts, ends)][:kept] + [-1] * (M - kept)
            assert lengths[b].tolist() == want_len
            assert offsets[b].tolist() == starts[:kept] + [-1] * (M + 1 - kept)


def test_packed_layout_tiers_are_prefixes_of_the_largest():
    seg = _segments(2, 48, [[10, 20, 18], [48]])
    layout = attn_lib.packed_layout(seg, 64)
    assert layout.counts.tolist() == [3, 1] and layout.tiers == (8, 64)
    assert [o.shape for o in layout.offsets] == [(2, 9), (2, 65)]
    assert layout.offsets[0].tolist() == [[0, 10, 30] + [-1] * 6, [0] + [-1] * 8]
    assert layout.lengths[0].tolist() == [[10, 20, 18] + [-1] * 5, [48] + [-1] * 7]


def test_layout_branch_takes_the_smallest_tier_that_holds_every_row():
    tiers = attn_lib.segment_tiers(64)
    assert tiers == (8, 64) and attn_lib.segment_tiers(4) == (4,)
    assert [int(attn_lib.layout_branch(jnp.array(c), tiers)) for c in ([1, 8], [3, 9], [64, 2], [65, 1])] == \
        [0, 1, 1, 2]


def test_document_slots_on_the_host_agree_with_the_device_choice():
    """The host's slot count for a batch (any leading axes, e.g. micro-batches) is the tier the device's switch
    would take for the same rows, MASKED past the largest; the fixed layout is that tier of the switching one."""
    rng = np.random.default_rng(3)
    for p in (0.02, 0.1, 0.3, 0.9):
        seg = (np.cumsum(rng.random((2, 3, 96)) < p, axis=-1) + 1).astype(np.int32)
        for M in (8, 16, 64):
            tiers = attn_lib.segment_tiers(M)
            counts = np.asarray(segment_layout(jnp.asarray(seg.reshape(-1, 96)), M)[2])
            branch = int(attn_lib.layout_branch(jnp.asarray(counts), tiers))
            slots = attn_lib.document_slots(seg, M)
            assert slots == (tiers[branch] if branch < len(tiers) else attn_lib.MASKED), (p, M, counts.max())
            fixed = attn_lib.packed_layout(jnp.asarray(seg[0]), M, slots=slots)
            assert fixed.counts is None and fixed.tiers == ((slots,) if slots else ())
            if slots:
                switching = attn_lib.packed_layout(jnp.asarray(seg[0]), M)
                i = switching.tiers.index(slots)
                assert fixed.offsets[0].tolist() == switching.offsets[i].tolist()
                assert fixed.lengths[0].tolist() == switching.lengths[i].tolist()
    assert attn_lib.document_slots(np.ones((2, 5), np.int32)) == 8


def test_finer_host_sizes_fit_the_batch_and_attend_like_the_reference(monkeypatch):
    """With finer host sizes (the experiment `ModelOptions.attn_slot_sizes`) the host picks the smallest that holds
    every row, the largest stays max_segments, and attention on that layout equals the reference (cuDNN's packed call
    replaced by a jnp stand-in that sees documents only through the offsets and lengths)."""
    seg_few = _segments(2, 64, [[10, 30, 20], [64]])  # 4 segments counting the padding
    seg_many = _segments(2, 64, [[4] * 12, [64]])  # 13 segments counting the padding
    assert attn_lib.document_slots(np.asarray(seg_few), 64) == 8  # default: the device's tiers
    fine = (4, 8, 16, 32)
    assert attn_lib.host_tiers(64, fine) == (4, 8, 16, 32, 64) and attn_lib.host_tiers(12, fine) == (4, 8, 12)
    assert attn_lib.document_slots(np.asarray(seg_few), 64, fine) == 4
    assert attn_lib.document_slots(np.asarray(seg_many), 64, fine) == 16
    assert attn_lib.document_slots(np.asarray(seg_many), 12, fine) == attn_lib.MASKED
    assert attn_lib.segment_tiers(64) == (8, 64)  # the device-side choice keeps its two tiers

    monkeypatch.setattr(attn_lib, "resolve_attn_implementation", lambda name, dtype=None: "cudnn")
    monkeypatch.setattr(attn_cudnn, "_cudnn_packed", _attention_from_layout)
    q, k, v = _inputs(2, 64, 4, 2, 16, jnp.float32, seed=9)
    for seg in (seg_few, seg_many):
        slots = attn_lib.document_slots(np.asarray(seg), 64, fine)
        layout = attn_lib.packed_layout(seg, 64, slots=slots)
        assert layout.tiers == (slots,)
        out = attention(q, k, v, segment_ids=seg, implementation="cudnn", max_segments=64, layout=layout)
        np.testing.assert_allclose(np.asarray(out), np.asarray(attention_reference(q, k, v, segment_ids=seg)),
                                   rtol=1e-5, atol=1e-5)


def test_host_layout_is_one_static_value_planned_from_the_count_or_the_rows():
    """The host's AttentionLayout: from the data pipeline's document count, else from segment ids that hold every
    row, else none (the device picks); equal layouts are one value (one compile), and its device arrays are those
    of `packed_layout` fixed at its slot count."""
    from types import SimpleNamespace

    seg_many = _segments(2, 64, [[4] * 12, [64]])  # 13 segments counting the padding
    planner = attn_lib.LayoutPlanner()
    assert planner.plan(13) == planner.plan(segment_ids=np.asarray(seg_many)) == attn_lib.AttentionLayout(64)
    assert planner.plan(3, np.asarray(seg_many)) == attn_lib.AttentionLayout(8)  # the pipeline's count first
    assert planner.plan() is None and planner.usual() == attn_lib.AttentionLayout(8)
    assert attn_lib.LayoutPlanner((4, 8, 16, 32)).plan(13) == attn_lib.AttentionLayout(16)
    assert attn_lib.LayoutPlanner().plan(65).slots == attn_lib.MASKED
    assert len({planner.plan(2), planner.plan(7), attn_lib.AttentionLayout(8)}) == 1  # hashable, one step
    fixed, direct = attn_lib.packed_layout_for(seg_many, planner.plan(13)), attn_lib.packed_layout(seg_many, slots=64)
    assert fixed.tiers == (64,) and fixed.counts is None
    assert [o.tolist() for o in fixed.offsets] == [o.tolist() for o in direct.offsets]
    assert attn_lib.packed_layout_for(seg_many, None).tiers == (8, 64)  # no host layout: the device's tiers
    cpu = SimpleNamespace(attn_implementation="xla", dtype="bfloat16", attn_slot_sizes=None)
    assert attn_lib.layout_planner(cpu) is None  # attention that takes no layout gets none


def test_cudnn_refused_without_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="not available on this device"):
        resolve_attn_implementation("cudnn")
    assert resolve_attn_implementation("auto") == "xla"


def test_auto_picks_cudnn_only_for_half_precision(monkeypatch):
    monkeypatch.setattr(attn_lib, "_on_nvidia_gpu", lambda: True)
    assert resolve_attn_implementation("auto", jnp.bfloat16) == "cudnn"
    assert resolve_attn_implementation("auto", "float32") == "xla"  # cuDNN has no fp32 attention
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        resolve_attn_implementation("cudnn", jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("host_layout", [False, True, "fine"], ids=["device_tier", "host_tier", "host_fine_sizes"])
@pytest.mark.parametrize("d,H,K", [(128, 16, 8), (256, 8, 2)])
@pytest.mark.parametrize("layout", ["none", "packed", "many", "overflow"])
def test_cudnn_matches_reference_on_gpu(d, H, K, layout, host_layout):
    sizes = (4, 8, 16, 32) if host_layout == "fine" else None  # the experiment's: 4 slots for "packed", 16 for "many"
    B, T = 2, 512
    q, k, v = _inputs(B, T, H, K, d, jnp.bfloat16, seed=d + H)
    seg = None
    max_segments = 8 if layout == "overflow" else 64
    if layout == "packed":  # the small packed layout (8 slots)
        seg = _segments(B, T, [[100, 250, 150], [512]])
    else:  # 13 documents: the 64-slot layout ("many"), or the masked fallback past max_segments ("overflow")
        seg = None if layout == "none" else _segments(B, T, [[40] * 12 + [32], [256, 256]])

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

    slots = attn_lib.document_slots(np.asarray(seg), max_segments, sizes) if host_layout and seg is not None else None
    fixed = None if slots is None else attn_lib.packed_layout(seg, max_segments, slots=slots)
    fast = lambda q, k, v: attention(q, k, v, segment_ids=seg, implementation="cudnn",  # noqa: E731
                                     max_segments=max_segments, layout=fixed)
    ref = lambda q, k, v: attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                              segment_ids=seg)
    out_fast, out_ref = jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v)
    err = float(jnp.linalg.norm(out_fast.astype(jnp.float32) - out_ref) / jnp.linalg.norm(out_ref))
    assert err < 2e-2, err
    g_fast = jax.jit(jax.grad(lambda *a: loss(fast, *a), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_fast, g_ref):
        rel = float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        assert rel < 3e-2, rel
    again = jax.jit(fast)(q, k, v)
    assert bool(jnp.array_equal(again, out_fast))


# Rows of the first batches of configs/qwen3_30b_a3b_ep8.yaml (docstrings corpus packed to 8192 tokens): every
# document slot of the small layout in use, and a row that is one whole document.
TRAINING_ROWS = {
    "seven_and_one": [[1274, 1273, 1270, 1270, 1270, 1269, 566], [8192]],
    "seven_and_five": [[1282, 1282, 1281, 1281, 1281, 1281, 504], [1820, 1819, 1816, 1815, 922]],
    "one_and_one": [[8192], [8192]],
}


@pytest.mark.gpu
@pytest.mark.parametrize("rows", sorted(TRAINING_ROWS))
def test_cudnn_packed_at_training_length_on_gpu(rows):
    """Qwen3-30B-A3B attention shapes at 8192 tokens with the recipe's document layouts: finite and close to the
    fp32 reference, forward and gradients, per row."""
    B, T, H, K, d = 2, 8192, 32, 4, 128
    q, k, v = _inputs(B, T, H, K, d, jnp.bfloat16, seed=7)
    seg = _segments(B, T, TRAINING_ROWS[rows])
    w = jax.random.normal(jax.random.key(8), (B, T, H, d), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    fast = lambda q, k, v: attention(q, k, v, segment_ids=seg, implementation="cudnn")
    ref = lambda q, k, v: attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                              segment_ids=seg)
    outs = {}
    for name, fn in (("cudnn", fast), ("reference", ref)):
        outs[name] = jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
    (_, g_fast), (_, g_ref) = outs["cudnn"], outs["reference"]
    for name, a, b in zip("qkv", g_fast, g_ref):
        a = a.astype(jnp.float32)
        for r in range(B):
            assert bool(jnp.all(jnp.isfinite(a[r]))), f"d{name} row {r}: non-finite"
            rel = float(jnp.linalg.norm(a[r] - b[r]) / jnp.linalg.norm(b[r]))
            assert rel < 3e-2, (name, r, rel)


def _attention_from_layout(q, k, v, offsets, lengths, scale):
    """A jnp stand-in for cuDNN's packed call that sees documents only through the offsets and lengths it is given."""
    T = q.shape[1]
    t = jnp.arange(T)
    inside = (t[None, None] >= offsets[:, :-1, None]) & (t[None, None] < (offsets[:, :-1] + lengths)[..., None])
    doc = jnp.where(jnp.any(inside, axis=1), jnp.argmax(inside, axis=1) + 1, 0)  # [B, T], 0 = no document
    return attention_reference(q, k, v, segment_ids=doc, scale=scale)


# Rows of 64 tokens, different on every device: at most 8 documents (small tier), up to 13 (the 16-slot tier),
# and one row past 16 (the masked fallback for the whole batch).
LAYOUT_ROWS = {
    "small": [[64], [10, 54], [8] * 8, [30, 30, 4], [1] * 7 + [57], [64], [20, 20, 24], [2] * 5 + [54]],
    "large": [[64], [10, 54], [5] * 12 + [4], [30, 30, 4], [3] * 10 + [34], [64], [20, 20, 24], [2] * 9 + [46]],
    "overflow": [[64], [10, 54], [5] * 12 + [4], [30, 30, 4], [1] * 64, [64], [20, 20, 24], [2] * 9 + [46]],
}


@pytest.mark.parametrize("host_layout", [False, True], ids=["device_tier", "host_tier"])
@pytest.mark.parametrize("rows", sorted(LAYOUT_ROWS))
@pytest.mark.parametrize("mesh_sizes", [dict(data_parallel_shard_size=8),
                                        dict(data_parallel_shard_size=4, tensor_parallel_size=2)])
def test_packed_cudnn_path_gives_each_device_its_own_rows_layout(monkeypatch, mesh_sizes, rows, host_layout):
    """The cuDNN path's wiring on 8 CPU devices: rows split over the batch axes (heads over `tensor`), and each
    device's kernel call gets the offsets and lengths of its own rows: with the tier picked per device, or fixed
    for the whole batch on the host (`document_slots`)."""
    from xorl_jax.parallel.mesh import build_mesh
    from xorl_jax.parallel.rules import batch_sharding, rules_for, use_mesh

    monkeypatch.setattr(attn_lib, "resolve_attn_implementation", lambda name, dtype=None: "cudnn")
    monkeypatch.setattr(attn_cudnn, "_cudnn_packed", _attention_from_layout)

    def masked_standin(q, k, v, mask=None, scale=None, is_causal=True, implementation=None):
        same = mask[:, 0]  # [B, T, T] same-document mask
        B, T = same.shape[:2]
        seg = jnp.cumsum(jnp.concatenate([jnp.ones((B, 1), jnp.int32),
                                          (~same[:, 1:, :-1].diagonal(axis1=1, axis2=2)).astype(jnp.int32)], 1), 1)
        return attention_reference(q, k, v, segment_ids=seg, scale=scale)

    monkeypatch.setattr(attn_lib.jax.nn, "dot_product_attention", masked_standin)
    B, T, H, K, d = 8, 64, 4, 2, 16
    q, k, v = _inputs(B, T, H, K, d, jnp.float32, seed=5)
    seg = _segments(B, T, LAYOUT_ROWS[rows])
    ref = attention_reference(q, k, v, segment_ids=seg)
    mesh = build_mesh(**mesh_sizes)
    tp = mesh_sizes.get("tensor_parallel_size", 1)
    rules = rules_for(type("T", (), {"tensor_parallel_size": tp, "expert_parallel_size": 1})())
    put = lambda a: jax.device_put(a, batch_sharding(mesh))  # noqa: E731
    slots = attn_lib.document_slots(np.asarray(seg), 16) if host_layout else None

    def attend(q, k, v, s):
        layout = attn_lib.packed_layout(s, 16, slots=slots)
        return attention(q, k, v, segment_ids=s, implementation="cudnn", max_segments=16, layout=layout)

    with use_mesh(mesh, rules):
        out = jax.jit(attend)(put(q), put(k), put(v), put(seg))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
