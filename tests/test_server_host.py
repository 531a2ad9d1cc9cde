"""The server's model host drives the trainer's engine (xorl_jax.server.host over xorl_jax.engine): the state it
trains is the engine's, and no server module builds a model or an optimizer of its own. What the steps compute
(losses, accumulation, AdamW per request, tenants) is checked end to end in tests/integration/test_server.py."""

import ast
import json
import os

import jax
import numpy as np

from xorl_jax.config import load_config
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.engine import TrainEngine
from xorl_jax.server.host import ModelHost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "xorl_jax", "server")


def full_weight_host(tmp) -> ModelHost:
    """A full-weight host on a 2-layer dense Qwen3 (the demo's sizes without experts), random weights."""
    with open(os.path.join(DEMO_DIR, "config.json")) as f:
        hf = {k: v for k, v in json.load(f).items() if "expert" not in k}
    hf.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps(hf))
    cfg = load_config(os.path.join(ROOT, "configs", "demo_cpu.yaml"),
                      [f"--model.config_path={tmp / 'model'}", f"--model.tokenizer_path={DEMO_DIR}",
                       f"--train.output_dir={tmp / 'out'}"])
    return ModelHost(cfg)


def test_server_builds_no_model_or_optimizer_of_its_own():
    """The model, the adapters, the optimizer and the steps come from the engine: a server module importing a
    loader, LoRA, an optimizer or the train set-up is building a second copy of them."""
    forbidden = ("optax", "xorl_jax.optim", "xorl_jax.lora", "xorl_jax.train_setup", "xorl_jax.models",
                 "xorl_jax.checkpoint.orbax.load_model")
    found = []
    for name in sorted(os.listdir(SERVER)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(SERVER, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found += [f"{name}: {n}" for n in names if any(n == b or n.startswith(b + ".") for b in forbidden)]
    assert not found, found


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_host_trains_the_engine_state(tmp_path):
    """Full weights: the one model's state is the engine's, through steps and a new model after an unload; a
    sampling session keeps the weights it was opened on."""
    host = full_weight_host(tmp_path)
    assert isinstance(host.engine, TrainEngine) and host.engine.serving and host.engine.checkpointer is None
    host.create_model("m", None)
    m = host.models["m"]
    assert m.state is host.engine.state and m.step == 0
    datum = {"model_input": np.arange(3, 15), "loss_fn_inputs": {"target_tokens": np.arange(4, 16),
                                                                 "weights": np.ones(12, np.float32)}}
    request = {"model_id": "m", "loss_fn": "cross_entropy", "loss_fn_config": None, "data": [datum],
               "forward_only": False}
    host.forward_backward(request)
    host.open_sampler("live", model_id="m")  # a snapshot: the step below donates the live weights
    adam = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
            "grad_clip_norm": 1.0}
    before = _flat(host.engine.state.params)
    host.optim_step("m", adam)
    assert m.state is host.engine.state and m.step == 1
    snapshot = _flat(host.sampling_sessions["live"]["params"])  # readable: not the donated arrays
    assert all(np.array_equal(snapshot[k], v) for k, v in before.items())
    trained = _flat(host.engine.state.params)
    assert any(not np.array_equal(trained[k], v) for k, v in before.items())
    host.unload("m")
    host.create_model("m", None)  # the trained weights, a new optimizer state
    assert host.models["m"].state is host.engine.state and host.models["m"].step == 0
    for k, v in _flat(host.engine.state.params).items():
        np.testing.assert_array_equal(v, trained[k], err_msg=k)


def _qwen3_5_host(tmp, model_dir, name, **sizes) -> ModelHost:
    cfg = load_config(os.path.join(ROOT, "configs", "demo_cpu.yaml"),
                      [f"--model.model_path={model_dir}", f"--model.config_path={model_dir}", "--train.init_from=auto",
                       "--model.dtype=float32", "--model.param_dtype=float32",
                       f"--train.output_dir={tmp / name}"] + [f"--train.{k}={v}" for k, v in sizes.items()])
    return ModelHost(cfg)


def test_context_parallel_meshes_give_the_one_mesh_logprobs(tmp_path):
    """Ring attention's token order and Gated DeltaNet's conv halo over context-parallel pieces: a request's
    per-token logprobs on a ring 2 x Ulysses 2 x FSDP 2 mesh equal those of a plain FSDP mesh (rows shorter than the
    pieces' halo are padded, as is a batch of fewer rows than the data-parallel axes split; the targets follow the
    model's token order and the logprobs come back in the request's)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    model_dir = tmp_path / "qwen3_5"
    AutoModelForCausalLM.from_config(Qwen3_5TextConfig(
        vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
        linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    data = []
    for n in (5, 11):
        t = rng.integers(3, 96, n + 1)
        data.append({"model_input": t[:-1], "loss_fn_inputs": {"target_tokens": t[1:], "weights": np.ones(n, np.float32)}})

    def logprobs(host):
        host.create_model("m", None)
        steps, _ = host._programs_of(None, None)
        out = []
        for datums in (data, data[1:]):  # one datum: its row padded to the mesh's 2 data-parallel rows
            batch, lengths = host.batch(datums, "cross_entropy", {})
            _, lp = steps.forward(host.models["m"].state.params, batch, jax.numpy.int32(0))
            out.append((np.asarray(jax.device_get(lp))[:len(datums), :max(lengths)], batch["input_ids"].shape))
        return out

    plain = logprobs(_qwen3_5_host(tmp_path, model_dir, "plain", data_parallel_shard_size=-1))
    split = logprobs(_qwen3_5_host(tmp_path, model_dir, "split", data_parallel_shard_size=2,
                                   ringattn_parallel_size=2, ulysses_parallel_size=2))
    assert [shape for _, shape in split] == [(2, 32), (2, 32)]  # 8 pieces of at least the conv's 3-token halo
    for (got, _), (want, _) in zip(split, plain):
        np.testing.assert_allclose(got, want, atol=2e-5)
