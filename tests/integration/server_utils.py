"""What the server tests share: a tiny HF Qwen3 checkpoint, a `python -m xorl_jax.server` subprocess on localhost
(ready once it prints its address) and Tinker datums."""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from xorl_jax.data.demo import DEMO_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = 768


def tiny_hf(path, **config):
    """A 2-layer Qwen3 (vocab V) saved by transformers with the demo tokenizer beside it; returns the torch model."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**{
        "vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "tie_word_embeddings": False,
        "eos_token_id": 2, **config}))
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO_DIR, f), path)
    return model


def hf_logprobs(hf, tokens):
    """The torch model's log-probabilities of tokens[1:] after tokens[:-1] (float64)."""
    with torch.no_grad():
        logits = hf(torch.tensor([tokens[:-1]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()


def datum(tokens, **inputs):
    from tinker import types

    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], np.int64),
                                       **{k: np.asarray(v, np.float32) for k, v in inputs.items()}})


class Server:
    """`python -m xorl_jax.server --config cfg --port 0 [args]` in `cwd` on `devices` fake CPU devices; its output
    lines are collected in `lines`; `wait()` returns once it serves (or fails the test with its last lines)."""

    def __init__(self, cfg, cwd, api_key: str | None = None, devices: int = 1, args=()):
        env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        env.pop("XORL_JAX_API_KEY", None)
        if api_key:
            env["XORL_JAX_API_KEY"] = api_key
        self.proc = subprocess.Popen([sys.executable, "-m", "xorl_jax.server", "--config", cfg, "--port", "0",
                                      *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=cwd)
        self.lines, self.port = [], None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.key = api_key or "tml-no-key-needed-here"

    def _read(self):
        for line in self.proc.stdout:  # read to the end: a full pipe would block the server's logging
            self.lines.append(line)
            m = re.search(r"server ready on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self.ready.set()
        self.ready.set()

    def wait(self):
        assert self.ready.wait(180), "server did not start"
        assert self.port, "server exited:\n" + "".join(self.lines[-30:])
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def client(self):
        import tinker

        return tinker.ServiceClient(base_url=self.url, api_key=self.key)

    def raw(self, method, path, body=b"", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {"X-API-Key": self.key, "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, (json.loads(data) if data and r.getheader("Content-Type") == "application/json" else data)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
