"""Muon (xorl_jax/optim.py): which parameters it orthogonalises, two updates against a float64 numpy restatement of
torch.optim.Muon / xorl's Muon (and AdamW for the rest), the same update under FSDP/EP/TP sharding, the config
path, and LoRA adapters trained by muon."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from xorl_jax import optim as O
from xorl_jax.checkpoint.orbax import read_hf_config
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.loading import build_config

QWEN3_5_MOE_DIR = DEMO_DIR + "_qwen3_5_moe"

# HF's [out, in] view of each of our weights, per layer (and expert): how torch's Muon sees the matrix. Written out
# by name, apart from the optimizer's rule (which reads logical axes), so a wrong rule shows up as a mismatch.
def _hf_matrices(name: str, w: np.ndarray):
    """[(index into w, [out, in] matrix)] for a muon parameter; None for one that takes AdamW."""
    last = name.split(".")[-1]
    if name in ("embed_tokens", "lm_head") or "norm" in name or last in ("router", "shared_expert_gate", "conv1d",
                                                                            "A_log", "dt_bias"):
        return None
    out = []
    for layer in range(w.shape[0]):
        x = w[layer]
        if last == "gate_up_proj" and x.ndim == 4:  # routed experts [E, D, 2, F]
            out += [((layer, e, slice(None), h), x[e, :, h, :].T) for e in range(x.shape[0]) for h in (0, 1)]
        elif last == "gate_up_proj":  # dense / shared expert [D, 2, F]
            out += [((layer, slice(None), h), x[:, h, :].T) for h in (0, 1)]
        elif last == "down_proj" and x.ndim == 3:  # routed experts [E, F, D]
            out += [((layer, e), x[e].T) for e in range(x.shape[0])]
        elif last in ("o_proj", "out_proj"):  # [H, hd, D]
            out.append(((layer,), x.reshape(-1, x.shape[-1]).T))
        else:  # [D, out...]
            out.append(((layer,), x.reshape(x.shape[0], -1).T))
    return out


def _ns64(g, steps):
    """torch.optim._muon._zeropower_via_newtonschulz in float64 (no bf16 cast) on an [out, in] matrix."""
    a, b, c = 3.4445, -4.775, 2.0315
    x = g.astype(np.float64)
    if x.shape[0] > x.shape[1]:
        x = x.T
    x = x / max(np.linalg.norm(x), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def _reference(params, grads_seq, *, lr, muon_lr, wd, b1, b2, eps, momentum, nesterov, ns_steps, adjust):
    """Parameters after len(grads_seq) updates: xorl's Muon on the matrices, AdamW elsewhere, float64, decoupled
    decay on what default_decay_mask decays (rank >= 2 besides the layers axis, no norms)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in p:
            g = grads[k].astype(np.float64)
            mats = _hf_matrices(k, p[k])
            decays = "norm" not in k and (p[k].ndim - (k.startswith("layers")) >= 2)
            if mats is None:
                m[k] = b1 * m[k] + (1 - b1) * g
                v2[k] = b2 * v2[k] + (1 - b2) * g * g
                upd = (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
                p[k] = p[k] - lr * (upd + (wd * p[k] if decays else 0))
                continue
            buf[k] = momentum * buf[k] + (1 - momentum) * g
            u = (1 - momentum) * g + momentum * buf[k] if nesterov else buf[k]
            upd = np.zeros_like(u)
            for (idx, _), (_, um) in zip(mats, _hf_matrices(k, u)):
                A, B = um.shape
                ratio = math.sqrt(max(1, A / B)) if adjust == "original" else 0.2 * math.sqrt(max(A, B))
                o = ratio * _ns64(um, ns_steps)  # [out, in]
                view = upd[idx]
                view[...] = o.T.reshape(view.shape)
            p[k] = p[k] - muon_lr * (upd + (wd * p[k] if decays else 0))
    return p


def _model_state(path=QWEN3_5_MOE_DIR, seed=0):
    """(graphdef, random params, model config) of a tiny model: shapes from an abstract build, values drawn here
    (building the model eagerly takes far longer on CPU)."""
    cls, mc = build_config(read_hf_config(path))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(mc, ModelOptions(), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    flat = O.params_with_path(abstract)
    values = [np.ones(x.shape, np.float32) if "norm" in names[-2:] or names[-1] == "weight" else
              (0.05 * rng.normal(size=x.shape)).astype(np.float32) for names, x, _ in flat]
    state = jax.tree.unflatten(jax.tree.structure(abstract), [jnp.asarray(v) for v in values])
    return graphdef, state, mc


def _named(state):
    return {".".join(n): np.asarray(x) for n, x, _ in O.params_with_path(state)}


def _grads(state, step):
    rng = np.random.default_rng(10 + step)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), state)


def test_routing_matrices_to_muon_and_the_rest_to_adamw():
    _, state, _ = _model_state()
    dims = {".".join(n): d for (n, _, _), d in zip(O.params_with_path(state), jax.tree.leaves(O.default_muon_dims(
        state)))}
    adamw = {k for k, d in dims.items() if not d}
    assert {k.split(".")[-1] if k.startswith("layers") else k for k in adamw} == {
        "embed_tokens", "lm_head", "norm.weight", "weight", "router", "shared_expert_gate", "conv1d", "A_log",
        "dt_bias"}
    # each expert's matrix and the gate and up halves on their own; o_proj's fan-in is (heads, head_dim)
    assert dims["layers.groups.0.mlp.gate_up_proj"] == O.MatrixDims((0, 1, 3), (2,), (4,))
    assert dims["layers.groups.0.mlp.down_proj"] == O.MatrixDims((0, 1), (2,), (3,))
    assert dims["layers.groups.1.self_attn.o_proj"] == O.MatrixDims((0,), (1, 2), (3,))
    assert dims["layers.groups.1.self_attn.q_proj"] == O.MatrixDims((0,), (1,), (2, 3))
    # plain arrays (a LoRA tree): the last two dims, the rest batch
    assert O.muon_matrix_dims(("g0", "mlp", "experts", "gate_proj", "lora_A"), np.zeros((2, 8, 16, 4)), None) == \
        O.MatrixDims((0, 1), (2,), (3,))
    assert O.muon_matrix_dims(("x",), np.zeros((5,)), None) is False


@pytest.mark.parametrize("adjust,nesterov,momentum", [("original", True, 0.95), ("match_rms_adamw", False, 0.0)])
def test_two_updates_match_float64_reference(adjust, nesterov, momentum):
    """Two updates of the tiny Qwen3.5-MoE (attention, Gated DeltaNet, routed and shared experts, embeddings,
    norms, routers) against the float64 restatement, with clipping off and decoupled weight decay."""
    _, state, _ = _model_state()
    hp = dict(lr=3e-3, muon_lr=0.02, wd=0.1, b1=0.9, b2=0.95, eps=1e-8, momentum=momentum, nesterov=nesterov,
              ns_steps=5, adjust=adjust)
    tx = O.build_optimizer(schedule=hp["lr"], weight_decay=hp["wd"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
                           max_grad_norm=0.0, optimizer="muon", decay_mask=O.default_decay_mask(state),
                           muon_dims=O.default_muon_dims(state), muon_schedule=hp["muon_lr"],
                           muon_momentum=momentum, muon_nesterov=nesterov, muon_ns_steps=5, muon_adjust_lr_fn=adjust)
    opt_state = tx.init(state)
    if momentum == 0:  # no momentum buffer at all (torch: none either)
        assert all(x.ndim == 0 for x in jax.tree.leaves(opt_state[0].inner_states["muon"]))
    params, grads_seq = state, [_grads(state, s) for s in range(2)]
    step = jax.jit(tx.update)
    for g in grads_seq:
        updates, opt_state = step(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    want = _reference(_named(state), [_named(g) for g in grads_seq], **hp)
    got = _named(params)
    before = _named(state)
    for k, w in want.items():
        moved = np.abs(w - before[k]).max()
        assert moved > 0, k
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1e-4 * moved, err_msg=k)  # measured <= 2e-5


def test_sharded_update_equals_one_device():
    """The update on an FSDP x EP x TP mesh (8 fake devices) equals the one-device update: each expert
    and each layer's matrix is orthogonalised whole, whatever holds its shards."""
    from xorl_jax.parallel import rules as R
    from xorl_jax.parallel.mesh import build_mesh

    _, state, mc = _model_state()
    tx = O.build_optimizer(schedule=1e-3, weight_decay=0.01, optimizer="muon", decay_mask=O.default_decay_mask(state),
                           muon_dims=O.default_muon_dims(state), muon_schedule=0.02)
    g = _grads(state, 0)
    want, _ = jax.jit(tx.update)(g, tx.init(state), state)
    sizes = dict(data_parallel_shard_size=4, expert_parallel_size=2, tensor_parallel_size=2)
    mesh = build_mesh(**sizes, model_config=mc)
    with R.use_mesh(mesh):
        shardings = jax.tree.map(lambda v: R.logical_to_sharding(v.get_metadata()["axes"], mesh, shape=v.shape),
                                 state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        s, gs = jax.device_put(state, shardings), jax.device_put(g, shardings)
        assert {a for x in jax.tree.leaves(s) for a in jax.tree.leaves(tuple(x.sharding.spec))} >= {
            "fsdp", "expert", "tensor"}
        got, _ = jax.jit(tx.update, out_shardings=(shardings, None))(gs, tx.init(s), s)
    for (k, a), (_, b) in zip(_named(got).items(), _named(want).items()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=k)


def test_config_builds_muon_with_scaled_schedule_and_lora_adapters_train():
    """train.optimizer muon through the trainer's optimizer_for: muon_lr follows lr's schedule shape, and on a LoRA
    adapter tree (plain arrays) every A and B is orthogonalised per layer and expert and the loss falls."""
    from xorl_jax import lora as L
    from xorl_jax.config import LoraConfig, load_config
    from xorl_jax.train_setup import optimizer_for
    from xorl_jax.train_step import LossConfig, forward_loss

    cfg = load_config(None, ["--train.optimizer=muon", "--train.lr=1e-3", "--train.muon_lr=0.01",
                             "--train.lr_warmup_ratio=0.5", "--train.lr_decay_style=constant",
                             "--train.max_grad_norm=0", "--train.weight_decay=0"])
    graphdef, params, _ = _model_state(DEMO_DIR)
    lcfg = LoraConfig(enable_lora=True, lora_rank=4, lora_alpha=8.0, lora_target_modules=["q_proj", "gate_proj",
                                                                                          "down_proj"])
    targets = L.lora_targets(params, lcfg)
    lora = L.init_lora(params, targets, 4, seed=0)
    schedule, tx = optimizer_for(cfg, lora, total_steps=4)
    assert float(schedule(1)) == pytest.approx(0.5e-3)
    state = tx.init(lora)
    muon_mu = jax.tree.leaves(state[0].inner_states["muon"])
    assert sorted(x.shape for x in muon_mu if x.ndim) == sorted(x.shape for x in jax.tree.leaves(lora))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 700, (2, 32)), jnp.int32)
    micro = {"input_ids": ids, "labels": ids, "positions": jnp.broadcast_to(jnp.arange(32), (2, 32)),
             "segment_ids": jnp.ones((2, 32), jnp.int32)}
    lc = LossConfig(aux_loss_coef=0.0, ce_chunk_size=64, compute_dtype=jnp.float32)
    merge = L.layer_merge_fn(targets, L.lora_scale(lcfg))

    def loss(lo):
        base, transform = merge(lo, params)
        return forward_loss(graphdef, base, micro, lc, transform)[0]

    @jax.jit
    def train_step(lo, st):
        value, g = jax.value_and_grad(loss)(lo)
        updates, st = tx.update(g, st, lo)
        return optax.apply_updates(lo, updates), st, value

    # Step 1 (lr 0.5 * muon_lr after warmup step 0 at lr 0): B's update is muon_lr/2 * ratio * NS(u), ratio =
    # sqrt(max(1, out / rank)), each [rank, out] matrix of it orthogonal-ish (singular values near 1).
    lora, state, first = train_step(lora, state)
    lora1, state, _ = train_step(lora, state)
    b0 = np.asarray(lora["g0"]["mlp"]["experts"]["down_proj"]["lora_B"])
    b1 = np.asarray(lora1["g0"]["mlp"]["experts"]["down_proj"]["lora_B"])
    moved = np.abs(b1 - b0).reshape(-1, *b0.shape[2:]).sum(axis=(1, 2))
    step_b = (b1 - b0).reshape(-1, *b0.shape[2:])[moved.argmax()] / (-0.5 * 0.01 * math.sqrt(128 / 4))
    sv = np.linalg.svd(step_b, compute_uv=False)
    assert 0.6 < sv.max() < 1.3, sv  # Newton-Schulz brings the top singular values near 1
    for _ in range(4):
        lora1, state, last = train_step(lora1, state)
    assert float(last) < float(first)


def test_xorls_other_optimizer_names_run_from_the_config():
    """signsgd and anyprecision_adamw, which xorl configs name, build from the config: signsgd moves each weight by
    lr * sign(g); anyprecision_adamw is AdamW with optimizer_dtype moments (bf16 here)."""
    from xorl_jax.config import load_config
    from xorl_jax.train_setup import optimizer_for

    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)}
    g = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)}
    common = ["--train.lr=0.1", "--train.lr_warmup_ratio=0", "--train.lr_decay_style=constant",
              "--train.weight_decay=0", "--train.max_grad_norm=0"]
    _, tx = optimizer_for(load_config(None, ["--train.optimizer=signsgd", *common]), params, total_steps=2)
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), -0.1 * np.sign(np.asarray(g["w"])))
    cfg = load_config(None, ["--train.optimizer=anyprecision_adamw", "--train.optimizer_dtype=bf16", *common])
    _, tx = optimizer_for(cfg, params, total_steps=2)
    state = tx.init(params)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.bfloat16)}
    updates, _ = tx.update(g, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * np.sign(np.asarray(g["w"])), rtol=1e-2)  # step 1
