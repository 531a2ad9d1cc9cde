"""Dry run (`python -m xorl_jax.train ... --dry-run`): mesh, shardings and the compiled train step from a config
alone, on the 8 fake CPU devices (full fine-tuning and LoRA; GPU-only kernels planned with their jnp references);
and the trainer's own step traces under the mesh (expert parallelism active)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from xorl_jax.config import ConfigError, load_config
from xorl_jax.plan import dry_run
from xorl_jax.train import main

from test_trainer import DEMO_CONFIG, DEMO_DIR, ROOT, demo_overrides, make_trainer


def demo_cfg(tmp_path, *extra, **train):
    return load_config(DEMO_CONFIG, [*demo_overrides(tmp_path, **train), *extra])


def lora_args(model_dir):
    """LoRA on a model directory holding only config.json: the dry run reads no weights."""
    return [f"--model.model_path={model_dir}", "--model.config_path=", "--train.init_from=hf",
            "--lora.enable_lora=true"]


def dense_model_dir(tmp_path):
    """The demo model's config as a dense Qwen3 (no experts)."""
    with open(os.path.join(DEMO_DIR, "config.json")) as f:
        hf = json.load(f)
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                "mlp_only_layers", "router_aux_loss_coef", "output_router_logits"):
        hf.pop(key, None)
    hf.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    path = tmp_path / "dense"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf))
    return str(path)


def test_dry_run_reports_exact_shards_and_expert_parallel_collectives(tmp_path):
    fsdp = dry_run(demo_cfg(tmp_path))
    # moe_implementation triton on CPU: planned with the grouped GEMM's jnp reference, same shapes and exchange
    ep = dry_run(demo_cfg(tmp_path, "--model.moe_implementation=triton", expert_parallel_size=4))
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
    assert "all-to-all" in text and "moe=triton (planned with its jnp reference on CPU)" in text
    # XLA's memory analysis of the CPU program: arguments hold at least the state; on CPU the verdict uses the estimate
    # for a GPU (parameters, gradients, optimizer state + activations)
    assert ep.memory["argument"] >= ep.param_bytes_per_device + ep.optimizer_bytes_per_device and ep.memory["temp"] > 0
    state = 2 * ep.param_bytes_per_device + ep.optimizer_bytes_per_device
    assert ep.peak == ep.estimated_peak > ep.state_bytes == state
    assert ep.fits and "fits      yes" in text and "80 GiB H100" in text and "estimate  ~" in text


def test_dry_run_plans_the_trainers_usual_attention_layout(tmp_path, monkeypatch):
    """With cuDNN attention the dry run compiles the step the trainer compiles for rows of up to 8 documents, not
    the device-side choice among layouts (forced here on CPU; stopped before compiling, which needs a GPU)."""
    import xorl_jax.models.qwen3 as qwen3
    import xorl_jax.plan as plan

    class Stop(Exception):
        pass

    seen = {}

    def record(*args, attention_layout=None, **kwargs):
        seen["slots"] = attention_layout.slots
        raise Stop

    monkeypatch.setattr(qwen3, "resolve_attn_implementation", lambda name, dtype=None: "cudnn")
    monkeypatch.setattr(plan, "jit_train_step", record)
    with pytest.raises(Stop):
        dry_run(demo_cfg(tmp_path))
    assert seen == {"slots": 8}


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


def test_cli_dry_run_moe_lora_with_gpu_kernels_on_fake_devices(tmp_path):
    """A LoRA config for an MoE model with GPU-only kernels (Triton experts, cuDNN attention) planned through the CLI
    on 4 fake CPU devices with expert parallelism: the kernels' jnp references stand in, and the plan says so."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "xorl_jax.train", "--config", DEMO_CONFIG, *demo_overrides(tmp_path),
           *lora_args(DEMO_DIR), "--model.moe_implementation=triton", "--model.attn_implementation=cudnn",
           "--model.dtype=bfloat16", "--model.param_dtype=bfloat16", "--train.expert_parallel_size=2",
           "--dry-run", "--fake-devices", "4"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "'expert': 2" in lines["dry"] and "(cpu)" in lines["dry"] and "all-to-all" in lines["collectives"]
    assert "attention=cudnn (planned with its jnp reference on CPU)" in lines["backends"]
    assert "moe=triton (planned with its jnp reference on CPU)" in lines["backends"]
    # adapters on the routed experts (xorl's gate/up/down names on MoE layers) and attention; the base frozen in bf16
    assert "mlp.experts.gate_proj" in lines["lora"] and "self_attn.q_proj" in lines["lora"]
    assert "frozen (bfloat16)" in lines["lora"]
    assert "frozen base" in lines["per"] and "gradients" in lines["per"] and "(adapters)" in lines["per"]
    assert "XLA's memory analysis of this CPU program" in lines["compiled"] and "temporaries" in lines["compiled"]
    assert "on a GPU" in lines["estimate"] and "merged LoRA weights" in lines["estimate"]
    assert lines["fits"].startswith("fits      yes") and "80 GiB H100" in lines["fits"]
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing trained, nothing written


def test_dense_lora_dry_run_through_main(tmp_path, monkeypatch, capsys):
    """A dense LoRA config through the CLI's main() (in-process, on the 8 fake devices): optimizer state for the
    adapters only, the base frozen in bf16. Here the backend's memory analysis is withheld, so the peak is the estimate,
    and a 1 MiB GPU does not fit it."""
    import xorl_jax.autotune as autotune
    import xorl_jax.plan as plan

    reports = []

    def recording(*args, **kwargs):
        reports.append(dry_run(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(plan, "dry_run", recording)
    monkeypatch.setattr(autotune, "memory_of", lambda compiled: {})
    argv = ["--config", DEMO_CONFIG, *demo_overrides(tmp_path), *lora_args(dense_model_dir(tmp_path)),
            "--model.param_dtype=bfloat16", "--lora.lora_rank=4", "--dry-run", "--device-memory-gib", "0.001"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = reports[0]
    assert report.model_type == "qwen3" and "moe=" not in report.backends
    # rank-4 pairs (fp32) on q, k, v, o, gate, up, down of 2 layers: D 128, q/o 4 x 32, k/v 2 x 32, F 256
    D, Q, KV, F, r = 128, 128, 64, 256, 4
    adapters = 2 * r * ((D + Q) + 2 * (D + KV) + (Q + D) + 2 * (D + F) + (F + D))
    assert report.trainable_bytes_per_device == 4 * adapters  # the layer-stacked pairs are not sharded
    assert 2 * 4 * adapters <= report.optimizer_bytes_per_device <= 2 * 4 * adapters + 64  # mu and nu (+ a count)
    frozen = report.param_bytes_per_device - report.trainable_bytes_per_device
    assert report.param_count * 2 / 8 <= frozen < report.param_count * 2 / 2  # bf16 base, sharded over fsdp 8
    state = report.param_bytes_per_device + report.trainable_bytes_per_device + report.optimizer_bytes_per_device
    assert report.memory == {} and report.peak == report.estimated_peak > state
    assert report.lora_merge_bytes > 0 and not report.fits
    assert "reports no memory analysis" in out and "fits      NO (estimate)" in out
    assert "--device-memory-gib 0.001" in out
    assert f"lora      rank {r}" in out and "self_attn.q_proj" in out and "mlp.gate_proj" in out


def test_dry_run_lora_adapters_are_the_trainers(tmp_path):
    """The dry run's abstract adapters have the shapes, dtypes and shardings init_lora gives the trainer's."""
    from flax import nnx

    from xorl_jax import lora as lora_lib
    from xorl_jax.models.loading import abstract_model
    from xorl_jax.parallel import rules as rules_lib
    from xorl_jax.train_setup import model_and_mesh

    cfg = demo_cfg(tmp_path, *lora_args(DEMO_DIR), "--lora.lora_rank=4",
                   "--lora.lora_target_modules=[qkv_proj, up_proj]", expert_parallel_size=2)
    _, cls, mcfg, options, mesh, rules = model_and_mesh(cfg)
    with rules_lib.use_mesh(mesh, rules):
        params = nnx.state(abstract_model(cls, mcfg, options))
    targets = lora_lib.lora_targets(params, cfg.lora)
    planned = lora_lib.abstract_lora(params, targets, 4, mesh=mesh, rules=rules)
    real = lora_lib.init_lora(params, targets, 4, mesh=mesh, rules=rules)
    assert jax.tree.structure(planned) == jax.tree.structure(real)
    for p, x in zip(jax.tree.leaves(planned), jax.tree.leaves(real)):
        assert (p.shape, p.dtype) == (x.shape, x.dtype) and p.sharding.is_equivalent_to(x.sharding, x.ndim)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(planned))  # expert pairs split over EP


def test_gpu_kernels_planned_with_their_references():
    """On CPU every GPU kernel a run would take is replaced by its jnp reference and named; settings a GPU refuses
    are refused."""
    import dataclasses

    from xorl_jax.models.common import ModelOptions
    from xorl_jax.models.loading import build_config
    from xorl_jax.plan import plan_backends

    with open(os.path.join(ROOT, "xorl_jax", "assets", "demo_qwen3_5_moe", "config.json")) as f:
        _, hybrid = build_config(json.load(f))
    opts = ModelOptions(dtype="bfloat16", gdn_implementation="pallas", attn_implementation="auto")
    planned, line = plan_backends(opts, hybrid, "cpu")
    assert (planned.attn_implementation, planned.moe_implementation, planned.gdn_implementation) == (
        "xla", "reference", "chunked")
    assert line == ("attention=auto (cudnn on a GPU; planned with its jnp reference on CPU), moe=auto (triton on a GPU "
                    "with jax-triton; planned with its jnp reference on CPU), gdn=pallas (planned with its chunked jnp "
                    "reference on CPU)")
    kept, line = plan_backends(dataclasses.replace(opts, dtype="float32", moe_implementation="native",
                                                   gdn_implementation="chunked"), hybrid, "cpu")
    assert (kept.attn_implementation, kept.moe_implementation, kept.gdn_implementation) == ("xla", "native", "chunked")
    assert line == "attention=auto (xla), moe=native, gdn=chunked"
    with pytest.raises(ConfigError, match="cudnn.*bfloat16"):
        plan_backends(dataclasses.replace(opts, dtype="float32", attn_implementation="cudnn"), hybrid, "cpu")


@pytest.mark.parametrize("args,needle", [(["--fake-devices", "0", "--dry-run"], "positive device count"),
                                         (["--fake-devices", "8"], "only goes with --dry-run")])
def test_cli_dry_run_flag_errors(args, needle, capsys):
    assert main(["--config", DEMO_CONFIG, *args]) == 2
    assert needle in capsys.readouterr().err
