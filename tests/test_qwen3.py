"""HF parity for Qwen3 (dense) and Qwen3-MoE on tiny random configs (fp32, CPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import xorl_jax
from xorl_jax.checkpoint.hf import CheckpointError
from xorl_jax.layers import attention as attention_layer
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.loading import iter_hf_tensors, param_paths
from parity_utils import assert_logits_close, hf_logits, random_ids, randomize_norms, save_tiny

V = 128


def dense_config(**kw):
    base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, intermediate_size=96, rope_theta=1e6, tie_word_embeddings=False)
    base.update(kw)
    return Qwen3Config(**base)


def moe_config(**kw):
    base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                norm_topk_prob=True, rope_theta=1e6, output_router_logits=True)
    base.update(kw)
    return Qwen3MoeConfig(**base)


def build(hf_cls, config, seed=0):
    torch.manual_seed(seed)
    return randomize_norms(hf_cls(config).eval(), seed)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("head_dim", [16, 32])  # 16 == hidden/heads, 32 != hidden/heads
def test_dense_logits_match_hf(tmp_path, tied, head_dim):
    hf = build(Qwen3ForCausalLM, dense_config(tie_word_embeddings=tied, head_dim=head_dim))
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path))
    ids = random_ids(V, (2, 19))
    assert_logits_close(model(jnp.asarray(ids)).logits, hf_logits(hf, ids))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("impl", ["eager", "native"])
def test_moe_logits_and_aux_loss_match_hf(tmp_path, norm_topk_prob, impl):
    hf = build(Qwen3MoeForCausalLM, moe_config(norm_topk_prob=norm_topk_prob, mlp_only_layers=[1]))
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path), options=ModelOptions(moe_implementation=impl))
    ids = random_ids(V, (2, 19))
    with torch.no_grad():
        ref = hf(torch.tensor(ids).long(), labels=torch.tensor(ids).long())
    out = model(jnp.asarray(ids))
    assert_logits_close(out.logits, ref.logits.numpy())
    np.testing.assert_allclose(float(out.aux_loss), float(ref.aux_loss), rtol=1e-5)


def test_moe_fused_expert_layout_loads(tmp_path):
    """transformers 5.x in-memory layout (mlp.experts.gate_up_proj [E,2F,D]) as well as hub per-expert keys."""
    hf = build(Qwen3MoeForCausalLM, moe_config(decoder_sparse_step=2, num_hidden_layers=4))
    path = tmp_path / "fused"
    path.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    model = xorl_jax.from_pretrained(str(path))
    ids = random_ids(V, (1, 11))
    assert_logits_close(model(jnp.asarray(ids)).logits, hf_logits(hf, ids))


def test_norm_topk_prob_is_honoured(tmp_path):
    """The renormalisation flag changes the logits, so a model that ignored it would fail the parity test above."""
    hf = build(Qwen3MoeForCausalLM, moe_config(norm_topk_prob=True))
    path = save_tiny(hf, tmp_path)
    model = xorl_jax.from_pretrained(path)
    ids = random_ids(V, (1, 11))
    ref = hf_logits(hf, ids)
    assert_logits_close(model(jnp.asarray(ids)).logits, ref)
    cfg = json.loads(open(f"{path}/config.json").read())
    cfg["norm_topk_prob"] = False
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    wrong = xorl_jax.from_pretrained(path)
    with pytest.raises(AssertionError):
        assert_logits_close(wrong(jnp.asarray(ids)).logits, ref)


def test_rope_before_norm_would_fail_parity(tmp_path, monkeypatch):
    hf = build(Qwen3ForCausalLM, dense_config())
    path = save_tiny(hf, tmp_path)
    ids = random_ids(V, (1, 13))
    ref = hf_logits(hf, ids)
    real_rope = attention_layer.apply_rope

    class RopeFirst:  # rope applied to the raw projections; the norm then sees rotated vectors
        def __init__(self):
            self.calls = 0

        def __call__(self, x, cos, sin):
            return real_rope(x, cos, sin)

    orig_call = attention_layer.Attention.__call__

    def swapped(self, x_BTD, cos, sin, segment_ids=None, layout=None):
        qn, kn = self.q_norm, self.k_norm
        self.q_norm = lambda q: qn(real_rope(q, cos, sin))
        self.k_norm = lambda k: kn(real_rope(k, cos, sin))
        monkeypatch.setattr(attention_layer, "apply_rope", lambda x, c, s: x)
        try:
            return orig_call(self, x_BTD, cos, sin, segment_ids, layout)
        finally:
            self.q_norm, self.k_norm = qn, kn
            monkeypatch.setattr(attention_layer, "apply_rope", real_rope)

    model = xorl_jax.from_pretrained(path, options=ModelOptions(attn_implementation="xla"))
    assert_logits_close(model(jnp.asarray(ids)).logits, ref)
    monkeypatch.setattr(attention_layer.Attention, "__call__", swapped)
    with pytest.raises(AssertionError):
        assert_logits_close(model(jnp.asarray(ids)).logits, ref)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_packed_documents_equal_single_documents(tmp_path, family):
    hf = build(Qwen3ForCausalLM, dense_config()) if family == "dense" else build(Qwen3MoeForCausalLM, moe_config())
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path))
    lengths = [5, 9, 4]
    docs = [random_ids(V, (1, n), seed=i) for i, n in enumerate(lengths)]
    T = sum(lengths) + 2  # two padding tokens at the end
    ids = np.zeros((1, T), np.int32)
    seg = np.zeros((1, T), np.int32)
    pos = np.zeros((1, T), np.int32)
    start = 0
    for i, (doc, n) in enumerate(zip(docs, lengths)):
        ids[0, start:start + n] = doc[0]
        seg[0, start:start + n] = i + 1
        pos[0, start:start + n] = np.arange(n)
        start += n
    packed = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)).logits)
    start = 0
    for doc, n in zip(docs, lengths):
        alone = hf_logits(hf, doc)
        assert_logits_close(packed[:, start:start + n], alone)
        start += n


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_gradients_match_torch(tmp_path, family):
    if family == "dense":
        hf = build(Qwen3ForCausalLM, dense_config(num_hidden_layers=2))
    else:
        hf = build(Qwen3MoeForCausalLM, moe_config(num_hidden_layers=2, output_router_logits=False))
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path), options=ModelOptions(moe_implementation="native"))
    ids = random_ids(V, (2, 12))
    labels = np.roll(ids, -1, axis=1)

    logits = hf(torch.tensor(ids).long()).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(labels).reshape(-1).long())
    loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}

    def loss_fn(m):
        lg = m(jnp.asarray(ids)).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), jnp.asarray(labels)[..., None], -1))

    grads = nnx.grad(loss_fn)(model)
    nnx.update(model, grads)  # reuse the export key map to name our gradients as HF tensors
    ours = dict(iter_hf_tensors(model, type(model).hf_key_map(model.config, expert_layout="fused")))
    checked = 0
    for key in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.1.self_attn.k_norm.weight", "model.layers.1.mlp.down_proj.weight",
                "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj", "lm_head.weight"]:
        if key not in torch_grads:
            continue
        ref, got = torch_grads[key], ours[key]
        np.testing.assert_allclose(got, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=1e-3, err_msg=key)
        checked += 1
    assert checked >= 4


def test_export_round_trip_is_exact(tmp_path):
    hf = build(Qwen3MoeForCausalLM, moe_config(mlp_only_layers=[2]))
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path))
    ours = dict(iter_hf_tensors(model, type(model).hf_key_map(model.config, expert_layout="fused")))
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    hf = build(Qwen3ForCausalLM, dense_config())
    path = save_tiny(hf, tmp_path)
    cfg = json.loads(open(f"{path}/config.json").read())
    cfg["intermediate_size"] = 80
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp.*gate_proj.*expected"):
        xorl_jax.from_pretrained(path)
    cfg["intermediate_size"] = 96
    cfg["model_type"] = "llama"
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        xorl_jax.from_pretrained(path)
    cfg["model_type"] = "qwen3"
    cfg["num_hidden_layers"] = 4
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.3.*missing"):
        xorl_jax.from_pretrained(path)
    cfg["num_hidden_layers"] = 2
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not know.*model.layers.2"):
        xorl_jax.from_pretrained(path)
    with pytest.raises(CheckpointError, match="config.json"):
        xorl_jax.from_pretrained(str(tmp_path / "nowhere"))


def test_scan_stacks_layers_with_layers_axis(tmp_path):
    hf = build(Qwen3ForCausalLM, dense_config(num_hidden_layers=4))
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path))
    params = param_paths(model)
    q = params[("layers", "groups", 0, "self_attn", "q_proj")]
    assert q.shape == (4, 64, 4, 32)
    assert q.get_metadata()["axes"] == ("layers", "embed", "heads", "head_dim")
    assert all("axes" in v.get_metadata() and len(v.get_metadata()["axes"]) == v.ndim for v in params.values())
