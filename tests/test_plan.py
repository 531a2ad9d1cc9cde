"""Dry run (`python -m xorl_jax.train ... --dry-run`): mesh, shardings and the compiled train step from a config
alone, on the 8 fake CPU devices; and the trainer's own step traces under the mesh (expert parallelism active)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from xorl_jax.config import load_config
from xorl_jax.plan import dry_run
from xorl_jax.train import main

from test_trainer import DEMO_CONFIG, ROOT, demo_overrides, make_trainer


def demo_cfg(tmp_path, **train):
    return load_config(DEMO_CONFIG, demo_overrides(tmp_path, **train))


def test_dry_run_reports_exact_shards_and_expert_parallel_collectives(tmp_path):
    fsdp = dry_run(demo_cfg(tmp_path))
    ep = dry_run(demo_cfg(tmp_path, expert_parallel_size=4))
    assert fsdp.mesh["fsdp"] == 8 and ep.mesh["expert"] == 4 and ep.mesh["fsdp"] == 2
    assert fsdp.param_count == ep.param_count > 0
    # fp32 parameters, every large one sharded 8 ways under both presets (small ones may be replicated)
    assert fsdp.param_count * 4 / 8 <= fsdp.param_bytes_per_device < fsdp.param_count * 4 / 2
    assert fsdp.optimizer_bytes_per_device >= 2 * fsdp.param_bytes_per_device - 64  # mu and nu (+ a count)
    # EP adds the expert exchange (counts, tokens out, results back, and their transposes); XLA may also use an
    # all-to-all on its own (e.g. to move the embedding lookup from the table's sharding to the batch's)
    assert ep.collectives.get("all-to-all", 0) >= fsdp.collectives.get("all-to-all", 0) + 4
    assert fsdp.tokens_per_step == 4 * 8 * 2 * 128  # micro rows x data-parallel 8 x accumulation x seq
    text = "\n".join(ep.lines())
    assert "all-to-all" in text and "temporaries are only estimated on GPUs" in text


def test_dry_run_plans_the_trainers_usual_attention_layout(tmp_path, monkeypatch):
    """With cuDNN attention the dry run compiles the step the trainer compiles for rows of up to 8 documents, not
    the device-side choice among layouts (forced here on CPU; stopped before compiling, which needs a GPU)."""
    import xorl_jax.models.qwen3 as qwen3
    import xorl_jax.train_setup as train_setup

    class Stop(Exception):
        pass

    seen = {}

    def record(*args, doc_slots=None, **kwargs):
        seen["doc_slots"] = doc_slots
        raise Stop

    monkeypatch.setattr(qwen3, "resolve_attn_implementation", lambda name, dtype=None: "cudnn")
    monkeypatch.setattr(train_setup, "jit_train_step", record)
    with pytest.raises(Stop):
        dry_run(demo_cfg(tmp_path))
    assert seen == {"doc_slots": 8}


def test_dry_run_refuses_what_a_run_would_refuse(tmp_path):
    from xorl_jax.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="expert"):
        dry_run(demo_cfg(tmp_path, expert_parallel_size=3))  # 8 devices do not split into 3 expert ranks


def test_trainer_step_uses_expert_parallelism(tmp_path):
    """The trainer's jitted step traces under its mesh: with EP the all-to-all path runs (not one-device code)."""
    trainer = make_trainer(tmp_path, expert_parallel_size=4)
    batch = trainer._device_batch(next(trainer.train_iter))
    hlo = trainer.train_step.lower(trainer.state, batch).compile().as_text()
    assert "all-to-all" in hlo
    trainer.state, metrics = trainer.train_step(trainer.state, batch)
    assert np.isfinite(float(metrics["loss"]))


def test_cli_dry_run_on_fake_devices(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "xorl_jax.train", "--config", DEMO_CONFIG, *demo_overrides(tmp_path),
           "--train.expert_parallel_size=2", "--dry-run", "--fake-devices", "4"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'expert': 2" in out.stdout and "(cpu)" in out.stdout and "all-to-all" in out.stdout
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing trained, nothing written


@pytest.mark.parametrize("args,needle", [(["--fake-devices", "0", "--dry-run"], "positive device count"),
                                         (["--fake-devices", "8"], "only goes with --dry-run")])
def test_cli_dry_run_flag_errors(args, needle, capsys):
    assert main(["--config", DEMO_CONFIG, *args]) == 2
    assert needle in capsys.readouterr().err
