"""A client drives `python -m xorl_jax.server` with the real `tinker` SDK (the `tinker` test extra), as an RL or SFT
script would: a LoRA server (two tenants, an API key) and a full-weight server, each in its own subprocess on
localhost, both on a 2-layer Qwen3 made with transformers.

Checked: forward logprobs equal HF transformers' for the same tokens and every loss equals its documented formula
on them (and cross_entropy the trainer's own loss); gradients accumulated over two forward_backward calls then one
step equal one step on both batches at once; save / list / load / sample-from-path round trips; sampled tokens'
logprobs equal the forward's; tenants do not disturb each other; malformed requests get a 4xx naming the field and
the server keeps serving; a non-local bind without an API key is refused."""

import http.client
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from server_utils import ROOT, V, Server, datum, hf_logprobs, tiny_hf  # noqa: E402
from tinker import types  # noqa: E402

from xorl_jax.data.demo import DEMO_DIR  # noqa: E402

KEY = "tml-test-key-0123456789"


def _server(tmp, name, lora: bool, api_key: str | None) -> Server:
    cfg = os.path.join(tmp, f"{name}.yaml")
    with open(cfg, "w") as f:
        f.write(f"model:\n  model_path: {tmp}/hf\n  dtype: float32\n  param_dtype: float32\n"
                f"train:\n  output_dir: {tmp}/{name}\n"
                + ("lora:\n  enable_lora: true\n  lora_rank: 4\n  lora_alpha: 8\n" if lora else ""))
    return Server(cfg, tmp, api_key, args=("--max-request-mb", "1"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("server"))
    hf = tiny_hf(os.path.join(tmp, "hf"))
    servers = {"lora": _server(tmp, "lora", True, KEY), "full": _server(tmp, "full", False, None)}
    try:
        for s in servers.values():
            s.wait()
        yield {"tmp": tmp, "hf": hf.eval(), **servers}
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="module")
def full_model(env):
    """The full-weight server's one model (it holds one)."""
    sc = env["full"].client()
    return sc, sc.create_lora_training_client(base_model="hf", rank=4).result()  # rank ignored: all weights


def _formula(loss, lp, q, adv, w, cfg):
    r = np.exp(lp - q)
    if loss == "cross_entropy":
        return -(lp * w).sum()
    if loss == "importance_sampling":
        return -(r * adv).sum()
    if loss == "ppo":
        return -np.minimum(r * adv, np.clip(r, cfg.get("clip_low_threshold", 0.8),
                                            cfg.get("clip_high_threshold", 1.2)) * adv).sum()
    if loss == "cispo":
        return -(np.clip(r, cfg.get("clip_low_threshold", 0.0), cfg.get("clip_high_threshold", 4.0)) * lp * adv).sum()
    if loss == "dro":
        return -(lp * adv - 0.5 * cfg.get("beta", 1.0) * (lp - q) ** 2).sum()


def test_losses_match_hf_logprobs_and_formulas(env):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, V, n).tolist() for n in (9, 14, 6)]
    tc = env["lora"].client().create_lora_training_client(base_model="hf", rank=4).result()
    hf_lp = [hf_logprobs(env["hf"], s) for s in seqs]
    ce = tc.forward([datum(s, weights=np.ones(len(s) - 1)) for s in seqs], "cross_entropy").result()
    for lp, out in zip(hf_lp, ce.loss_fn_outputs):  # LoRA B starts at 0: the base model's logprobs
        np.testing.assert_allclose(out["logprobs"].to_numpy(), lp, atol=2e-4)
    for loss, cfg in (("cross_entropy", {}), ("importance_sampling", {}), ("ppo", {}),
                      ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}), ("cispo", {}),
                      ("dro", {"beta": 0.3})):
        data, want = [], 0.0
        for s, lp in zip(seqs, hf_lp):
            n = len(s) - 1
            q = lp + rng.normal(0, 0.3, n)
            adv, w = rng.normal(0, 1, n), (rng.random(n) > 0.3).astype(np.float64)
            if loss == "cross_entropy":
                data.append(datum(s, weights=w))
            else:
                data.append(datum(s, logprobs=q, advantages=adv))
                w = np.ones(n)
            want += _formula(loss, lp, q.astype(np.float32), adv.astype(np.float32), w, cfg)
        got = tc.forward_backward(data, loss, cfg or None).result().metrics["loss:sum"]
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=f"{loss} {cfg}")


def test_cross_entropy_equals_trainer_loss(env, full_model):
    """The server's cross_entropy on the full-weight model is the trainer's own summed token loss."""
    import jax.numpy as jnp
    from flax import nnx

    from xorl_jax.checkpoint.orbax import load_model
    from xorl_jax.models.common import ModelOptions
    from xorl_jax.train_step import IGNORE_INDEX, LossConfig, forward_loss

    rng = np.random.default_rng(1)
    s = rng.integers(3, V, 12).tolist()
    w = (rng.random(11) > 0.4).astype(np.float32)
    _, tc = full_model
    batch = [datum(s, weights=w)] + [datum(s, weights=np.zeros(11))] * 3  # the batch size the other tests use
    got = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    model = load_model(os.path.join(env["tmp"], "hf"), ModelOptions(dtype="float32", param_dtype="float32"))
    graphdef, params = nnx.split(model)
    labels = np.where(w > 0, np.asarray(s[1:]), IGNORE_INDEX)
    micro = {"input_ids": jnp.asarray([s[:-1]]), "labels": jnp.asarray([labels]),
             "positions": jnp.arange(11)[None], "segment_ids": jnp.ones((1, 11), jnp.int32)}
    loss_sum, _, _ = forward_loss(graphdef, params, micro, LossConfig(compute_dtype=jnp.float32))
    np.testing.assert_allclose(got, float(loss_sum), rtol=1e-5)


def test_accumulate_then_step_equals_one_step_and_state_round_trip(env, full_model):
    rng = np.random.default_rng(2)
    d1 = [datum(rng.integers(3, V, 10).tolist(), weights=np.ones(9)) for _ in range(2)]
    d2 = [datum(rng.integers(3, V, 7).tolist(), weights=np.ones(6)) for _ in range(2)]
    probe = [datum(rng.integers(3, V, 8).tolist(), weights=np.ones(7)) for _ in range(4)]
    sc, tc = full_model
    assert not tc.get_info().is_lora
    start = tc.save_state("start").result().path
    adam = types.AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1)
    tc.forward_backward(d1, "cross_entropy").result()
    tc.forward_backward(d2, "cross_entropy").result()
    tc.optim_step(adam).result()
    split = tc.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    rest = sc.create_rest_client()
    paths = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert start in paths
    info = rest.get_weights_info_by_tinker_path(start).result()
    assert info.base_model == "hf" and not info.is_lora
    tc.load_state_with_optimizer(start).result()
    before = tc.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert not np.allclose(before, split, atol=1e-4)  # the step changed the model; the load undid it
    tc.forward_backward(d1 + d2, "cross_entropy").result()
    tc.optim_step(adam).result()
    joint = tc.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(split, joint, atol=1e-5)
    with pytest.raises(Exception, match="only one|all weights of one model"):
        sc.create_lora_training_client(base_model="hf", rank=4).result()


def test_sampling_logprobs_and_tenants_and_saved_weights(env):
    sc = env["lora"].client()
    a = sc.create_lora_training_client(base_model="hf", rank=4, seed=5).result()
    b = sc.create_lora_training_client(base_model="hf", rank=4, seed=5).result()
    rng = np.random.default_rng(3)
    probe = [datum(rng.integers(3, V, 9).tolist(), weights=np.ones(8)) for _ in range(4)]
    b_before = b.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    train = [datum(rng.integers(3, V, 12).tolist(), weights=np.ones(11)) for _ in range(4)]
    for _ in range(3):
        a.forward_backward(train, "cross_entropy").result()
        a.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    a_after = a.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    b_after = b.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_array_equal(b_before, b_after)  # A's steps left B alone
    assert np.abs(a_after - b_before).max() > 1e-3

    sampler = a.save_weights_and_get_sampling_client().result()
    prompt = rng.integers(3, V, 5).tolist()
    res = sampler.sample(types.ModelInput.from_ints(prompt), 3,
                         types.SamplingParams(max_tokens=6, temperature=1.0, seed=11, stop=[])).result()
    assert len(res.sequences) == 3 and all(len(s.tokens) == 6 and s.stop_reason == "length" for s in res.sequences)
    fulls = [prompt + list(s.tokens) for s in res.sequences]
    fwd = a.forward([datum(f, weights=np.ones(len(f) - 1)) for f in fulls], "cross_entropy").result()
    for s, out in zip(res.sequences, fwd.loss_fn_outputs):
        np.testing.assert_allclose(s.logprobs, out["logprobs"].to_numpy()[len(prompt) - 1:], atol=2e-4)

    path = a.save_weights_for_sampler("a-sampler").result().path
    from_path = sc.create_sampling_client(model_path=path)
    res2 = from_path.sample(types.ModelInput.from_ints(prompt), 3,
                            types.SamplingParams(max_tokens=6, temperature=1.0, seed=11, stop=[])).result()
    assert [s.tokens for s in res2.sequences] == [s.tokens for s in res.sequences]

    saved = a.save_state("a-state").result().path
    c = sc.create_training_client_from_state_with_optimizer(saved).result()
    c_lp = c.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(c_lp, a_after, atol=1e-6)
    listed = [x.tinker_path for x in sc.create_rest_client().list_checkpoints(a.model_id).result().checkpoints]
    assert set(listed) == {path, saved}

    sc.close("success").result()  # a finished session's models are dropped; their saved weights stay
    body = json.dumps({"model_id": a.model_id}).encode()
    for _ in range(100):
        if env["lora"].raw("POST", "/api/v1/get_info", body)[0] == 404:
            break
        time.sleep(0.1)
    assert env["lora"].raw("POST", "/api/v1/get_info", body)[0] == 404
    code, out = env["lora"].raw("POST", "/api/v1/weights_info", json.dumps({"tinker_path": saved}).encode())
    # the SDK asked for train_unembed (its default); the head has no adapter here, and the save says so
    assert code == 200 and out["is_lora"] and out["train_unembed"] is False


def test_malformed_requests_get_4xx_naming_the_field(env):
    s = env["lora"]
    status, body = s.raw("POST", "/api/v1/create_session", b"{not json")
    assert status == 400 and "not valid JSON" in body["detail"]
    status, body = s.raw("POST", "/api/v1/create_model", json.dumps({"session_id": 3}).encode())
    assert status == 400 and body["detail"].startswith("session_id: expected str")
    sid = s.raw("POST", "/api/v1/create_session", b"{}")[1]["session_id"]
    status, body = s.raw("POST", "/api/v1/create_model",
                         json.dumps({"session_id": sid, "model_seq_id": 0, "base_model": "hf",
                                     "lora_config": {"rank": "big"}}).encode())
    assert status == 400 and body["detail"].startswith("lora_config.rank: expected int")
    status, body = s.raw("POST", "/api/v1/forward_backward", b"\x1a\xff\xff",
                         {"Content-Type": "application/x-protobuf"})  # field 3 (data) runs past the end
    assert status == 400 and body["detail"].startswith("ForwardBackwardRequest.3")
    status, body = s.raw("POST", "/api/v1/optim_step",
                         json.dumps({"model_id": "x", "adam_params": {"learning_rate": -1}}).encode())
    assert status == 400 and body["detail"].startswith("adam_params.learning_rate")
    status, body = s.raw("POST", "/api/v1/asample", json.dumps({"sampling_session_id": "nope"}).encode())
    assert status == 404 and body["detail"].startswith("sampling_session_id")
    status, body = s.raw("POST", "/api/v1/save_weights", json.dumps({"model_id": "m", "path": "../x"}).encode())
    assert status == 400 and body["detail"].startswith("path:")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)  # a body over --max-request-mb: refused
    conn.putrequest("POST", "/api/v1/create_session")  # unread, from its Content-Length alone
    conn.putheader("Content-Length", str(2 * 2**20))
    conn.putheader("X-API-Key", s.key)
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    status, body = s.raw("GET", "/api/v1/nothing")
    assert status == 404
    status, body = s.raw("GET", "/api/v1/healthz", headers={"X-API-Key": "tml-wrong-key-000000"})
    assert status == 401 and "X-API-Key" in body["detail"]
    status, body = s.raw("POST", "/api/v1/retrieve_future", json.dumps({"request_id": "gone"}).encode())
    assert status == 404 and body["detail"].startswith("request_id")
    # a bad datum inside a well-formed request: refused before it is queued, named by index and input
    tc = s.client().create_lora_training_client(base_model="hf", rank=4).result()
    bad = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                      loss_fn_inputs={"target_tokens": np.array([6, 7], np.int64), "weights": np.ones(2, np.float32)})
    shape_error = r"data\[0\].loss_fn_inputs.(target_tokens|weights): shape \[2\], expected \[3\]"
    with pytest.raises(Exception, match=shape_error):
        tc.forward([bad], "cross_entropy").result()
    assert s.raw("GET", "/api/v1/healthz")[0] == 200  # still serving


def test_non_local_bind_needs_api_key_and_a_free_port(env):
    cfg = os.path.join(env["tmp"], "full.yaml")
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.pop("XORL_JAX_API_KEY", None)
    r = subprocess.run([sys.executable, "-m", "xorl_jax.server", "--config", cfg, "--host", "0.0.0.0"], env=e,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "API key" in r.stderr
    # a port that cannot be listened on is one line before the model loads: out of range, or taken
    for port in ("99999", str(env["lora"].port)):
        r = subprocess.run([sys.executable, "-m", "xorl_jax.server", "--config", cfg, "--port", port], env=e,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and port in r.stderr, \
            r.stderr[-2000:]


def test_rl_demo_script_runs_against_the_server(env):
    """scripts/rl_demo.py (the README's RL demo client) end to end for two tiny iterations: it reaches the
    server, samples, scores held-out questions and prints its summary (a random model: the numbers mean nothing)."""
    s = env["lora"]
    # the client formats questions with the tokenizer's chat template (the demo's; the server's model has none)
    shutil.copy(os.path.join(DEMO_DIR, "chat_template.jinja"), os.path.join(env["tmp"], "hf"))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "rl_demo.py"), "--base-url", s.url, "--api-key", s.key,
         "--base-model", "hf", "--rank", "4", "--iterations", "2", "--prompts", "2", "--group", "2", "--eval", "2",
         "--eval-samples", "1", "--reward", "close"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT), cwd=env["tmp"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "iteration 2: train reward" in out.stdout
    assert "held-out exact match (greedy / sampled at temperature 1)" in out.stdout
