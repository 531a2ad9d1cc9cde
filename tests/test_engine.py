"""The training engine's API without the CLI loop (xorl_jax.engine): a step on a hand-made batch, the eval loss of
the same rows, save and restore, and LoRA adapters over one frozen base (the engine's own and a new one)."""

import dataclasses
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from xorl_jax.checkpoint.training import plan_resume
from xorl_jax.config import load_config
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.engine import TrainEngine, train_batch
from xorl_jax.kernels.attention import AttentionLayout, LayoutPlanner
from xorl_jax.parallel.rules import data_parallel_size
from xorl_jax.preflight import check_run
from xorl_jax.train_step import IGNORE_INDEX, LAYOUT_KEY, stack_micro_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
SEQ = 64


def build_engine(out_dir, lora: bool = False) -> TrainEngine:
    overrides = {
        "model.config_path": DEMO_DIR, "model.tokenizer_path": DEMO_DIR,
        "data.datasets": f"[{{path: {DEMO_DIR}/train.jsonl, type: messages}}]", "data.eval_datasets": "[]",
        "data.sample_packing_sequence_len": SEQ, "train.output_dir": str(out_dir), "train.micro_batch_size": 1,
        "train.gradient_accumulation_steps": 1, "train.max_steps": 4, "train.lr": 1e-2,
        "train.lr_warmup_ratio": 0.0,
    }
    cfg = load_config(DEMO_CONFIG, [f"--{k}={v}" for k, v in overrides.items()])
    if lora:  # adapters over the random demo weights (the config refuses it for a run: only the mechanics matter)
        cfg.lora.enable_lora, cfg.lora.lora_rank, cfg.lora.lora_alpha = True, 4, 8
        cfg.lora.lora_target_modules = ["q_proj", "v_proj"]
        cfg.lora.lora_target_parameters = []
    return TrainEngine(cfg, check_run(cfg), total_steps=cfg.train.max_steps)


def host_rows(engine, seed: int) -> dict:
    """One global micro-batch of two packed documents per row, the first token of each unlabelled."""
    rows = engine.cfg.train.micro_batch_size * data_parallel_size(engine.mesh)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, engine.model_config.vocab_size, (rows, SEQ), dtype=np.int32)
    half = SEQ // 2
    segments = np.repeat(np.array([[1] * half + [2] * half], np.int32), rows, axis=0)
    positions = np.tile(np.concatenate([np.arange(half), np.arange(half)]).astype(np.int32), (rows, 1))
    labels = np.roll(ids, -1, axis=1)
    labels[:, [half - 1, SEQ - 1]] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "positions": positions, "segment_ids": segments}


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_step_eval_save_restore(tmp_path):
    engine = build_engine(tmp_path)
    rows = host_rows(engine, 0)
    before = engine.eval_loss([rows])
    assert before["eval_tokens"] == int(np.sum(rows["labels"] != IGNORE_INDEX))
    assert engine.eval_loss([]) is None
    with pytest.raises(ValueError, match="lora.enable_lora"):  # a new adapter needs a frozen base
        engine.new_adapter(engine.cfg.lora)
    stacked = stack_micro_batches(rows, 1)
    # cuDNN attention's layout, planned on the host (the engine's planner is None here: CPU attention takes none)
    assert engine.layout_planner is None and LAYOUT_KEY not in engine.train_batch(stacked)
    planned = train_batch(stacked, engine.mesh, LayoutPlanner(), documents=None)
    assert planned[LAYOUT_KEY] == AttentionLayout(8)  # two documents a row, counted from the rows
    assert train_batch(stacked, engine.mesh, LayoutPlanner(), documents=20)[LAYOUT_KEY] == AttentionLayout(64)
    assert LAYOUT_KEY not in train_batch(stacked, engine.mesh, LayoutPlanner(), whole_batch=False)
    metrics = engine.train_step(engine.train_batch(stacked))
    # the step reports the loss of the parameters it started from: the eval loss of the same rows
    np.testing.assert_allclose(float(metrics["loss"]), before["eval_loss"], rtol=1e-5)
    assert int(engine.state.step) == 1 and engine.eval_loss([rows])["eval_loss"] < before["eval_loss"]
    # the merged model is the trained one (full fine-tuning: the state's parameters)
    ids = rows["input_ids"][:1]
    np.testing.assert_array_equal(engine.merged_model()(ids).logits,
                                  nnx.merge(engine.graphdef, engine.state.params)(ids).logits)

    saved = flat(engine.state.params)
    engine.save(1, {"data_state": {"epoch": 3}})
    engine.wait_for_saves()
    engine.train_step(engine.train_batch(stack_micro_batches(host_rows(engine, 1), 1)))
    assert int(engine.state.step) == 2
    plan = plan_resume("auto", os.path.join(tmp_path, "checkpoints"), hf_config=engine.hf_config)
    meta, step = engine.restore(plan)
    assert step == 1 and meta["data_state"] == {"epoch": 3} and meta["skipped_total"] == 0
    assert int(engine.state.step) == 1
    got = flat(engine.state.params)
    for k, v in saved.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_lora_adapters_share_the_frozen_base(tmp_path):
    engine = build_engine(tmp_path, lora=True)
    base = flat(engine.frozen)
    rows = host_rows(engine, 0)
    ids = rows["input_ids"][:1]
    base_logits = nnx.merge(engine.graphdef, engine.frozen)(ids).logits
    np.testing.assert_allclose(engine.merged_model()(ids).logits, base_logits, atol=1e-6)  # B = 0: the base
    batch = engine.train_batch(stack_micro_batches(rows, 1))
    engine.train_step(batch)
    assert not np.allclose(engine.merged_model()(ids).logits, base_logits, atol=1e-4)

    # a second adapter, its own optimizer and step, over the same frozen base
    other_cfg = dataclasses.replace(engine.cfg.lora, lora_rank=3, lora_target_modules=["o_proj"])
    adapter = engine.new_adapter(other_cfg, seed=1)
    assert {t.hf_name for t in adapter.targets} == {"self_attn.o_proj"}
    optimizer = optax.adam(1e-2)
    state = engine.new_state(adapter.params, optimizer)
    steps = engine.make_steps(optimizer=optimizer, state=state, merge_fn=adapter.merge_fn)
    state, metrics = steps(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert all(3 in x.shape for x in jax.tree.leaves(state.params))  # its own rank
    for k, v in flat(engine.frozen).items():  # neither adapter's steps touched the base
        np.testing.assert_array_equal(v, base[k], err_msg=k)

