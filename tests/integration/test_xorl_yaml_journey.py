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


# xorl's context-parallel examples (examples/local/dummy/configs/full/), as they are
XORL_SP4_128K = """
## Full-weight training: Qwen3-8B, SP=4, 128K packing
model:
  model_path: Qwen/Qwen3-8B
  attn_implementation: flash_attention_3

data:
  datasets:
    - path: dummy
      type: tokenized
      max_seq_len: 8000
  select_columns: [input_ids, labels]
  dataset_prepared_path: last_prepared_dataset
  sample_packing_method: sequential
  sample_packing_sequence_len: 128000
  dataloader_num_workers: 4
  dataloader_prefetch_factor: 2
  dataloader_pin_memory: true

train:
  output_dir: outputs/Qwen3-8B-sp4-full-128k
  data_parallel_mode: fsdp2
  ulysses_parallel_size: 4
  data_parallel_replicate_size: 1
  data_parallel_shard_size: 1
  expert_parallel_size: 1

  num_train_epochs: 5

  micro_batch_size: 1
  gradient_accumulation_steps: 1

  optimizer: adamw
  lr: 1.0e-5
  lr_warmup_ratio: 0.005
  lr_decay_style: cosine
  lr_decay_ratio: 1.0
  weight_decay: 0.01

  max_grad_norm: 1.0
  enable_mixed_precision: true
  enable_gradient_checkpointing: true
  enable_full_shard: true
  enable_activation_offload: false
  init_device: meta
  load_weights_mode: broadcast
  enable_full_determinism: false
  empty_cache_steps: 500
  ckpt_manager: dcp
  save_steps: 1000
  save_hf_weights: false
  use_wandb: false
"""

XORL_CP2_SP4 = """
## Hybrid balanced: cp=2, sp=4, dp=1
model:
  model_path: Qwen/Qwen3-8B
  attn_implementation: flash_attention_3

data:
  datasets:
    - path: dummy
      type: tokenized
      max_seq_len: 8193
  select_columns: [input_ids, labels]
  dataset_prepared_path: last_prepared_dataset
  sample_packing_method: sequential
  sample_packing_sequence_len: 64000
  dataloader_num_workers: 4
  dataloader_prefetch_factor: 2
  dataloader_pin_memory: true

train:
  output_dir: outputs/Qwen3-8B-cp2-sp4-bench
  data_parallel_mode: fsdp2
  ulysses_parallel_size: 4
  ringattn_parallel_size: 2
  data_parallel_replicate_size: 1
  data_parallel_shard_size: 1
  expert_parallel_size: 1

  num_train_epochs: 5
  max_steps: 20

  micro_batch_size: 1
  gradient_accumulation_steps: 1

  optimizer: adamw
  lr: 1.0e-3
  lr_warmup_ratio: 0.001
  lr_decay_style: cosine
  lr_decay_ratio: 1.0
  weight_decay: 0.01

  max_grad_norm: 5.0
  enable_mixed_precision: true
  enable_gradient_checkpointing: true
  enable_full_shard: true
  enable_activation_offload: false
  init_device: meta
  load_weights_mode: grouped
  enable_full_determinism: false
  empty_cache_steps: 500
  ckpt_manager: dcp
  save_steps: 1000
  save_hf_weights: false

  use_wandb: false
"""

XORL_MOE_SP8 = """
## MoE + Pure Ulysses: ep=8, cp=1, sp=8, dp=1
model:
  model_path: Qwen/Qwen3-30B-A3B
  attn_implementation: flash_attention_3
  moe_implementation: triton

data:
  datasets:
    - path: dummy
      type: tokenized
      max_seq_len: 16001
  select_columns: [input_ids, labels]
  dataset_prepared_path: last_prepared_dataset
  sample_packing_method: sequential
  sample_packing_sequence_len: 128000
  dataloader_num_workers: 4
  dataloader_prefetch_factor: 2
  dataloader_pin_memory: true

train:
  output_dir: outputs/Qwen3-30B-A3B-cp1-sp8-bench
  data_parallel_mode: fsdp2
  ulysses_parallel_size: 8
  ringattn_parallel_size: 1
  expert_parallel_size: 8
  data_parallel_replicate_size: 1
  data_parallel_shard_size: 1

  num_train_epochs: 5
  max_steps: 20

  micro_batch_size: 1
  gradient_accumulation_steps: 1
  empty_cache_steps: 100

  optimizer: adamw
  lr: 1.0e-5
  lr_warmup_ratio: 0.005
  lr_decay_style: cosine
  lr_decay_ratio: 1.0
  weight_decay: 0.01

  max_grad_norm: 1.0
  enable_mixed_precision: true
  enable_gradient_checkpointing: true
  enable_full_shard: true
  enable_activation_offload: false
  init_device: meta
  load_weights_mode: all_ranks
  enable_full_determinism: false

  ckpt_manager: dcp
  save_steps: 1000
  save_hf_weights: false

  use_wandb: false
"""


@pytest.fixture(scope="module")
def tiny_qwen3_moe(tmp_path_factory):
    """A tiny Qwen3-MoE with 8 query heads (Ulysses 8) and 8 experts (expert parallel 8)."""
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=32,
                                max_position_embeddings=4096).save_pretrained(path)
    return str(path)


def test_xorl_context_parallel_yamls_dry_run_as_they_are(tmp_path, tiny_qwen3, tiny_qwen3_moe):
    """Ulysses 4 at 128k tokens, ring 2 x Ulysses 4 at 64k, and Ulysses 8 with the experts over the same 8 ranks (as
    xorl counts them): the context ranks on top of data_parallel_shard_size 1."""
    dense = _dry_runs(tmp_path, tiny_qwen3, [("sp4", XORL_SP4_128K, 4), ("cp2_sp4", XORL_CP2_SP4, 8)])
    moe = _dry_runs(tmp_path, tiny_qwen3_moe, [("moe_sp8", XORL_MOE_SP8, 8)])
    assert "'fsdp': 1, 'ring': 1, 'expert': 1, 'ulysses': 4" in dense["sp4"][0]
    assert "128,000 tokens/step" in dense["sp4"][0] and "all-to-all" in dense["sp4"][0]
    assert "'ring': 2, 'expert': 1, 'ulysses': 4" in dense["cp2_sp4"][0] and "64,000 tokens/step" in dense["cp2_sp4"][0]
    assert "collective-permute" in dense["cp2_sp4"][0]  # keys and values around the ring
    assert "'ulysses': 8" in moe["moe_sp8"][0] and "128,000 tokens/step" in moe["moe_sp8"][0]
