"""LoRA (xorl_jax/lora.py): targets by HF name, step 0 equals the base model, only the adapters train (base frozen
bitwise, optimizer state only for adapters), merged export equals W + (alpha/r) A B, PEFT adapters load in HF peft
with our logits, checkpoints resume."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xorl_jax import lora as L
from xorl_jax.checkpoint.orbax import read_hf_config
from xorl_jax.config import ConfigError, LoraConfig, load_config
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.loading import build_config
from xorl_jax.optim import params_with_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
QWEN3_5_MOE_DIR = DEMO_DIR + "_qwen3_5_moe"
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 96, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "float32",
}


def build(hf_config, seed=0):
    cls, mc = build_config(hf_config)
    return nnx.split(cls(mc, ModelOptions(), rngs=nnx.Rngs(seed)))


def randomize_b(lora, seed=1, scale=0.05):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [jax.random.normal(k, x.shape, x.dtype) * scale if "lora_B" in jax.tree_util.keystr(p) else x
           for k, (p, x) in zip(keys, leaves)]
    return jax.tree.unflatten(jax.tree.structure(lora), out)


def flat(params):
    return {n: np.asarray(x) for n, x, _ in params_with_path(params)}


def abstract_params(hf_config):
    cls, mc = build_config(hf_config)
    return nnx.state(nnx.eval_shape(lambda: cls(mc, ModelOptions(), rngs=nnx.Rngs(0))), nnx.Param)


# Every kind of name: fused (qkv_proj, in_proj_ba, shared_expert.gate_up_proj, the experts' whole gate_up tensor),
# split (xorl's linear-attention q/v rows of in_proj_qkv, gate/up halves), aliases (g_proj), MoE experts by module
# name (one pair per expert), two adapters on one weight (experts' gate_proj + the whole-tensor pair).
ALL_QWEN3_5 = LoraConfig(
    enable_lora=True, lora_rank=4, lora_alpha=8.0,
    lora_target_modules=["qkv_proj", "o_proj", "linear_attn.q_proj", "linear_attn.v_proj", "in_proj_ba", "g_proj",
                         "gate_proj", "up_proj", "down_proj", "shared_expert.gate_up_proj"],
    lora_target_parameters=["mlp.experts.gate_up_proj"])
XORL_QWEN3_5_DEFAULT = ["q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_target_names_map_onto_our_parameters():
    """xorl's, PEFT's and Axolotl's names on the Qwen3.5-MoE: which adapters, on which parameters, which shapes."""
    params = abstract_params(read_hf_config(QWEN3_5_MOE_DIR))
    targets = L.lora_targets(params, LoraConfig(enable_lora=True, lora_target_modules=XORL_QWEN3_5_DEFAULT))
    assert {t.hf_name for t in targets} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",  # full attention
        "linear_attn.q_proj", "linear_attn.k_proj", "linear_attn.v_proj",  # rows of in_proj_qkv
        "linear_attn.in_proj_z", "linear_attn.out_proj",  # g_proj, o_proj
        "mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj",  # one pair per routed expert
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"}
    by = {(t.group, t.hf_name): t for t in targets}
    q, v = by[0, "linear_attn.q_proj"], by[0, "linear_attn.v_proj"]  # in_proj_qkv [L, D, 2 * 64 + 128]
    assert q.param_path[-1] == v.param_path[-1] == "in_proj_qkv" and (q.out_range, v.out_range) == ((0, 64),
                                                                                                     (128, 256))
    lora = jax.eval_shape(lambda: L.init_lora(params, targets, rank=4))
    experts = lora["g0"]["mlp"]["experts"]  # E = 8, D = 128, F = 64, layers per group 2
    assert (experts["gate_proj"]["lora_A"].shape, experts["gate_proj"]["lora_B"].shape) == ((2, 8, 128, 4),
                                                                                             (2, 8, 4, 64))
    assert (experts["down_proj"]["lora_A"].shape, experts["down_proj"]["lora_B"].shape) == ((2, 8, 64, 4),
                                                                                            (2, 8, 4, 128))
    # fused names: one pair whose output spans several parameters (or both halves of one)
    fused = L.lora_targets(params, LoraConfig(enable_lora=True, lora_target_modules=[
        "qkv_proj", "in_proj_qkvz", "in_proj_ba", "gate_up_proj"]))
    spans = {}
    for t in fused:
        spans.setdefault((t.group, t.hf_name), []).append((t.param_path[-1], t.pair_range, t.out_range))
    assert spans[1, "self_attn.qkv_proj"] == [("q_proj", (0, 256), None), ("k_proj", (256, 320), None),
                                              ("v_proj", (320, 384), None)]
    assert spans[0, "linear_attn.in_proj_qkvz"] == [("in_proj_qkv", (0, 256), None), ("in_proj_z", (256, 384), None)]
    assert spans[0, "linear_attn.in_proj_ba"] == [("in_proj_b", (0, 4), None), ("in_proj_a", (4, 8), None)]
    assert spans[0, "mlp.shared_expert.gate_up_proj"] == [("gate_up_proj", None, None)]  # one pair, 2F outputs
    # on MoE experts gate_up_proj is xorl's: their gate and up adapters
    assert spans[0, "mlp.experts.gate_proj"] == [("gate_up_proj", None, (0, 64))]
    assert spans[0, "mlp.experts.up_proj"] == [("gate_up_proj", None, (64, 128))]

    with pytest.raises(ConfigError, match=r"'qproj' is not a LoRA target name of this model; did you mean "
                                          r"'q_proj'\? valid names: .*self_attn.q_proj"):
        L.lora_targets(params, LoraConfig(enable_lora=True, lora_target_modules=["qproj"]))
    with pytest.raises(ConfigError, match="lora_target_parameters: 'experts.up'"):
        L.lora_targets(params, LoraConfig(enable_lora=True, lora_target_modules=["q_proj"],
                                          lora_target_parameters=["experts.up"]))
    with pytest.raises(ConfigError, match="lora_dropout"):
        L.lora_targets(params, LoraConfig(enable_lora=True, lora_dropout=0.1))
    # A name of another family is refused, as xorl refuses a target that adapts nothing.
    moe = abstract_params(read_hf_config(DEMO_DIR))
    with pytest.raises(ConfigError, match="'g_proj' names no layer of this model; valid names: .*q_proj"):
        L.lora_targets(moe, LoraConfig(enable_lora=True, lora_target_modules=["q_proj", "g_proj"]))
    # On an all-MoE Qwen3, xorl's default names adapt attention and every routed expert.
    assert {t.hf_name for t in L.lora_targets(moe, LoraConfig(enable_lora=True))} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"}


def test_names_checked_when_the_config_is_loaded():
    """load_config reads the model's config.json (no JAX, no model built) and refuses a name with a 'did you mean';
    its table of what each family offers equals what lora.py finds in the built model."""
    from xorl_jax import lora_names

    with pytest.raises(ConfigError, match=r"'gateproj' is not a LoRA target name of this model \(qwen3_moe, .*"
                                          r"did you mean 'gate_proj'\?"):
        load_config(None, ["--lora.enable_lora=true", "--lora.lora_target_modules=[q_proj, gateproj]",
                           f"--model.model_path={DEMO_DIR}"])
    with pytest.raises(ConfigError, match="'in_proj_qkv' names no layer of this model"):
        load_config(None, ["--lora.enable_lora=true", "--lora.lora_target_modules=[in_proj_qkv]",
                           f"--model.config_path={DEMO_DIR}", "--train.init_from=hf"])
    cfg = load_config(None, ["--lora.enable_lora=true", f"--lora.lora_target_modules={XORL_QWEN3_5_DEFAULT}",
                             f"--model.model_path={QWEN3_5_MOE_DIR}"])
    assert cfg.lora.lora_target_modules == XORL_QWEN3_5_DEFAULT
    moe = read_hf_config(DEMO_DIR)
    dense_3_5 = dict(read_hf_config(QWEN3_5_MOE_DIR), model_type="qwen3_5_text", intermediate_size=96)
    for hf in (dict(TINY_QWEN3), moe, dict(moe, mlp_only_layers=[0]), read_hf_config(QWEN3_5_MOE_DIR), dense_3_5):
        want = lora_names.available(lora_names.model_parts(hf))
        got = L.available_names(abstract_params(hf))
        assert (set(got[0]), set(got[1])) == (set(want[0]), set(want[1])), hf["model_type"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step0_equals_base_with_frozen_base_dtype(dtype):
    """B = 0: the adapted model's logits are exactly the base model's (bf16 base weights too, bf16 compute)."""
    cls, mc = build_config(read_hf_config(QWEN3_5_MOE_DIR))
    opts = ModelOptions(dtype=dtype, param_dtype=dtype)
    model = cls(mc, opts, rngs=nnx.Rngs(0))
    from xorl_jax.models.common import cast_params

    cast_params(model, jnp.dtype(dtype))
    graphdef, params = nnx.split(model)
    targets = L.lora_targets(params, ALL_QWEN3_5)
    lora = L.init_lora(params, targets, rank=4, seed=0)
    ids = jnp.arange(24, dtype=jnp.int32).reshape(1, 24) * 7 % 700
    base = nnx.merge(graphdef, params)(ids).logits
    step0 = nnx.merge(graphdef, L.merge_lora(params, lora, targets, 2.0))(ids).logits
    np.testing.assert_array_equal(np.asarray(step0), np.asarray(base))


def test_step0_equals_base_and_merge_is_w_plus_ab():
    """B = 0: exactly the base model. Then each weight's merge is W + s A B restated by hand per name: fused pairs
    split over their parameters, split pairs in their rows, per-expert pairs, and two pairs on one weight summed."""
    graphdef, params = build(read_hf_config(QWEN3_5_MOE_DIR))
    targets = L.lora_targets(params, ALL_QWEN3_5)
    lora = L.init_lora(params, targets, rank=4, seed=0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora))
    ids = jnp.arange(24, dtype=jnp.int32).reshape(1, 24) % 700
    base = nnx.merge(graphdef, params)(ids).logits
    scale = L.lora_scale(ALL_QWEN3_5)
    step0 = nnx.merge(graphdef, L.merge_lora(params, lora, targets, scale))(ids).logits
    np.testing.assert_array_equal(np.asarray(step0), np.asarray(base))  # B = 0: exactly the base model

    lora = randomize_b(lora)
    merged, before = flat(L.merge_lora(params, lora, targets, scale)), flat(params)

    def ab(*key, cols=slice(None)):  # s * A @ B[..., cols] of the pair at `key`, in numpy
        node = lora
        for k in key:
            node = node[k]
        return scale * np.einsum("...ir,...ro->...io", np.asarray(node["lora_A"]), np.asarray(node["lora_B"])[
            ..., cols])

    def layer(g, *rest):
        return ("layers", "groups", str(g)) + rest

    want = {k: v.copy() for k, v in before.items()}
    L2, E, D = 2, 8, 128
    # full attention (group 1): qkv_proj is one pair across q [4 x 64], k [2 x 32], v [2 x 32]; o_proj
    want[layer(1, "self_attn", "q_proj")] += ab("g1", "self_attn", "qkv_proj", cols=slice(0, 256)).reshape(L2, D, 4, 64)
    want[layer(1, "self_attn", "k_proj")] += ab("g1", "self_attn", "qkv_proj", cols=slice(256, 320)).reshape(
        L2, D, 2, 32)
    want[layer(1, "self_attn", "v_proj")] += ab("g1", "self_attn", "qkv_proj", cols=slice(320, 384)).reshape(
        L2, D, 2, 32)
    want[layer(1, "self_attn", "o_proj")] += ab("g1", "self_attn", "o_proj").reshape(L2, 4, 32, D)
    # linear attention (group 0): xorl's q and v rows of in_proj_qkv [q 64 | k 64 | v 128]; in_proj_ba one pair
    # over b then a; g_proj = in_proj_z; o_proj = out_proj
    want[layer(0, "linear_attn", "in_proj_qkv")][..., 0:64] += ab("g0", "linear_attn", "q_proj")
    want[layer(0, "linear_attn", "in_proj_qkv")][..., 128:256] += ab("g0", "linear_attn", "v_proj")
    want[layer(0, "linear_attn", "in_proj_b")] += ab("g0", "linear_attn", "in_proj_ba", cols=slice(0, 4))
    want[layer(0, "linear_attn", "in_proj_a")] += ab("g0", "linear_attn", "in_proj_ba", cols=slice(4, 8))
    want[layer(0, "linear_attn", "in_proj_z")] += ab("g0", "linear_attn", "in_proj_z").reshape(L2, D, 4, 32)
    want[layer(0, "linear_attn", "out_proj")] += ab("g0", "linear_attn", "out_proj").reshape(L2, 4, 32, D)
    for g in ("0", "1"):
        # routed experts [L, E, D, 2, F]: per-expert gate and up pairs in their halves, plus the whole-tensor pair
        w = want[layer(g, "mlp", "gate_up_proj")]
        w[:, :, :, 0] += ab(f"g{g}", "mlp", "experts", "gate_proj")
        w[:, :, :, 1] += ab(f"g{g}", "mlp", "experts", "up_proj")
        w += ab(f"g{g}", "mlp", "experts", "gate_up_proj").reshape(L2, E, D, 2, 64)
        want[layer(g, "mlp", "down_proj")] += ab(f"g{g}", "mlp", "experts", "down_proj")
        # shared expert [L, D, 2, F]: gate_proj / up_proj pairs and the fused gate_up_proj pair
        w = want[layer(g, "mlp", "shared_expert", "gate_up_proj")]
        w[:, :, 0] += ab(f"g{g}", "mlp", "shared_expert", "gate_proj")
        w[:, :, 1] += ab(f"g{g}", "mlp", "shared_expert", "up_proj")
        w += ab(f"g{g}", "mlp", "shared_expert", "gate_up_proj").reshape(L2, D, 2, 64)
        want[layer(g, "mlp", "shared_expert", "down_proj")] += ab(f"g{g}", "mlp", "shared_expert", "down_proj")
    assert merged.keys() == want.keys()
    changed = 0
    for k in want:
        np.testing.assert_allclose(merged[k], want[k], rtol=1e-6, atol=1e-6, err_msg=".".join(k))
        changed += not np.array_equal(want[k], before[k])
    assert changed == 17  # q k v o; in_proj_qkv, _b, _a, _z, out_proj; per group experts and shared expert x 2


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5_moe"])
def test_peft_adapter_round_trip_matches_our_logits(tmp_path, family):
    """Our merged LoRA model vs HF base + `peft.PeftModel.from_pretrained(adapter dir)`: the same logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from xorl_jax.checkpoint.export import export_hf

    if family == "qwen3":  # xorl's fused names: one pair each for q/k/v and for gate/up, split over HF's modules
        hf_config = dict(TINY_QWEN3)
        cfg = LoraConfig(enable_lora=True, lora_rank=4, lora_alpha=8.0,
                         lora_target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    else:  # in_proj_qkv gets xorl's q and v rows and a whole-module pair side by side (rank 3 r in rank_pattern)
        hf_config = read_hf_config(QWEN3_5_MOE_DIR)
        cfg = LoraConfig(enable_lora=True, lora_rank=4, lora_alpha=16.0, lora_target_modules=[
            "qkv_proj", "o_proj", "linear_attn.q_proj", "linear_attn.v_proj", "in_proj_qkv", "in_proj_ba", "g_proj",
            "shared_expert.gate_up_proj", "shared_expert.down_proj"])
    graphdef, params = build(hf_config)
    base_dir = str(tmp_path / "base")
    export_hf(nnx.merge(graphdef, params), base_dir, source_dir_or_metadata={"hf_config": hf_config})
    targets = L.lora_targets(params, cfg)
    lora = randomize_b(L.init_lora(params, targets, cfg.lora_rank, seed=3), scale=0.1)
    model = nnx.merge(graphdef, params)
    adapter = L.export_peft_adapter(str(tmp_path / "adapter"), lora, targets, rank=cfg.lora_rank,
                                    alpha=cfg.lora_alpha, period=len(model.layers.pattern),
                                    repeats=model.layers.repeats, base_model_name_or_path=base_dir)
    adapter_config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert adapter_config["r"] == cfg.lora_rank
    if family == "qwen3_5_moe":
        assert set(adapter_config["rank_pattern"].values()) == {3 * cfg.lora_rank}

    ids = np.random.default_rng(0).integers(1, hf_config["vocab_size"], (2, 20))
    ours = nnx.merge(graphdef, L.merge_lora(params, lora, targets, L.lora_scale(cfg)))
    got = np.asarray(ours(jnp.asarray(ids)).logits)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.as_tensor(ids)).logits.numpy()
    hf = peft.PeftModel.from_pretrained(base, adapter)
    hf.eval()
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(want - plain).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_expert_adapter_export_is_xorls_per_expert_layout(tmp_path):
    """Routed-expert adapters go to the PEFT directory as xorl writes them: `...mlp.experts.{e}.gate_proj.lora_A
    .weight` [r, in] and `lora_B` [out, r] per expert; gate_proj here carries two pairs (its own and the whole-tensor
    one), rank 2 r by rank_pattern. B A times each module's alpha / r is our merged delta of that expert."""
    from safetensors.numpy import load_file

    graphdef, params = build(read_hf_config(DEMO_DIR))
    cfg = LoraConfig(enable_lora=True, lora_rank=4, lora_alpha=8.0, lora_target_modules=["gate_proj", "down_proj"],
                     lora_target_parameters=["mlp.experts.gate_up_proj"])
    targets = L.lora_targets(params, cfg)
    lora = randomize_b(L.init_lora(params, targets, cfg.lora_rank, seed=3), scale=0.1)
    out = L.export_peft_adapter(str(tmp_path / "adapter"), lora, targets, rank=4, alpha=8.0, period=1, repeats=2)
    conf = json.load(open(os.path.join(out, "adapter_config.json")))
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert conf["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    assert len(tensors) == 2 * 2 * 8 * 3  # A and B, 2 layers, 8 experts, 3 modules
    deltas = L.lora_deltas(lora, targets, params, L.lora_scale(cfg))
    gate_up = np.asarray(deltas[("layers", "groups", "0", "mlp", "gate_up_proj")])  # [L, E, D, 2, F]
    down = np.asarray(deltas[("layers", "groups", "0", "mlp", "down_proj")])  # [L, E, F, D]
    for i, e in ((0, 0), (1, 5)):
        for module, want in (("gate_proj", gate_up[i, e, :, 0].T), ("up_proj", gate_up[i, e, :, 1].T),
                             ("down_proj", down[i, e].T)):  # HF's [out, in]
            name = f"model.layers.{i}.mlp.experts.{e}.{module}"
            A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
            rank = conf["rank_pattern"].get(re.escape(name), conf["r"])
            alpha = conf["alpha_pattern"].get(re.escape(name), conf["lora_alpha"])
            assert (A.shape[0], rank) == ((8, 8) if module == "gate_proj" else (4, 4)), module
            np.testing.assert_allclose(alpha / rank * B @ A, want, rtol=1e-5, atol=1e-6, err_msg=name)
            assert np.abs(want).max() > 1e-3


# ---------------------------------------------------------------------------------------------- per-layer merge
def _loss_fns(graphdef, params, targets, scale, micro):
    """(whole-model merge, per-layer merge inside the layer scan) -> loss + aux, as functions of the adapters."""
    from xorl_jax.train_step import LossConfig, forward_loss

    lc = LossConfig(aux_loss_coef=0.01, ce_chunk_size=64, compute_dtype=jnp.float32)
    merge_fn = L.layer_merge_fn(targets, scale)

    def whole(lora):
        loss, _, aux = forward_loss(graphdef, L.merge_lora(params, lora, targets, scale), micro, lc)
        return loss + aux

    def per_layer(lora):
        base, transform = merge_fn(lora, params)
        loss, _, aux = forward_loss(graphdef, base, micro, lc, transform)
        return loss + aux

    return whole, per_layer


@pytest.mark.parametrize("family,remat,scan", [("qwen3", "dots_saveable", True), ("qwen3_moe", "full", True),
                                               ("qwen3_5_moe", "none", True), ("qwen3", "full", False)])
def test_per_layer_merge_equals_whole_model_merge(family, remat, scan):
    """The train step merges each layer group inside the layer scan (or the unrolled loop); loss and every adapter
    gradient equal the whole-model merge W + s A B (fp32), under each remat policy (routed experts, GDN, shared
    expert included)."""
    if family == "qwen3":
        hf_config, cfg = dict(TINY_QWEN3), LoraConfig(enable_lora=True, lora_rank=4, lora_alpha=8.0)
    elif family == "qwen3_moe":
        hf_config = read_hf_config(DEMO_DIR)
        cfg = LoraConfig(enable_lora=True, lora_rank=4, lora_alpha=8.0)  # xorl's names: experts' gate up down
    else:
        hf_config, cfg = read_hf_config(QWEN3_5_MOE_DIR), ALL_QWEN3_5
    cls, mc = build_config(hf_config)
    graphdef, params = nnx.split(cls(mc, ModelOptions(remat_policy=remat, scan_layers=scan), rngs=nnx.Rngs(0)))
    targets = L.lora_targets(params, cfg)
    lora = randomize_b(L.init_lora(params, targets, cfg.lora_rank, seed=2), scale=0.1)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, hf_config["vocab_size"], (2, 16)), jnp.int32)
    micro = {"input_ids": ids, "labels": ids, "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
             "segment_ids": jnp.ones((2, 16), jnp.int32)}
    whole, per_layer = _loss_fns(graphdef, params, targets, L.lora_scale(cfg), micro)
    want, want_g = jax.jit(jax.value_and_grad(whole))(lora)
    got, got_g = jax.jit(jax.value_and_grad(per_layer))(lora)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want_g)]
    # Without remat the per-layer merge still recomputes each layer's elementwise work in the backward (so that
    # the merged weights are not kept) while the whole-model merge does not: fp32 rounding differs there (measured
    # up to 2e-4 relative on a few GDN adapter entries, 2e-6 of the largest entry elsewhere), a wrong merge would
    # differ by O(1).
    rtol, atol = (5e-4, 1e-5) if remat == "none" else (1e-5, 1e-6)
    for path, a, b in zip(paths, jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        assert np.abs(np.asarray(b)).max() > 0, path  # every adapter gets a gradient
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol * np.abs(b).max(),
                                   err_msg=path)


def _lora_step_temp_bytes(remat: str, whole: bool):
    """Temporary bytes of the compiled LoRA train step (Adam, one micro-batch of 128 tokens, one device) for an
    8-layer hidden-512 Qwen3 with every projection adapted, and the fp32 size of all adapted weights. Abstract
    arrays: nothing is allocated."""
    import optax

    from xorl_jax.train_step import LossConfig, TrainState, make_train_step

    hf = dict(TINY_QWEN3, vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    cfg = LoraConfig(enable_lora=True, lora_rank=8, lora_alpha=16.0)  # q k v o gate up down
    cls, mc = build_config(hf)
    opts = ModelOptions(remat_policy=remat, attn_implementation="xla")  # no attention-kernel workspace on a GPU
    graphdef, params = nnx.split(nnx.eval_shape(lambda: cls(mc, opts, rngs=nnx.Rngs(0))))
    targets = L.lora_targets(params, cfg)
    adapted = {t.param_path for t in targets}
    merged_bytes = sum(x.size * 4 for n, x, _ in params_with_path(params) if n in adapted)
    lora = jax.eval_shape(lambda: L.init_lora(params, targets, cfg.lora_rank))
    scale = L.lora_scale(cfg)
    if whole:  # the former train step: merge the whole model, then run it
        merge_fn = lambda lo, base: (L.merge_lora(base, lo, targets, scale), None)  # noqa: E731
    else:
        merge_fn = L.layer_merge_fn(targets, scale)
    opt = optax.adam(1e-3)
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    state = jax.eval_shape(lambda lo: TrainState(zero(), lo, opt.init(lo), zero(), zero()), lora)
    batch = {k: jax.ShapeDtypeStruct((1, 1, 128), jnp.int32)
             for k in ("input_ids", "labels", "positions", "segment_ids")}
    step = jax.jit(make_train_step(graphdef, opt, LossConfig(compute_dtype=jnp.float32), merge_fn=merge_fn),
                   donate_argnums=(0,))
    compiled = step.lower(state, batch, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes, merged_bytes


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "none"])
def test_per_layer_merge_temp_memory_below_merged_model(remat):
    """A whole-model merge holds a merged copy of every adapted weight and its gradient (>= 2x their size) in
    temporary memory; the per-layer merge holds one layer group's at a time (1/8 here) plus activations. So the
    per-layer step must stay below the size of all merged weights: a regression to whole-model merging, or a remat
    policy that saves each layer's A @ B (or, without remat, each layer's merged weights), fails. (Measured on CPU:
    full 39 MiB, dots_saveable 54 MiB, none 54 MiB (188 MiB before the merged weights were rebuilt in the
    backward), against 96 MiB of merged weights; the whole-model merge needs 243 MiB.)"""
    temp, merged = _lora_step_temp_bytes(remat, whole=False)
    assert temp < merged, (temp, merged)
    if remat == "full":  # the bound does tell the two apart
        whole_temp, _ = _lora_step_temp_bytes(remat, whole=True)
        assert whole_temp > 2 * merged, (whole_temp, merged)


# ---------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """The demo Qwen3-MoE with random weights, saved as an HF directory (LoRA needs init_from hf)."""
    from xorl_jax.checkpoint.export import export_hf

    hf_config = read_hf_config(DEMO_DIR)
    graphdef, params = build(hf_config, seed=5)
    out = str(tmp_path_factory.mktemp("lora_base") / "hf")
    export_hf(nnx.merge(graphdef, params), out, source_dir_or_metadata={"hf_config": hf_config,
                                                                        "source_path": DEMO_DIR})
    return out


def make_lora_trainer(out_dir, base_dir, lora=None, model=None, **train):
    from xorl_jax.trainer import Trainer

    settings = {
        "model.model_path": base_dir, "model.tokenizer_path": DEMO_DIR,
        "data.datasets": f"[{{path: {DEMO_DIR}/train.jsonl, type: messages}}]",
        "data.eval_datasets": f"[{{path: {DEMO_DIR}/eval.jsonl, type: messages}}]",
        "data.sample_packing_sequence_len": 128, "train.output_dir": str(out_dir), "train.init_from": "hf",
        "train.micro_batch_size": 1, "train.gradient_accumulation_steps": 2, "train.max_steps": 4,
        "train.save_steps": 0, "train.save_hf_weights": False, "train.log_steps": 1, "train.lr": 1e-2,
        "train.sample_eval_prompts": 0, "train.weight_decay": 0.01,
        "lora.enable_lora": True, "lora.lora_rank": 4, "lora.lora_alpha": 8,
        "lora.lora_target_modules": "[q_proj, k_proj, v_proj, o_proj]",
        "lora.lora_target_parameters": "[mlp.experts.gate_up_proj, mlp.experts.down_proj]",
    }
    settings.update({f"train.{k}": v for k, v in train.items()})
    settings.update({f"lora.{k}": v for k, v in (lora or {}).items()})
    settings.update({f"model.{k}": v for k, v in (model or {}).items()})
    cfg = load_config(DEMO_CONFIG, [f"--{k}={v}" for k, v in settings.items()])
    cfg.model.config_path = None
    return Trainer(cfg)


def test_trainer_trains_only_adapters_and_exports_merged(tmp_path, demo_base):
    """MoE LoRA as a xorl config writes it (gate_proj/up_proj/down_proj: a pair per routed expert; qkv_proj fused)
    trains only the adapters, starts from the base model and exports base + BA."""
    trainer = make_lora_trainer(tmp_path, demo_base, save_hf_weights=True, lora={
        "save_lora_only": False, "lora_target_modules": "[qkv_proj, o_proj, gate_proj, up_proj, down_proj]",
        "lora_target_parameters": "[]"})
    assert {t.hf_name for t in trainer.lora_targets} == {"self_attn.qkv_proj", "self_attn.o_proj",
                                                         "mlp.experts.gate_proj", "mlp.experts.up_proj",
                                                         "mlp.experts.down_proj"}
    base_before = flat(trainer.frozen)
    lora_before = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(trainer.state.params)}
    # optimizer state: only adapter-sized arrays (Adam mu and nu) plus scalars
    lora_shapes = sorted(x.shape for x in jax.tree.leaves(trainer.state.params))
    opt_arrays = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in opt_arrays) == sorted(lora_shapes * 2)
    n_lora = L.count_lora_params(trainer.state.params)
    assert sum(x.size for x in opt_arrays) == 2 * n_lora < trainer.param_count // 4
    # step 0 == base model
    ids = jnp.asarray(np.asarray(next(iter(trainer.eval_batches))["input_ids"][:1, :64]))
    base_logits = nnx.merge(trainer.graphdef, trainer.frozen)(ids).logits
    step0 = nnx.merge(trainer.graphdef, trainer.full_params())(ids).logits
    np.testing.assert_array_equal(np.asarray(step0), np.asarray(base_logits))

    result = trainer.train()
    assert result["step"] == 4 and np.isfinite(result["loss"])
    for k, v in flat(trainer.frozen).items():  # base bitwise unchanged
        np.testing.assert_array_equal(v, base_before[k])
    lora_after = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(trainer.state.params)}
    changed = [k for k in lora_after if not np.array_equal(lora_after[k], lora_before[k])]
    assert any("lora_B" in jax.tree_util.keystr(k) for k in changed) and len(changed) == len(lora_after)

    # merged export (save_lora_only false) equals base + (alpha / r) A B, read back through our loader
    from xorl_jax.checkpoint.orbax import load_model

    exported = load_model(str(tmp_path / "global_step_4" / "hf_ckpt"), ModelOptions())
    got = flat(nnx.state(exported, nnx.Param))
    want = flat(L.merge_lora(trainer.frozen, trainer.state.params, trainer.lora_targets, 2.0))
    assert got.keys() == want.keys()
    changed_weights = 0
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
        changed_weights += not np.array_equal(want[k], base_before[k])
    assert changed_weights == 6  # q k v o, experts gate_up and down


def test_trainer_adapter_export_and_resume(tmp_path, demo_base):
    bf16 = {"param_dtype": "bfloat16"}  # the frozen base stays in bf16, the adapters in fp32
    adapters = {"lora_target_parameters": "[]", "lora_target_modules": "[q_proj, k_proj, v_proj, o_proj, down_proj]"}
    full = make_lora_trainer(tmp_path / "full", demo_base, save_steps=2, model=bf16, lora=adapters)
    assert {x.dtype for x in jax.tree.leaves(full.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(full.state.params)} == {jnp.dtype(jnp.float32)}
    full.train()
    expected = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(full.state.params)}
    adapter = full.export_hf(4)  # save_lora_only (the default): a PEFT adapter directory
    assert adapter.endswith("lora_adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["target_modules"] == ["down_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                     "self_attn.v_proj"]  # routed experts per expert, as xorl writes them
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_B.weight"].shape == (128, 4)
    import shutil

    resumed_dir = tmp_path / "resumed"
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "2", resumed_dir / "checkpoints" / "2")
    resumed = make_lora_trainer(resumed_dir, demo_base, load_checkpoint_path="auto", model=bf16, lora=adapters)
    assert resumed.train()["step"] == 4
    got = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(resumed.state.params)}
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
