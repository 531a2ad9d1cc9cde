"""A xorl user starts the server on the flat server YAML they already have (xorl's
examples/server/configs/lora/qwen3_8b_lora.yaml, with only model_path pointed at a local tiny Qwen3) on 4 CPU
devices (its data_parallel_shard_size), and drives it with the tinker SDK for one step: the server says which of
the YAML's keys it uses and which have no effect, serves a LoRA tenant of the YAML's rank, trains one step and
samples. A setting it cannot serve as xorl means it (a config optimizer) is one line, exit 2."""

import os
import subprocess
import sys

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from server_utils import ROOT, V, Server, datum, tiny_hf  # noqa: E402
from tinker import types  # noqa: E402

# examples/server/configs/lora/qwen3_8b_lora.yaml (flat), comments left out
XORL_QWEN3_8B_LORA = """
model_path: Qwen/Qwen3-8B
tokenizer_path: Qwen/Qwen3-8B
attn_implementation: flash_attention_3
data_parallel_mode: fsdp2
ulysses_parallel_size: 1
data_parallel_replicate_size: 1
data_parallel_shard_size: 4
enable_mixed_precision: true
enable_gradient_checkpointing: true
enable_full_shard: true
enable_activation_offload: false
init_device: meta
output_dir: outputs/Qwen3-8B-server-lora-test
load_checkpoint_path: ""
ckpt_manager: dcp
log_level: INFO
worker_connection_timeout: 60.0
worker_max_retries: 3
sample_packing_sequence_len: 128000
enable_packing: true
enable_lora: true
lora_rank: 32
lora_alpha: 32
lora_target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
skip_initial_checkpoint: true
ce_mode: bi_fused
"""


def _yaml(tmp_path, model_dir, extra=""):
    path = tmp_path / "xorl.yaml"
    path.write_text(XORL_QWEN3_8B_LORA.replace("model_path: Qwen/Qwen3-8B", f"model_path: {model_dir}") + extra)
    return str(path)


def test_xorl_flat_server_yaml_serves_the_sdk(tmp_path):
    model_dir = str(tmp_path / "hf")
    tiny_hf(model_dir)
    server = Server(_yaml(tmp_path, model_dir), str(tmp_path), devices=4)  # the hub tokenizer: offline in tests
    try:
        server.wait()
        log = "".join(server.lines)
        assert "server keys used here: log_level" in log
        unused = next(line for line in server.lines if "server keys with no effect here" in line)
        for key in ("enable_packing", "skip_initial_checkpoint", "worker_connection_timeout", "worker_max_retries"):
            assert key in unused
        assert "no effect here: train.lr" in log  # each optim_step request's AdamParams set them

        tc = server.client().create_lora_training_client(base_model="hf", rank=32).result()
        info = tc.get_info()
        assert info.is_lora and info.lora_rank == 32
        rng = np.random.default_rng(0)
        batch = [datum(rng.integers(3, V, 12).tolist(), weights=np.ones(11)) for _ in range(4)]
        before = tc.forward(batch, "cross_entropy").result()
        lp0 = np.concatenate([o["logprobs"].to_numpy() for o in before.loss_fn_outputs])
        fb = tc.forward_backward(batch, "cross_entropy").result()
        np.testing.assert_allclose(fb.metrics["loss:sum"], -lp0.sum(), rtol=1e-5)  # cross_entropy: -sum(w * lp)
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        after = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
        assert after < fb.metrics["loss:sum"]  # the step trained the tenant's adapters on this batch

        sampler = tc.save_weights_and_get_sampling_client().result()
        res = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 2,
                             types.SamplingParams(max_tokens=4, temperature=1.0, seed=3, stop=[])).result()
        assert [len(s.tokens) for s in res.sequences] == [4, 4]
        assert all(np.all(np.isfinite(s.logprobs)) for s in res.sequences)
    finally:
        server.stop()


def test_a_config_optimizer_the_server_cannot_serve_is_one_line(tmp_path):
    """xorl's server trains with the config's Muon; this one steps with AdamW and each request's AdamParams, so a
    Muon config (xorl's qwen3_5_35b_a3b_ep*.yaml) is refused before anything loads."""
    cfg = _yaml(tmp_path, str(tmp_path / "nowhere"), "optimizer: muon\nmuon_lr: 0.02\n")
    r = subprocess.run([sys.executable, "-m", "xorl_jax.server", "--config", cfg, "--port", "0"],
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120,
                       cwd=str(tmp_path))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "train.optimizer muon" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
