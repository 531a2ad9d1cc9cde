"""Context parallelism on 8 fake CPU devices equals one device: Ulysses, ring and both, with FSDP (and EP for MoE),
through the training loss (chunked CE over global valid tokens, the model's hidden states in ring order), with
packed documents crossing every shard boundary and a one-document row; plus the ring-attention kernel alone."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_parallel import assert_same_loss_and_grads
from xorl_jax.kernels.ring_attention import ring_attention, ring_attention_reference
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeForCausalLM
from xorl_jax.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
from xorl_jax.parallel import context as cx
from xorl_jax.parallel import rules as R
from xorl_jax.parallel.mesh import MeshError, build_mesh, check_row_length, resolve_sizes
from xorl_jax.train_step import IGNORE_INDEX, LossConfig, forward_loss

V, B, T = 128, 4, 32
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
QWEN3_5 = dict(layer_types=("linear_attention", "full_attention"), linear_key_head_dim=16, linear_value_head_dim=16,
               linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.01)
FAMILIES = {
    "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                     intermediate_size=96, **ATTN)),
    "qwen3_moe": lambda: (Qwen3MoeForCausalLM, Qwen3Config(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                            intermediate_size=96, norm_topk_prob=True, **ATTN, **MOE)),
    "qwen3_5": lambda: (Qwen3_5ForCausalLM, Qwen3_5Config(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                          intermediate_size=96, **ATTN, **QWEN3_5)),
    "qwen3_5_moe": lambda: (Qwen3_5MoeForCausalLM, Qwen3_5Config(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, intermediate_size=96, shared_expert_intermediate_size=48,
        **ATTN, **QWEN3_5, **MOE)),
}
MESHES = {  # 8 devices = shard x ring x ulysses (xorl's counting: context ranks on top of the FSDP ranks)
    "ulysses2_tp2_fsdp2": dict(data_parallel_shard_size=2, tensor_parallel_size=2, ulysses_parallel_size=2),
    "ring4_fsdp2": dict(data_parallel_shard_size=2, ringattn_parallel_size=4),
    "ring2_ulysses2_fsdp2": dict(data_parallel_shard_size=2, ringattn_parallel_size=2, ulysses_parallel_size=2),
    "ring2_ulysses2_ep2": dict(data_parallel_shard_size=2, expert_parallel_size=2, ringattn_parallel_size=2,
                               ulysses_parallel_size=2),
    # xorl's counting of expert ranks: out of the context ranks too (its qwen3_30b_a3b_cp1_sp8: ulysses 8, ep 8)
    "ulysses4_ep8": dict(data_parallel_shard_size=2, expert_parallel_size=8, ulysses_parallel_size=4),
}


def packed_batch(seed=0):
    """Row 0: documents of random lengths crossing shard boundaries, padding at the end; row 1: one document; row 2:
    a document starting at every multiple of T/8 (every shard boundary of the layouts tested); row 3: documents of
    one and two tokens. Positions restart per document; labels are the next token of the same document."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    t, doc = 0, 1
    while t < T - 3:
        n = int(min(T - 3 - t, rng.choice([1, 3, 7, 11, 13])))
        seg[0, t:t + n], t, doc = doc, t + n, doc + 1
    seg[1] = 1
    seg[2] = np.arange(T) // (T // 8) + 1
    seg[3] = np.arange(T) * 2 // 3 + 1
    starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for i in range(T):
            pos[b, i] = 0 if starts[b, i] else pos[b, i - 1] + 1
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    labels = np.where(np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((B, 1), bool)], axis=1) & (seg > 0),
                      np.roll(ids, -1, axis=1), IGNORE_INDEX).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in dict(input_ids=ids, labels=labels, positions=pos, segment_ids=seg).items()}


def loss_and_grads(model, batch, mesh=None, rules=None):
    graphdef, state = nnx.split(model)
    cfg = LossConfig(ce_chunk_size=16, compute_dtype=jnp.float32)

    def objective(s, micro):
        loss_sum, n_valid, aux = forward_loss(graphdef, s, micro, cfg)
        return loss_sum / n_valid + 0.01 * aux

    f = jax.jit(jax.value_and_grad(objective))
    if mesh is None:
        return f(state, batch)
    with R.use_mesh(mesh, rules):
        state = jax.device_put(state, R.param_shardings(model, mesh, rules))
        batch = jax.device_put(batch, R.batch_sharding(mesh))
        return f(state, batch)


# Every size once across the families (Ulysses 2 and 4, ring 2 and 4, both), each with FSDP, one with TP, the MoE
# ones with EP (over the FSDP group and, as xorl counts expert ranks, over the Ulysses ranks); one reference each.
CASES = {
    "qwen3": ("ring2_ulysses2_fsdp2", "ulysses2_tp2_fsdp2"),
    "qwen3_moe": ("ulysses4_ep8",),
    "qwen3_5": ("ring4_fsdp2",),
    "qwen3_5_moe": ("ring2_ulysses2_ep2",),
}


@pytest.mark.parametrize("family", CASES)
def test_context_parallel_loss_and_grads_equal_one_device(family):
    cls, cfg = FAMILIES[family]()
    model = cls(cfg, ModelOptions(moe_implementation="eager", gdn_implementation="chunked"), rngs=nnx.Rngs(0))
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(model, batch)
    for mesh_name in CASES[family]:
        sizes = MESHES[mesh_name]
        mesh = build_mesh(**sizes, model_config=cfg)
        rules = R.rules_for(SimpleNamespace(expert_parallel_size=sizes.get("expert_parallel_size", 1)), mesh)
        loss, grads = loss_and_grads(model, batch, mesh, rules)
        assert_same_loss_and_grads(loss, grads, ref_loss, ref_grads)


def test_ring_attention_kernel_equals_one_device(ring=2, ulysses=2):
    """The kernel alone, forward and gradients, GQA with packed documents, in ring order on a (ring, ulysses) mesh."""
    mesh = build_mesh(data_parallel_shard_size=8 // (ring * ulysses), ringattn_parallel_size=ring,
                      ulysses_parallel_size=ulysses)
    seg = packed_batch()["segment_ids"]
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, 4, 8))
    k, v = jax.random.normal(ks[1], (B, T, 2, 8)), jax.random.normal(ks[2], (B, T, 2, 8))
    index = jnp.arange(T, dtype=jnp.int32)
    ref = lambda q, k, v: ring_attention_reference(q, k, v, seg, index)  # noqa: E731

    def split(q, k, v):
        def local(q, k, v, s):
            if ulysses > 1:
                q, k, v, s = cx.seq_to_heads(q), cx.seq_to_heads(k), cx.seq_to_heads(v), cx.gather_seq(s)
            out = ring_attention(q, k, v, s, cx.ring_token_index(q.shape[1], ring), axis=cx.RING, ring=ring)
            return cx.heads_to_seq(out) if ulysses > 1 else out

        names = ("batch", "seq", None, None)
        with R.use_mesh(mesh):
            out = cx.context_shard_map(local, (names, names, names, ("batch", "seq")), names)(
                *(cx.to_ring_order(a, ring=ring) for a in (q, k, v, seg)))
        return cx.from_ring_order(out, ring=ring)

    def loss(f):
        return lambda *a: jnp.sum(f(*a) * jnp.cos(jnp.arange(8.0)))

    np.testing.assert_allclose(np.asarray(jax.jit(split)(q, k, v)), np.asarray(ref(q, k, v)), atol=2e-5)
    g = jax.jit(jax.grad(loss(split), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_mesh_counts_context_ranks_on_top_of_fsdp():
    assert resolve_sizes(8, data_parallel_shard_size=-1, ringattn_parallel_size=2, ulysses_parallel_size=2) == \
        {"data": 1, "fsdp": 2, "ring": 2, "expert": 1, "ulysses": 2, "tensor": 1}
    with pytest.raises(MeshError, match="ringattn_parallel_size 3 x train.ulysses_parallel_size 1 = 3"):
        resolve_sizes(8, ringattn_parallel_size=3)
    with pytest.raises(MeshError, match=r"\(8 / 2 context-parallel ranks\)"):
        resolve_sizes(8, data_parallel_shard_size=8, ulysses_parallel_size=2)
    # expert ranks beyond the FSDP group come out of the Ulysses ranks, then the ring ranks
    assert resolve_sizes(8, data_parallel_shard_size=1, expert_parallel_size=8, ulysses_parallel_size=8)["expert"] == 1
    sizes = resolve_sizes(8, data_parallel_shard_size=2, expert_parallel_size=8, ringattn_parallel_size=2,
                          ulysses_parallel_size=2)
    assert (sizes["fsdp"], sizes["expert"]) == (1, 2)
    mesh = build_mesh(data_parallel_shard_size=2, expert_parallel_size=8, ringattn_parallel_size=2,
                      ulysses_parallel_size=2)
    assert R.rules_for(SimpleNamespace(expert_parallel_size=8), mesh).params["expert"] == ("expert", "ulysses", "ring")
    with pytest.raises(MeshError, match="expert_parallel_size 3 must divide"):
        resolve_sizes(8, data_parallel_shard_size=2, expert_parallel_size=3, ulysses_parallel_size=4)


def test_ring_order_round_trips():
    x = jnp.arange(2 * 16).reshape(2, 16)
    assert cx.ring_chunk_order(4).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
    np.testing.assert_array_equal(cx.from_ring_order(cx.to_ring_order(x, ring=4), ring=4), x)
    assert cx.ulysses_heads_problem(4, 2, 1, 4) is None  # KV heads repeated
    assert "3 attention heads" in cx.ulysses_heads_problem(3, 1, 1, 2)


def test_block_attention_in_query_chunks_equals_one_pass():
    """Long ring blocks run 1024 queries at a time (rematerialised): the same values and gradients as one pass."""
    from xorl_jax.kernels.ring_attention import _block_attention, block_attention

    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(ks[0], (2, 64, 4, 8)), jax.random.normal(ks[1], (2, 48, 2, 8)),
               jax.random.normal(ks[2], (2, 48, 2, 8)))
    mask = jax.random.bernoulli(ks[3], 0.5, (2, 64, 48)).at[:, :8].set(False)  # rows that see nothing

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            return jnp.sum(o * jnp.sin(jnp.arange(8.0))) + jnp.sum(jnp.tanh(lse))
        return jax.value_and_grad(f, argnums=(0, 1, 2))

    got = jax.jit(loss(lambda *a: block_attention(*a, mask, 0.3, query_chunk=16)))(q, k, v)
    want = jax.jit(loss(lambda *a: _block_attention(*a, mask, 0.3)))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_sizes_that_cannot_split_are_one_line_errors():
    _, cfg = FAMILIES["qwen3_5"]()  # 4 query heads, 2 KV heads, 4 DeltaNet value heads
    with pytest.raises(MeshError, match="4 attention heads per tensor rank are not divisible by "
                                        "ulysses_parallel_size 8.*ringattn_parallel_size instead"):
        build_mesh(data_parallel_shard_size=1, ulysses_parallel_size=8, model_config=cfg)
    with pytest.raises(MeshError, match="linear_num_value_heads 2 is not divisible by ulysses_parallel_size 4"):
        build_mesh(data_parallel_shard_size=2, ulysses_parallel_size=4,
                   model_config=FAMILIES["qwen3_5"]()[1].__class__(**{**vars(cfg), "linear_num_value_heads": 2,
                                                                       "linear_num_key_heads": 2}))
    build_mesh(data_parallel_shard_size=2, ulysses_parallel_size=4, model_config=cfg)  # KV heads repeated: fine
    mesh = build_mesh(data_parallel_shard_size=2, ringattn_parallel_size=2, ulysses_parallel_size=2)
    with pytest.raises(MeshError, match="rows of 4100 tokens do not split into 8 equal pieces"):
        check_row_length(4100, mesh)
    check_row_length(4096, mesh)
