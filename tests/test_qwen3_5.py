"""HF parity for Qwen3.5 and Qwen3.5-MoE (hybrid Gated DeltaNet + gated attention) on tiny random configs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeForCausalLM

import xorl_jax
from xorl_jax.layers import gdn as gdn_layer
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.loading import iter_hf_tensors
from parity_utils import assert_logits_close, hf_logits, random_ids, randomize_norms, save_tiny

V = 96


def text_kwargs(**kw):
    base = dict(vocab_size=V, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, rms_norm_eps=1e-6, linear_conv_kernel_dim=4, linear_key_head_dim=8,
                linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                tie_word_embeddings=False)
    base.update(kw)
    return base


def dense(**kw):
    return Qwen3_5TextConfig(intermediate_size=64, **text_kwargs(**kw))


def moe(**kw):
    return Qwen3_5MoeTextConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, output_router_logits=True, **text_kwargs(**kw))


def build(cls, config, seed=0):
    torch.manual_seed(seed)
    return randomize_norms(cls(config).eval(), seed)


CASES = {
    "dense_interval4": (Qwen3_5ForCausalLM, lambda: dense(full_attention_interval=4)),
    "dense_interval2_hv_eq_hk": (Qwen3_5ForCausalLM, lambda: dense(full_attention_interval=2, linear_num_value_heads=2)),
    "dense_explicit_layer_types": (
        Qwen3_5ForCausalLM,
        lambda: dense(num_hidden_layers=3, layer_types=["full_attention", "linear_attention", "linear_attention"]),
    ),
    "moe_interval2": (Qwen3_5MoeForCausalLM, lambda: moe(full_attention_interval=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(tmp_path, case):
    cls, make = CASES[case]
    hf = build(cls, make())
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path), options=ModelOptions(gdn_implementation="chunked"))
    ids = random_ids(V, (2, 21))
    with torch.no_grad():
        ref = hf(torch.tensor(ids).long(), labels=torch.tensor(ids).long())
    out = model(jnp.asarray(ids))
    assert_logits_close(out.logits, ref.logits.numpy())
    if getattr(ref, "aux_loss", None) is not None:
        np.testing.assert_allclose(float(out.aux_loss), float(ref.aux_loss), rtol=1e-5)


def _write_wrapper_checkpoint(hf, path):
    """The multimodal wrapper layout: text weights under model.language_model, plus vision and MTP tensors."""
    path.mkdir()
    state = {}
    for k, v in hf.state_dict().items():
        state[k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k] = v.contiguous()
    state["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 3)
    state["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(path / "model.safetensors"))
    text = hf.config.to_dict()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": text,
                                                  "vision_config": {}, "tie_word_embeddings": False}))


def test_multimodal_wrapper_reads_text_config_and_skips_vision_and_mtp(tmp_path, caplog):
    hf = build(Qwen3_5MoeForCausalLM, moe(full_attention_interval=4))
    _write_wrapper_checkpoint(hf, tmp_path / "wrapped")
    with caplog.at_level("INFO"):
        model = xorl_jax.from_pretrained(str(tmp_path / "wrapped"), options=ModelOptions(gdn_implementation="chunked"))
    assert any("skipped 2 checkpoint tensors" in r.message for r in caplog.records)
    ids = random_ids(V, (1, 9))
    assert_logits_close(model(jnp.asarray(ids)).logits, hf_logits(hf, ids))


def _packed(docs, pad=2):
    lengths = [d.shape[1] for d in docs]
    T = sum(lengths) + pad
    ids, seg, pos = (np.zeros((1, T), np.int32) for _ in range(3))
    start = 0
    for i, d in enumerate(docs):
        n = d.shape[1]
        ids[0, start:start + n], seg[0, start:start + n], pos[0, start:start + n] = d[0], i + 1, np.arange(n)
        start += n
    return ids, seg, pos


@pytest.mark.parametrize("case", ["dense_interval2_hv_eq_hk", "moe_interval2"])
def test_packed_documents_equal_single_documents(tmp_path, case):
    """Stricter than HF: the conv window and the DeltaNet state restart at every document (HF leaks across)."""
    cls, make = CASES[case]
    hf = build(cls, make())
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path), options=ModelOptions(gdn_implementation="chunked"))
    docs = [random_ids(V, (1, n), seed=i) for i, n in enumerate([6, 11, 5])]
    ids, seg, pos = _packed(docs)
    packed = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)).logits)
    start = 0
    for d in docs:
        n = d.shape[1]
        assert_logits_close(packed[:, start:start + n], hf_logits(hf, d))
        start += n


def test_packing_fails_without_conv_reset(tmp_path, monkeypatch):
    """Show the packed-document test has teeth: a conv that ignores document starts breaks it."""
    cls, make = CASES["dense_interval2_hv_eq_hk"]
    hf = build(cls, make())
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path), options=ModelOptions(gdn_implementation="chunked"))
    docs = [random_ids(V, (1, n), seed=i) for i, n in enumerate([6, 7])]
    ids, seg, pos = _packed(docs, pad=0)
    real_conv = gdn_layer.causal_conv1d_silu
    monkeypatch.setattr(gdn_layer, "causal_conv1d_silu", lambda x, w, segment_ids=None: real_conv(x, w, None))
    packed = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)).logits)
    assert_logits_close(packed[:, :6], hf_logits(hf, docs[0]))  # the first document cannot leak
    with pytest.raises(AssertionError):
        assert_logits_close(packed[:, 6:], hf_logits(hf, docs[1]))


def test_export_round_trip_is_exact(tmp_path):
    cls, make = CASES["moe_interval2"]
    hf = build(cls, make())
    model = xorl_jax.from_pretrained(save_tiny(hf, tmp_path), options=ModelOptions(gdn_implementation="chunked"))
    ours = dict(iter_hf_tensors(model, type(model).hf_key_map(model.config, expert_layout="fused")))
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
