"""Sharded training math equals one device: FSDP, TP x FSDP, EP x FSDP and EP on tiny Qwen3 / Qwen3-MoE /
Qwen3.5-MoE models (fp32, 8 fake CPU devices), including skewed routing; golden parameter shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from xorl_jax.models.common import ModelOptions
from xorl_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeForCausalLM
from xorl_jax.models.qwen3_5 import Qwen3_5Config, Qwen3_5MoeForCausalLM
from xorl_jax.parallel import rules as R
from xorl_jax.parallel.mesh import build_mesh

V, B, T = 128, 8, 16
MESHES = {
    "fsdp8": dict(data_parallel_shard_size=8),
    "tp2_fsdp4": dict(data_parallel_shard_size=4, tensor_parallel_size=2),
    "ep4_fsdp2": dict(data_parallel_shard_size=8, expert_parallel_size=4),
    "ep8": dict(data_parallel_shard_size=8, expert_parallel_size=8),
}


def qwen3_dense():
    return Qwen3ForCausalLM, Qwen3Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=96)


def qwen3_moe():
    return Qwen3MoeForCausalLM, Qwen3Config(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        router_aux_loss_coef=0.01)


def qwen3_5_moe():
    return Qwen3_5MoeForCausalLM, Qwen3_5Config(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=("linear_attention", "full_attention"), linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, router_aux_loss_coef=0.01)


FAMILIES = {"qwen3": qwen3_dense, "qwen3_moe": qwen3_moe, "qwen3_5_moe": qwen3_5_moe}


def make_model(family, skew=False, scan_layers=True):
    cls, cfg = FAMILIES[family]()
    model = cls(cfg, ModelOptions(moe_implementation="eager", scan_layers=scan_layers), rngs=nnx.Rngs(0))
    if skew:  # routers only see experts 0 and 1 (expert rank 0): the other ranks get ties or nothing
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if path[-1] == "router":
                w = np.zeros(var.shape, np.float32)
                w[..., :2] = 3.0 * np.random.default_rng(0).standard_normal(w[..., :2].shape)
                var.set_value(jnp.asarray(w))
    return cfg, model


def loss_fn(graphdef, state, ids, aux_coef):
    out = nnx.merge(graphdef, state)(ids)
    logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    return ce + aux_coef * out.aux_loss


def loss_and_grads(model, ids, aux_coef, mesh=None):
    graphdef, state = nnx.split(model)
    f = jax.jit(jax.value_and_grad(lambda s, i: loss_fn(graphdef, s, i, aux_coef)))
    if mesh is None:
        return f(state, ids)
    with R.use_mesh(mesh):
        state = jax.device_put(state, R.param_shardings(model, mesh))
        ids = jax.device_put(ids, R.batch_sharding(mesh))
        loss, grads = f(state, ids)
    return loss, grads


CASES = [(f, m) for f in FAMILIES for m in MESHES if f != "qwen3" or not m.startswith("ep")]


# Unrolled layers (model.scan_layers=false) slice the stacked parameters per layer with lax.split while they are
# sharded over fsdp / tensor / expert, and concatenate their gradients back.
UNROLLED_CASES = [("qwen3", "tp2_fsdp4", False), ("qwen3_5_moe", "ep4_fsdp2", False)]


@pytest.mark.parametrize("family,mesh_name,scan_layers", [c + (True,) for c in CASES] + UNROLLED_CASES)
def test_sharded_loss_and_grads_equal_one_device(family, mesh_name, scan_layers):
    skew = family != "qwen3"
    cfg, model = make_model(family, skew=skew, scan_layers=scan_layers)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
    aux = 0.01 if cfg.num_experts else 0.0
    ref_loss, ref_grads = loss_and_grads(model, ids, aux)
    mesh = build_mesh(**MESHES[mesh_name], model_config=cfg)
    loss, grads = loss_and_grads(model, ids, aux, mesh)
    assert_same_loss_and_grads(loss, grads, ref_loss, ref_grads)


def assert_same_loss_and_grads(loss, grads, ref_loss, ref_grads):
    """Loss to rtol 1e-5; each gradient to rtol 1e-4 with an absolute floor of 1e-5 of its largest entry (entries
    that nearly cancel), far below what a wrong exchange, a missing reduction or a dropped token changes."""
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    flat_ref = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        r = np.asarray(flat_ref[path][...])
        np.testing.assert_allclose(np.asarray(g[...]), r, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(r).max()),
                                   err_msg=".".join(map(str, path)))


def specs(model, mesh, rules=None):
    shard = R.param_shardings(model, mesh, rules)
    return {".".join(map(str, p)): s.spec for p, s in nnx.to_flat_state(shard)}


FSDP = ("fsdp", "expert")
GOLDEN = {  # preset "full", Qwen3-MoE
    "tp2_fsdp4": {
        "embed_tokens": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "layers.groups.0.self_attn.q_proj": P(None, "fsdp", "tensor", None),
        "layers.groups.0.self_attn.o_proj": P(None, "tensor", None, "fsdp"),
        "layers.groups.0.mlp.gate_up_proj": P(None, None, "fsdp", None, "tensor"),
        "layers.groups.0.mlp.down_proj": P(None, None, "tensor", "fsdp"),
        "layers.groups.0.mlp.router": P(None, "fsdp", None),
        "norm": P(None),  # norms are small: replicated
    },
    "ep4_fsdp2": {
        "embed_tokens": P(None, FSDP),
        "lm_head": P(FSDP, None),
        "layers.groups.0.self_attn.q_proj": P(None, FSDP, None, None),
        "layers.groups.0.mlp.gate_up_proj": P(None, "expert", "fsdp", None, None),
        "layers.groups.0.mlp.down_proj": P(None, "expert", None, "fsdp"),
    },
    "ep8": {
        "layers.groups.0.mlp.gate_up_proj": P(None, "expert", None, None, None),
        "layers.groups.0.mlp.down_proj": P(None, "expert", None, None),
        "layers.groups.0.self_attn.k_proj": P(None, "expert", None, None),
    },
}


@pytest.mark.parametrize("mesh_name", sorted(GOLDEN))
def test_golden_param_shardings(mesh_name):
    cfg, model = make_model("qwen3_moe")
    got = specs(model, build_mesh(**MESHES[mesh_name], model_config=cfg))
    for name, spec in GOLDEN[mesh_name].items():
        key = next((k for k in got if k == name or k.startswith(name + ".") or k.endswith("." + name)), None)
        assert key is not None, f"no parameter named {name}; have {sorted(got)[:8]}"
        assert got[key] == spec, f"{key}: {got[key]} != {spec}"


def test_presets_differ_only_in_what_they_map():
    cfg, model = make_model("qwen3_moe")
    mesh = build_mesh(data_parallel_shard_size=4, expert_parallel_size=2, tensor_parallel_size=2, model_config=cfg)
    fsdp, tp, ep = (specs(model, mesh, p) for p in ("fsdp", "tp", "ep"))
    gu = next(k for k in fsdp if k.endswith("mlp.gate_up_proj"))
    assert fsdp[gu] == P(None, None, FSDP, None, None)
    assert tp[gu] == P(None, None, FSDP, None, "tensor")
    assert ep[gu] == P(None, "expert", "fsdp", None, None)
    assert all("tensor" not in str(s) for s in fsdp.values())


def test_shard_model_places_params_and_flags_replicated():
    cfg, model = make_model("qwen3_moe")
    mesh = build_mesh(data_parallel_shard_size=8, expert_parallel_size=4, model_config=cfg)
    R.shard_model(model, mesh)
    assert model.lm_head[...].sharding.spec == P(FSDP, None) if hasattr(model, "lm_head") else True
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert var[...].sharding.mesh.shape == mesh.shape
    assert R.replicated_params(model, mesh, min_elements=1000) == []  # norms (128 elements) stay replicated
    no_embed = R.Rules(params={}, activations={}, name="empty")
    bad = R.replicated_params(model, mesh, no_embed, min_elements=1000)
    assert any("embed_tokens" in b for b in bad)
    with pytest.raises(ValueError, match="large parameters would be replicated"):
        R.check_replicated(model, mesh, no_embed, min_elements=1000)


def test_constrain_is_noop_outside_mesh_and_shards_inside():
    x = jnp.ones((8, 4, 6))
    assert R.constrain(x, ("batch", "seq", "embed")) is x
    mesh = build_mesh(data_parallel_shard_size=8)
    with R.use_mesh(mesh):
        y = jax.jit(lambda x: R.constrain(x * 2, ("batch", "seq", "embed")))(x)
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("fsdp", None, None)), 3), y.sharding
    assert R.current() is None


def test_batch_sharding_and_dp_size():
    mesh = build_mesh(data_parallel_replicate_size=2, data_parallel_shard_size=2, tensor_parallel_size=2)
    assert R.data_parallel_size(mesh) == 4
    assert R.batch_sharding(mesh, leading_axes=1).spec == P(None, ("data", "fsdp"))
