"""The training loop end to end on CPU with the embedded demo (tiny Qwen3-MoE, arithmetic chat data): loss falls,
gradient accumulation is exact, resume is bitwise, non-finite steps are skipped then stop the run, bad input
exits 2 with one line."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from xorl_jax.config import load_config
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.qwen3 import Qwen3Config, Qwen3MoeForCausalLM
from xorl_jax.train import main
from xorl_jax.train_step import LossConfig, TrainState, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")


def demo_overrides(out_dir, **train):
    base = {
        "model.config_path": DEMO_DIR, "model.tokenizer_path": DEMO_DIR,
        "data.datasets": f"[{{path: {DEMO_DIR}/train.jsonl, type: messages}}]",
        "data.eval_datasets": f"[{{path: {DEMO_DIR}/eval.jsonl, type: messages}}]",
        "data.sample_packing_sequence_len": 128, "train.output_dir": str(out_dir),
        "train.micro_batch_size": 4, "train.gradient_accumulation_steps": 2, "train.max_steps": 6,
        "train.save_steps": 0, "train.save_hf_weights": False, "train.log_steps": 1,
    }
    base.update({f"train.{k}": v for k, v in train.items()})
    return [f"--{k}={v}" for k, v in base.items()]


def make_trainer(out_dir, **train):
    from xorl_jax.trainer import Trainer

    return Trainer(load_config(DEMO_CONFIG, demo_overrides(out_dir, **train)))


def flat_params(state):
    return {path: np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(state.params)}


def test_demo_training_loss_falls_and_exports(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=12, save_hf_weights=True)
    # Adam moments live where their parameter lives (8 fake devices here): never silently replicated.
    same = optax.tree_map_params(trainer.optimizer, lambda m, p: m.sharding == p.sharding,
                                 trainer.state.opt_state, trainer.state.params, transform_non_params=lambda _: None)
    same = [x for x in jax.tree.leaves(same) if x is not None]
    assert len(same) == 2 * len(jax.tree.leaves(trainer.state.params)) and all(same)  # mu and nu
    assert any(not p.sharding.is_fully_replicated for p in jax.tree.leaves(trainer.state.params))
    result = trainer.train()
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in open(tmp_path / "metrics.jsonl") if '"loss": ' in line]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 1.0, losses
    assert np.isfinite(result["eval_loss"]) and result["eval_tokens"] > 0
    # what a user waits for: the process's age at the first step includes the set-up before the loop
    assert result["process_age_at_first_step_s"] > result["time_to_first_step_s"] > 0
    hf_dir = tmp_path / "global_step_12" / "hf_ckpt"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(hf_dir))


def test_resume_is_bitwise(tmp_path):
    full = make_trainer(tmp_path / "full", save_steps=3, save_async=True)
    full.train()
    expected = flat_params(full.state)
    # A second run that starts from the step-3 checkpoint of the first must end on the same bits (resuming from
    # the output_dir's newest checkpoint is the default).
    resumed_dir = tmp_path / "resumed"
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "3", resumed_dir / "checkpoints" / "3")
    resumed = make_trainer(resumed_dir)
    result = resumed.train()
    assert result["step"] == 6
    got = flat_params(resumed.state)
    assert got.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=jax.tree_util.keystr(path))


def test_next_step_is_dispatched_before_metrics_are_read_except_at_saves(tmp_path, monkeypatch):
    import xorl_jax.trainer as trainer_lib

    trainer = make_trainer(tmp_path, save_steps=3, eval_steps=0, save_at_end=True)
    events, dispatched = [], []
    step_fn = trainer.engine.train_step

    def recording_step(batch):
        dispatched.append(len(dispatched) + 1)
        events.append(f"d{dispatched[-1]}")
        return step_fn(batch)

    real_get = jax.device_get

    def recording_get(x):
        out = real_get(x)
        if isinstance(out, dict) and "finite" in out:
            events.append(f"r{int(out['step'])}")
        return out

    real_save = trainer.save
    monkeypatch.setattr(trainer.engine, "train_step", recording_step)
    monkeypatch.setattr(trainer, "save", lambda step, **kw: (events.append(f"S{step}"), real_save(step, **kw))[1])
    monkeypatch.setattr(trainer_lib.jax, "device_get", recording_get)
    trainer.train()
    # step N+1 is on its way while N's metrics are read; before the save at 3 and at the end nothing is in flight
    assert events == ["d1", "d2", "r1", "d3", "r2", "r3", "S3", "d4", "d5", "r4", "d6", "r5", "r6", "S6"]


def test_nonfinite_steps_stop_the_run_without_saving(tmp_path, capsys):
    from xorl_jax.trainer import TrainingStopped

    trainer = make_trainer(tmp_path, max_nonfinite_steps=2, save_steps=1)
    poisoned = jax.tree.map(lambda x: x * jnp.nan, trainer.state.params)
    trainer.state = trainer.state.replace(params=poisoned)
    n_params = len(jax.tree.leaves(poisoned))
    with pytest.raises(TrainingStopped, match="2 non-finite steps"):
        trainer.train()
    out = capsys.readouterr()
    skipped = [line for line in (out.out + out.err).splitlines() if "update skipped" in line]
    assert len(skipped) == 2, skipped
    assert f"loss nan, non-finite gradients in {n_params} of {n_params} parameters: embed_tokens" in skipped[0], skipped
    assert int(trainer.state.skipped_total) == 2 and int(trainer.state.step) == 0
    assert not trainer.checkpointer.manager.all_steps()
    startup = [line for line in out.out.splitlines() if line.startswith("startup ")]  # time-to-first-step breakdown
    assert len(startup) == 1 and all(f"{part} " in startup[0] for part in ("model", "data", "optimizer")), startup


def tiny_moe():
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=48, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)
    return Qwen3MoeForCausalLM(cfg, ModelOptions(dtype="float32", moe_implementation="eager"), rngs=nnx.Rngs(0))


def packed_rows(rng, rows, length):
    """Rows of two documents each with a loss on a random subset of tokens (uneven valid counts per row)."""
    ids = rng.integers(0, 64, (rows, length)).astype(np.int32)
    labels = np.where(rng.random((rows, length)) < 0.6, rng.integers(0, 64, (rows, length)), -100).astype(np.int32)
    cut = length // 3
    positions = np.concatenate([np.arange(cut), np.arange(length - cut)])[None].repeat(rows, 0).astype(np.int32)
    segments = np.concatenate([np.ones(cut), 2 * np.ones(length - cut)])[None].repeat(rows, 0).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "positions": positions, "segment_ids": segments}


def step_state_batch(model, rows, n_micro, optimizer):
    """The jitted train step of `model`, its initial state and `rows` as n_micro micro-batches."""
    graphdef, params = nnx.split(model)
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    state = TrainState(step=zero(), params=params, opt_state=optimizer.init(params), nonfinite_streak=zero(),
                       skipped_total=zero())
    step = jax.jit(make_train_step(graphdef, optimizer, LossConfig(aux_loss_coef=0.0, ce_chunk_size=32,
                                                                   compute_dtype=jnp.float32)))
    batch = {k: jnp.asarray(v.reshape(n_micro, -1, *v.shape[1:])) for k, v in rows.items()}
    return step, state, batch


def one_step(model, rows, n_micro, optimizer):
    step, state, batch = step_state_batch(model, rows, n_micro, optimizer)
    return step(state, batch)


def test_gradient_accumulation_equals_one_big_batch():
    rows = packed_rows(np.random.default_rng(0), 8, 24)
    sgd = optax.sgd(1.0)
    big, m_big = one_step(tiny_moe(), rows, 1, sgd)
    acc, m_acc = one_step(tiny_moe(), rows, 4, sgd)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_big["grad_norm"]), rtol=1e-5)
    assert not np.asarray(m_big["nonfinite_grads"]).any()
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(acc.params), jax.tree.leaves(big.params)):
        # Without the aux loss (a per-micro-batch statistic, as in HF) accumulation is exact up to fp32 order.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_nonfinite_step_changes_only_counters():
    rows = packed_rows(np.random.default_rng(1), 4, 16)
    model = tiny_moe()
    graphdef, params = nnx.split(model)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf) if x.ndim else x, params)
    new, metrics = one_step(nnx.merge(graphdef, bad), rows, 2, optax.adamw(1e-3))
    assert not bool(metrics["finite"])
    # every leaf was poisoned, so every gradient is flagged (the trainer names them in its log line)
    assert np.asarray(metrics["nonfinite_grads"]).tolist() == [True] * len(jax.tree.leaves(params))
    assert int(new.step) == 0 and int(new.nonfinite_streak) == 1 and int(new.skipped_total) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(bad)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_has_no_conditional_and_flags_the_non_finite_leaf():
    """The skip-on-non-finite bookkeeping adds no conditional to the step (on a GPU the host would wait for its
    predicate, i.e. for the whole backward pass), and each gradient leaf is flagged on its own."""
    step, state, batch = step_state_batch(tiny_moe(), packed_rows(np.random.default_rng(2), 4, 16), 1,
                                          optax.sgd(1.0))
    params = state.params
    assert "conditional(" not in step.lower(state, batch).compile().as_text()
    # A head scaled by 1e30: its own gradient (hidden states times softmax errors) stays finite, every gradient
    # behind it overflows; the flags tell them apart.
    leaves = jax.tree.leaves(params)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    head = next(i for i, n in enumerate(names) if "lm_head" in n)
    big = jax.tree.unflatten(jax.tree.structure(params),
                             [x * 1e30 if i == head else x for i, x in enumerate(leaves)])
    _, metrics = step(state.replace(params=big), batch)
    flags = np.asarray(metrics["nonfinite_grads"])
    assert not bool(metrics["finite"]) and not flags[head] and flags.sum() >= len(flags) // 2, flags


@pytest.mark.parametrize("extra,needle", [
    (["--train.lerning_rate=1e-4"], "train.lerning_rate"),
    (["--data.datasets=[{path: /nonexistent/train.jsonl, type: messages}]"], "/nonexistent/train.jsonl"),
    (["--model.config_path=/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, needle):
    assert main(["--config", DEMO_CONFIG, *demo_overrides(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_sigkill_during_checkpoint_save_resumes_from_previous(tmp_path):
    """Kill -9 the training process while a checkpoint is being written; the next run resumes from the last
    complete checkpoint and finishes."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    cmd = [sys.executable, "-m", "xorl_jax.train", "--config", DEMO_CONFIG,
           *demo_overrides(out, max_steps=400, save_steps=2, save_async=True, log_steps=100)]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        # Wait for one finished checkpoint, then for the next one to be mid-write (a temporary directory).
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(ckpt) if ckpt.is_dir() else []
            if any(n.isdigit() for n in names) and any("tmp" in n for n in names):
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    complete = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
    assert complete, os.listdir(ckpt)
    resumed = make_trainer(out, max_steps=complete[-1] + 2)  # the default resumes: no setting needed
    assert not [n for n in os.listdir(ckpt) if "tmp" in n]  # the half-written step is cleaned up
    assert resumed.maybe_resume() == complete[-1]
    assert int(resumed.state.step) == complete[-1]
    result = resumed.train()
    assert result["step"] == complete[-1] + 2


def test_qwen3_5_moe_demo_trains_and_exports_for_transformers(tmp_path):
    """The hybrid family through the same loop: loss falls over a few steps and the export loads in transformers."""
    import torch
    import transformers

    config = os.path.join(ROOT, "configs", "demo_qwen3_5_moe_cpu.yaml")
    from xorl_jax.trainer import Trainer

    overrides = demo_overrides(tmp_path, max_steps=6, save_hf_weights=True, gradient_accumulation_steps=1,
                               micro_batch_size=1, lr=1e-2)
    overrides[0] = f"--model.config_path={os.path.join(DEMO_DIR + '_qwen3_5_moe')}"
    trainer = Trainer(load_config(config, overrides))
    assert type(trainer.model).__name__ == "Qwen3_5MoeForCausalLM"
    trainer.train()
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in open(tmp_path / "metrics.jsonl") if '"loss": ' in line]
    assert losses[-1] < losses[0], losses
    hf_dir = tmp_path / "global_step_6" / "hf_ckpt"
    ours = nnx.merge(trainer.graphdef, trainer.state.params)
    ids = np.asarray(next(trainer.train_iter)["input_ids"][:1, :64])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_model_switches_reach_the_step(tmp_path):
    """model.freeze_router (routers never move), model.lm_head_fp32, model.ep_dispatch and
    data.dataloader_num_workers are wired to what they name, not just accepted."""
    from xorl_jax.trainer import Trainer

    extra = ["--model.freeze_router=true", "--model.lm_head_fp32=false", "--model.dtype=bfloat16",
             "--train.enable_mixed_precision=true", "--data.dataloader_num_workers=1"]
    trainer = Trainer(load_config(DEMO_CONFIG, demo_overrides(tmp_path, max_steps=2) + extra))
    assert trainer.loss_cfg.logits_dtype == jnp.bfloat16
    assert trainer.model.options.ep_exchange == "padded"
    before = flat_params(trainer.state)
    trainer.train()
    after = flat_params(trainer.state)
    routers = [k for k in before if "router" in jax.tree_util.keystr(k)]
    assert routers
    for k in before:
        if k in routers:
            np.testing.assert_array_equal(after[k], before[k])
    assert sum(not np.array_equal(after[k], before[k]) for k in before) == len(before) - len(routers)


def test_ragged_dispatch_on_cpu_is_a_config_error(tmp_path, capsys):
    args = ["--config", DEMO_CONFIG, *demo_overrides(tmp_path), "--train.expert_parallel_size=2",
            "--model.ep_dispatch=ragged"]
    assert main(args) == 2
    assert "ep_dispatch=ragged needs GPUs" in capsys.readouterr().err


def test_full_determinism_sets_the_xla_flag_before_jax_starts(monkeypatch):
    import subprocess
    import sys

    from xorl_jax.train_setup import DETERMINISM_FLAG, request_determinism

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    jax.devices()
    assert request_determinism() is False  # too late in this process: it says so
    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {DETERMINISM_FLAG}"
    code = ("import os; from xorl_jax.train_setup import request_determinism as r; assert r(); import jax; "
            "jax.devices(); print(os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and DETERMINISM_FLAG in out.stdout, out.stderr[-1000:]


def test_compilation_cache_setting():
    from xorl_jax.train_setup import compilation_cache_dir

    assert compilation_cache_dir("auto", "cpu") is None
    assert compilation_cache_dir("auto", "gpu") == os.path.expanduser("~/.cache/xorl_jax/xla")
    assert compilation_cache_dir("/tmp/xc", "cpu") == "/tmp/xc"  # an explicit directory applies everywhere
    assert compilation_cache_dir(None, "gpu") is None


def test_host_fixed_attention_layout_reaches_the_step_one_compile_per_layout(tmp_path, monkeypatch):
    """With the layout fixed on the host (one process, cuDNN attention: forced here on CPU, where attention ignores
    it), each batch carries its document slot count, the step gets it at trace time and compiles once per count."""
    from xorl_jax import train_step as step_lib
    from xorl_jax.kernels.attention import MASKED, AttentionLayout, LayoutPlanner
    from xorl_jax.train_step import LAYOUT_KEY

    seen = []
    forward_loss = step_lib.forward_loss

    def spy(*args, **kwargs):
        layout = args[5] if len(args) > 5 else kwargs.get("attention_layout")
        seen.append(None if layout is None else layout.slots)
        return forward_loss(*args, **kwargs)

    monkeypatch.setattr(step_lib, "forward_loss", spy)
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.layout_planner = LayoutPlanner()
    batch = trainer._device_batch(next(trainer.train_iter))
    assert batch[LAYOUT_KEY] == AttentionLayout(8)  # demo rows: a few chats each
    state, metrics = trainer.train_step(trainer.state, batch)
    state, _ = trainer.train_step(state, trainer._device_batch(next(trainer.train_iter)))
    assert seen == [8] and np.isfinite(float(metrics["loss"]))  # traced once for two batches
    state, _ = trainer.train_step(state, {**trainer._device_batch(next(trainer.train_iter)),
                                          LAYOUT_KEY: AttentionLayout(MASKED)})
    assert seen == [8, MASKED] and sorted(s.slots for s in trainer.train_step._steps) == [MASKED, 8]

    # Rows without the pipeline's count: one process counts them itself; several processes leave it to the device.
    from xorl_jax.data.pipeline import MAX_DOCUMENTS_KEY

    rows = next(trainer.train_iter)
    bare = {k: v for k, v in rows.items() if k != MAX_DOCUMENTS_KEY}
    assert MAX_DOCUMENTS_KEY in rows and trainer._device_batch(bare)[LAYOUT_KEY] == AttentionLayout(8)
    trainer.process_count = 2
    assert LAYOUT_KEY not in trainer._device_batch(bare)
