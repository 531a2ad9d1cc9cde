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
