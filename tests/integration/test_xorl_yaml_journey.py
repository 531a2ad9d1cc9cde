"""A xorl user points the CLI at the YAML they already have, sectioned (xorl's local trainer) or flat (xorl's
training server), with only model.model_path changed to a local directory holding the model's config.json, and
plans the run with `--dry-run --fake-devices N`: the config is read with xorl's meaning (one line per translated
PyTorch value, one line naming the keys with no effect, the server's keys kept), the mesh is built from xorl's
sizes and the step compiles. Nothing is trained or written."""

import os
import subprocess
import sys

import pytest
import transformers

from test_config_xorl import LOCAL_DENSE, SERVER_DENSE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """config.json of a tiny Qwen3 written by transformers itself (no weights: the dry run needs none)."""
    path = tmp_path_factory.mktemp("tiny_qwen3")
    transformers.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=4096).save_pretrained(path)
    return str(path)


def _dry_runs(tmp_path, model_dir, runs):
    """Start every (name, yaml text, fake devices) dry run at once (each compiles on one core), then wait for all;
    returns {name: (stdout, stderr)}."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    procs = {}
    for name, text, devices in runs:
        work = tmp_path / name
        work.mkdir()
        (work / "xorl.yaml").write_text(text)
        # remat_policy and scan_layers fixed so the plan compiles one step, not every candidate of `auto`
        cmd = [sys.executable, "-m", "xorl_jax.train", "--config", "xorl.yaml", f"--model.model_path={model_dir}",
               "--train.remat_policy=full", "--model.scan_layers=true", "--dry-run", "--fake-devices", str(devices)]
        procs[name] = (work, subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True))
    out = {}
    for name, (work, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert not (work / "outputs").exists()  # nothing trained, nothing written
        out[name] = stdout, stderr
    return out


def test_xorl_yamls_dry_run_as_they_are(tmp_path, tiny_qwen3):
    out = _dry_runs(tmp_path, tiny_qwen3, [("local", LOCAL_DENSE, 8), ("server", SERVER_DENSE, 4)])

    stdout, stderr = out["local"]  # sectioned: xorl's examples/local/dummy/configs/full/qwen3_8b.yaml
    assert "'fsdp': 8" in stdout and "(cpu)" in stdout
    assert "256,000 tokens/step" in stdout  # 8 data-parallel rows of 32000 tokens (a multiple of 128)
    assert "model.attn_implementation 'flash_attention_3' -> auto" in stderr
    assert "train.ckpt_manager 'dcp' -> orbax" in stderr
    notes = [line for line in stderr.splitlines() if "no effect here" in line]
    assert len(notes) == 1 and "data.dataloader_pin_memory" in notes[0] and "train.init_device" in notes[0]

    stdout, stderr = out["server"]  # flat: xorl's examples/server/configs/full/qwen3_8b_full.yaml
    assert "'fsdp': 4" in stdout and "512,000 tokens/step" in stdout  # data_parallel_shard_size 4 x 128000 tokens
    assert "a flat config (xorl's server format) read into sections" in stderr
    kept = [line for line in stderr.splitlines() if "kept for the server mode" in line]
    assert len(kept) == 1 and "worker_connection_timeout" in kept[0] and "enable_packing" in kept[0]
