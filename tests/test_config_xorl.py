"""xorl's own YAMLs, sectioned (its local trainer) and flat (its training server), read with xorl's meaning.

The YAML texts below carry the keys and values of xorl's example configs (examples/local/dummy/configs,
examples/local/coderforge/configs, examples/server/configs, src/xorl/sim/calibration_packs); the defaults checked
are those of xorl.arguments and xorl.server.server_arguments."""

import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xorl_jax import config as config_lib
from xorl_jax.config import ConfigError, config_from_dict, config_to_dict, load_config, parse_cli

REPO = pathlib.Path(__file__).resolve().parents[1]

# examples/local/dummy/configs/full/qwen3_8b.yaml
LOCAL_DENSE = """
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
  sample_packing_sequence_len: 32000
  dataloader_num_workers: 4
  dataloader_prefetch_factor: 2
  dataloader_pin_memory: true
train:
  output_dir: outputs/Qwen3-8B-local-test
  data_parallel_mode: fsdp2
  ulysses_parallel_size: 1
  data_parallel_replicate_size: 1
  data_parallel_shard_size: 8
  expert_parallel_size: 1
  tensor_parallel_size: 1
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
  load_weights_mode: grouped
  enable_full_determinism: false
  empty_cache_steps: 500
  ckpt_manager: dcp
  save_steps: 1000
  save_hf_weights: true
  use_wandb: false
  wandb_project: local-training
  wandb_name: Qwen3-8B-local-test
"""

# src/xorl/sim/calibration_packs/qwen3_6_35b_a3b/configs/..._deepep.yaml (Qwen3.5-MoE shapes, EP 8 of 32 GPUs)
LOCAL_MOE = """
model:
  model_path: Qwen/Qwen3.6-35B-A3B
  attn_implementation: flash_attention_3
  moe_implementation: quack
  ep_dispatch: deepep
  train_router: false
  deepep_buffer_size_gb: 2.0
  deepep_num_sms: 72
  deepep_async_combine: true
data:
  datasets:
  - path: dummy
    type: tokenized
    max_seq_len: 8193
  select_columns: [input_ids, labels]
  dataset_prepared_path: last_prepared_dataset
  sample_packing_method: sequential
  sample_packing_sequence_len: 8193
  dataloader_num_workers: 4
  dataloader_prefetch_factor: 2
  dataloader_pin_memory: true
  dataloader_drop_last: true
  pad_to_multiple_of: 128
train:
  output_dir: outputs/xorl-sim/qwen3_6_35b_a3b_8k_4node_ep8_mbs8_fullrecompute_deepep
  data_parallel_mode: fsdp2
  pipeline_parallel_size: 1
  ulysses_parallel_size: 1
  ringattn_parallel_size: 1
  tensor_parallel_size: 1
  data_parallel_replicate_size: 1
  data_parallel_shard_size: 32
  expert_parallel_size: 8
  num_train_epochs: 1
  max_steps: 12
  micro_batch_size: 8
  gradient_accumulation_steps: 1
  empty_cache_steps: 10
  gc_steps: 10
  gradient_checkpointing_method: recompute_full_layer
  optimizer: adamw
  lr: 1.0e-05
  lr_warmup_ratio: 0.0
  lr_decay_style: cosine
  lr_decay_ratio: 1.0
  weight_decay: 0.01
  max_grad_norm: 1.0
  enable_mixed_precision: true
  enable_gradient_checkpointing: true
  enable_compile: true
  enable_full_shard: true
  init_device: meta
  load_weights_mode: grouped
  enable_full_determinism: false
  ckpt_manager: dcp
  save_steps: 0
  save_epochs: 0
  save_hf_weights: false
  log_format: structured
  use_wandb: false
"""

# examples/local/coderforge/configs/qwen3_8b/qwen3_8b_adamw.yaml, its Ulysses 8 given to FSDP (context parallelism
# is refused until it lands, see test_context_parallel_sizes_are_one_line_errors)
LOCAL_HUB_DATA = """
model:
  model_path: Qwen/Qwen3-8B
  attn_implementation: flash_attention_3
data:
  datasets:
    - path: togethercomputer/CoderForge-Preview
      name: trajectories-tokenized_qwencoder
      split: filtered_reward1
      type: tokenized
      max_seq_len: 128000
  select_columns: [input_ids, labels]
  dataset_prepared_path: /ephemeral/prepared_datasets
  sample_packing_method: sequential
  sample_packing_sequence_len: 128000
  dataloader_num_workers: 4
  dataloader_pin_memory: false
  pad_to_multiple_of: 4096
train:
  ce_mode: quack_linear
  output_dir: /ephemeral/projects/coderforge/Qwen3-8B-adamw
  data_parallel_mode: fsdp2
  ulysses_parallel_size: 1
  data_parallel_replicate_size: 1
  data_parallel_shard_size: 8
  expert_parallel_size: 1
  num_train_epochs: 5
  micro_batch_size: 1
  gradient_accumulation_steps: 1
  optimizer: adamw
  lr: 2.0e-5
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
  empty_cache_steps: 500
  ckpt_manager: dcp
  save_steps: 1000
  save_hf_weights: true
  use_wandb: true
  wandb_project: coderforge
  wandb_name: Qwen3-8B-adamw
  wandb_tags: [qwen3-8b, adamw, filtered_reward1]
"""

# examples/server/configs/full/qwen3_8b_full.yaml (flat)
SERVER_DENSE = """
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
output_dir: outputs/Qwen3-8B-server-full-test
load_checkpoint_path: ""
ckpt_manager: dcp
log_level: INFO
worker_connection_timeout: 60.0
worker_max_retries: 3
sample_packing_sequence_len: 128000
enable_packing: true
skip_initial_checkpoint: true
ce_mode: bi_fused
"""

# examples/server/configs/lora/qwen3_30b_a3b_lora.yaml (flat; EP 8 over a data-parallel group of "1 x 1")
SERVER_MOE_LORA = """
model_path: Qwen/Qwen3-30B-A3B
tokenizer_path: Qwen/Qwen3-30B-A3B
attn_implementation: flash_attention_3
moe_implementation: triton
data_parallel_mode: fsdp2
expert_parallel_size: 8
ulysses_parallel_size: 1
data_parallel_replicate_size: 1
data_parallel_shard_size: 1
enable_mixed_precision: true
enable_gradient_checkpointing: true
enable_full_shard: true
enable_activation_offload: false
init_device: meta
output_dir: outputs/Qwen3-30B-A3B-server-lora-rl
load_checkpoint_path: ""
ckpt_manager: dcp
log_level: INFO
worker_connection_timeout: 60.0
worker_max_retries: 3
sample_packing_sequence_len: 32768
enable_packing: true
enable_lora: true
lora_rank: 16
lora_alpha: 16
lora_target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
skip_initial_checkpoint: true
ce_mode: bi_fused
"""

# examples/server/configs/full/qwen3_5_35b_a3b_ep1_fsdp8.yaml (flat; Muon)
SERVER_MUON = """
model_path: Qwen/Qwen3.5-35B-A3B
tokenizer_path: Qwen/Qwen3.5-35B-A3B
attn_implementation: flash_attention_3
moe_implementation: eager
data_parallel_mode: fsdp2
expert_parallel_size: 1
ulysses_parallel_size: 1
data_parallel_replicate_size: 1
data_parallel_shard_size: 8
enable_mixed_precision: true
enable_gradient_checkpointing: true
enable_full_shard: true
enable_activation_offload: false
init_device: meta
load_weights_mode: all_ranks
output_dir: outputs/Qwen3.5-35B-A3B-server-ep1-fsdp8
load_checkpoint_path: ""
ckpt_manager: dcp
log_level: INFO
worker_connection_timeout: 60.0
worker_max_retries: 3
sample_packing_sequence_len: 128000
enable_packing: true
skip_initial_checkpoint: true
ce_mode: bi_fused
optimizer: muon
optimizer_dtype: bf16
muon_lr: 0.02
muon_momentum: 0.95
muon_adjust_lr_fn: match_rms_adamw
"""

ALL = {"local_dense": LOCAL_DENSE, "local_moe": LOCAL_MOE, "local_hub_data": LOCAL_HUB_DATA,
       "server_dense": SERVER_DENSE, "server_moe_lora": SERVER_MOE_LORA, "server_muon": SERVER_MUON}


def _load(text, tmp_path, *overrides):
    path = tmp_path / "xorl.yaml"
    path.write_text(text)
    return load_config(str(path), list(overrides))


# ---------------------------------------------------------------------------------------------- as they are
@pytest.mark.parametrize("name", ALL)
def test_xorl_configs_load_as_they_are(name, tmp_path):
    cfg = _load(ALL[name], tmp_path)
    assert config_lib.validate(cfg) is cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg  # what a checkpoint stores reads back the same
    assert cfg.model.attn_implementation == "auto" and cfg.train.ckpt_manager == "orbax"


def test_the_dry_run_needs_no_data_a_run_does(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text(SERVER_DENSE)
    cfg = parse_cli(["--config", str(path)], need_data=False)
    assert cfg.data.datasets == []
    with pytest.raises(ConfigError, match="data.datasets is empty"):
        parse_cli(["--config", str(path)])


def test_pytorch_values_become_ours_with_one_info_line_each(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="xorl_jax.config"):
        cfg = _load(LOCAL_MOE, tmp_path)
    m, t, d = cfg.model, cfg.train, cfg.data
    assert (m.attn_implementation, m.moe_implementation, m.ep_dispatch) == ("auto", "triton", "alltoall")
    assert (t.ckpt_manager, t.remat_policy) == ("orbax", "full")
    lines = [r.getMessage() for r in caplog.records]
    for key, value in (("model.attn_implementation", "flash_attention_3"), ("model.moe_implementation", "quack"),
                       ("model.ep_dispatch", "deepep"), ("train.ckpt_manager", "dcp"),
                       ("train.gradient_checkpointing_method", "recompute_full_layer")):
        assert sum(key in line and value in line for line in lines) == 1, key
    no_effect = [line for line in lines if "no effect here" in line]
    assert len(no_effect) == 1
    for key in ("model.deepep_num_sms", "data.dataloader_pin_memory", "train.init_device", "train.enable_compile",
                "train.gc_steps", "train.log_format"):
        assert key in no_effect[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "data.dataloader_drop_last" in warnings[0]
    # 8193 is not a multiple of 128: xorl packs 8193 tokens of documents and pads the row to 8320
    assert d.sample_packing_sequence_len == 8193 and any("padded to 8320" in line for line in lines)


def test_sample_packing_length_not_a_multiple_pads_the_row_as_xorl():
    from xorl_jax.data.pipeline import row_length

    cfg = config_from_dict({"data": {"sample_packing_sequence_len": 8193, "pad_to_multiple_of": 128}})
    assert row_length(cfg.data) == 8320
    assert row_length(config_from_dict({"data": {"sample_packing_sequence_len": 256}}).data) == 256
    assert row_length({"sample_packing_sequence_len": 100, "pad_to_multiple_of": 1}) == 100


def test_rows_hold_the_packing_length_of_documents_padded_to_the_multiple(tmp_path):
    from xorl_jax.config import DataConfig, DatasetConfig
    from xorl_jax.data import build_train_iterator

    rows = [{"input_ids": list(range(1, 41))}, {"input_ids": list(range(1, 61))}, {"input_ids": list(range(1, 31))}]
    path = tmp_path / "tok.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(datasets=[DatasetConfig(path=str(path), type="tokenized")], sample_packing_sequence_len=100,
                      pad_to_multiple_of=64, shuffle=False)
    it = build_train_iterator(data, None, global_batch_size=2)
    batch = next(it)
    assert batch["input_ids"].shape == (2, 128)
    assert int((batch["segment_ids"] > 0).sum(axis=1).max()) <= 100  # documents fill at most 100 tokens of a row


def test_xorl_defaults_for_omitted_keys():
    """xorl.arguments' defaults, key by key, for what decides the training."""
    cfg = load_config(None)
    m, d, t, lo = cfg.model, cfg.data, cfg.train, cfg.lora
    xorl = {"model.train_router": False, "model.freeze_router": False, "model.ep_dispatch": "alltoall",
            "data.sample_packing_method": "sequential", "data.sample_packing_sequence_len": 32000,
            "data.pad_to_multiple_of": 128, "train.lr": 5e-5, "train.lr_min": 1e-7, "train.weight_decay": 0.0,
            "train.optimizer": "adamw", "train.max_grad_norm": 1.0, "train.micro_batch_size": 1,
            "train.gradient_accumulation_steps": 1, "train.num_train_epochs": 1, "train.lr_warmup_ratio": 0.0,
            "train.lr_decay_style": "constant", "train.lr_decay_ratio": 1.0, "train.enable_mixed_precision": True,
            "train.enable_gradient_checkpointing": True, "train.data_parallel_mode": "fsdp2",
            "train.expert_parallel_size": 1, "train.save_steps": 0, "train.save_hf_weights": True, "train.seed": 42,
            "train.max_steps": None, "train.enable_full_determinism": False, "train.adam_beta1": 0.9,
            "train.adam_beta2": 0.95, "train.adam_epsilon": 1e-8, "lora.enable_lora": False, "lora.lora_rank": 16,
            "lora.lora_alpha": 16}
    for key, value in xorl.items():
        section, name = key.split(".")
        assert getattr({"model": m, "data": d, "train": t, "lora": lo}[section], name) == value, key
    assert d.long_sequence_policy == "drop"  # xorl filters samples longer than max_seq_len


def test_flat_server_config_reads_into_sections_with_the_servers_defaults(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="xorl_jax.config"):
        cfg = _load(SERVER_MOE_LORA, tmp_path)
    m, t, lo = cfg.model, cfg.train, cfg.lora
    assert m.model_path == "Qwen/Qwen3-30B-A3B" and m.moe_implementation == "triton"
    assert lo.enable_lora and lo.lora_rank == 16 and t.expert_parallel_size == 8
    # ServerArguments' defaults where the file omits the key: freeze_router true, lr 1e-5, weight_decay 0.01
    assert m.freeze_router is True and (t.lr, t.weight_decay) == (1e-5, 0.01)
    # data_parallel_shard_size 1 x replicate 1 is "all devices" on xorl's server: the 8 expert ranks fit
    assert (t.data_parallel_shard_size, t.data_parallel_replicate_size) == (-1, 1)
    assert t.load_checkpoint_path == ""  # xorl's server: no checkpoint to load
    assert cfg.server == {"log_level": "INFO", "worker_connection_timeout": 60.0, "worker_max_retries": 3,
                          "enable_packing": True, "skip_initial_checkpoint": True}
    kept = [r.getMessage() for r in caplog.records if "kept for the server mode" in r.getMessage()]
    assert len(kept) == 1 and "worker_connection_timeout" in kept[0]
    assert _load(SERVER_MOE_LORA.replace("lora_rank: 16\n", ""), tmp_path).lora.lora_rank == 32


def test_flat_config_keeps_what_it_sets_and_takes_section_overrides(tmp_path):
    cfg = _load(SERVER_DENSE, tmp_path, "--train.lr=2e-5", "--server.worker_max_retries=5",
                "--data.datasets=[{path: d.jsonl}]")
    assert cfg.train.data_parallel_shard_size == 4 and cfg.data.sample_packing_sequence_len == 128000
    assert cfg.train.lr == 2e-5 and cfg.server["worker_max_retries"] == 5 and cfg.data.datasets[0].path == "d.jsonl"
    sectioned = config_from_dict({"server": {"enable_packing": True}, "train": {"lr": 1e-4}})
    assert sectioned.server == {"enable_packing": True} and sectioned.model.freeze_router is False


@pytest.mark.parametrize("raw, needle", [
    ({"model_path": "x", "worker_bind_prot": 1}, "unknown key 'worker_bind_prot' in a flat (xorl server format) "
                                                 "config; did you mean 'worker_bind_port'?"),
    ({"model": {"model_path": "x"}, "lr": 1e-5}, "'lr' is a top-level key in a config with sections; put it in "
                                                 "section 'train'"),
    ({"server": {"enable_pakcing": True}}, "unknown key 'server.enable_pakcing'; did you mean 'server.enable_packing'"),
    ({"trian": {"lr": 1}}, "unknown section 'trian'; did you mean 'train'?"),
])
def test_flat_and_server_key_mistakes_are_one_line(raw, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_optimizer_dtype_as_xorl_reads_it(tmp_path, caplog):
    muon = _load(SERVER_MUON, tmp_path).train
    assert muon.optimizer == "muon" and muon.optimizer_dtype == "bfloat16"
    # xorl's bf16 default is for muon and anyprecision_adamw state; torch's AdamW keeps float32 moments
    with caplog.at_level(logging.INFO, logger="xorl_jax.config"):
        adamw = config_from_dict({"train": {"optimizer": "adamw", "optimizer_dtype": "bf16"}}).train
    assert adamw.optimizer_dtype == "float32" and "'bf16' -> float32" in caplog.text
    assert config_from_dict({"train": {"optimizer": "muon"}}).train.optimizer_dtype == "bfloat16"
    assert config_from_dict({"train": {"optimizer": "muon", "optimizer_dtype": "float32"}}).train.optimizer_dtype \
        == "float32"
    assert config_from_dict({"train": {"optimizer_dtype": "bfloat16"}}).train.optimizer_dtype == "bfloat16"


def test_xorl_dataset_keys(tmp_path):
    cfg = _load(LOCAL_HUB_DATA, tmp_path)
    ds = cfg.data.datasets[0]
    assert (ds.path, ds.name, ds.split, ds.max_seq_len) == ("togethercomputer/CoderForge-Preview",
                                                            "trajectories-tokenized_qwencoder", "filtered_reward1",
                                                            128000)
    assert cfg.data.pad_to_multiple_of == 4096 and cfg.train.use_wandb  # a warning, not an error
    entry = {"path": "dummy", "num_samples": 7, "ds_type": "json", "preprocess_shards": 4, "trust_remote_code": False}
    assert config_from_dict({"data": {"datasets": [entry]}}).data.datasets[0].num_samples == 7
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].trust_remote_code: True: remote dataset code"):
        config_from_dict({"data": {"datasets": [{"path": "x", "trust_remote_code": True}]}})
    with pytest.raises(ConfigError, match=r"data.test_datasets\[0\].shards: 4"):
        config_from_dict({"data": {"test_datasets": [{"path": "x", "shards": 4, "shards_idx": 0}]}})
    eval_sets = config_from_dict({"data": {"test_datasets": [{"path": "e.jsonl"}]}}).data.eval_datasets
    assert [e.path for e in eval_sets] == ["e.jsonl"]


def test_context_parallel_sizes_are_read_pipeline_is_a_one_line_error(tmp_path):
    t = _load(LOCAL_DENSE.replace("ulysses_parallel_size: 1", "ulysses_parallel_size: 4"), tmp_path,
              "--train.ringattn_parallel_size=2").train
    assert (t.ulysses_parallel_size, t.ringattn_parallel_size) == (4, 2)
    with pytest.raises(ConfigError) as info:
        _load(LOCAL_DENSE.replace("ulysses_parallel_size: 1", "pipeline_parallel_size: 2"), tmp_path)
    assert "train.pipeline_parallel_size=2" in str(info.value) and "set it to 1" in str(info.value)


def test_no_model_path_means_random_init_as_in_xorl():
    cfg = config_from_dict({"model": {"config_path": "xorl_jax/assets/demo"}})
    assert cfg.train.init_from == "scratch"
    assert config_from_dict({"model": {"model_path": "m"}}).train.init_from == "auto"


# ---------------------------------------------------------------------------------------------- the key catalogue
def test_every_xorl_key_has_one_meaning_here():
    """Every key of xorl's schema is a field here or in exactly one table; no table hides a field."""
    tables = {"NO_EFFECT_KEYS": config_lib.NO_EFFECT_KEYS, "NOT_AVAILABLE": config_lib.NOT_AVAILABLE,
              "UNSUPPORTED_SWITCHES": config_lib.UNSUPPORTED_SWITCHES, "RENAMED_KEYS": config_lib.RENAMED_KEYS}
    classes = {"model": config_lib.ModelConfig, "data": config_lib.DataConfig, "train": config_lib.TrainConfig,
               "lora": config_lib.LoraConfig, "data.datasets[]": config_lib.DatasetConfig}
    xorl_keys = set()
    for section, names in config_lib.XORL_KEYS.items():
        assert len(names) == len(set(names)), section
        fields = {f.name for f in dataclasses.fields(classes[section])} if section in classes else set()
        for name in names:
            key = f"{section}.{name}"
            xorl_keys.add(key)
            homes = [t for t, table in tables.items() if key in table]
            if section == "server":
                assert name in config_lib.SERVER_KEYS and not homes, key
            elif name in fields:
                assert not homes, f"{key} is a field here but {homes} would drop it"
            else:
                assert len(homes) == 1, f"{key}: {homes or 'not handled'}"
    for table in (*tables.values(), config_lib.XORL_VALUES, config_lib.XORL_FIELD_NOTES):
        assert set(table) <= xorl_keys, set(table) - xorl_keys
    assert config_lib.NULL_IS_DEFAULT <= xorl_keys


def test_migration_guide_is_up_to_date():
    text = (REPO / "docs/MIGRATING_FROM_XORL.md").read_text()
    marker = config_lib.MIGRATING_MARKER
    assert text.count(marker) == 1
    assert marker + text.split(marker)[1] == config_lib.render_migration_keys(), (
        "regenerate with: python -m xorl_jax.config migrating docs/MIGRATING_FROM_XORL.md")
    for section, names in config_lib.XORL_KEYS.items():
        for name in names:
            assert f"| `{name}`" in text, f"{section}.{name}"


# ---------------------------------------------------------------------------------------------- semantics
def _moe(train_router):
    from xorl_jax.layers.moe import MoE

    return MoE(hidden=8, num_experts=4, top_k=2, intermediate=16, norm_topk_prob=True, train_router=train_router,
               implementation="eager", rngs=nnx.Rngs(0))


def test_train_router_false_detaches_only_the_routing_weights():
    """xorl's train_router false: the experts' output gradient does not reach the router through the routing
    weights; the load-balancing statistics (router probabilities) still carry the aux loss's gradient."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    valid = jnp.ones((2, 5), bool)

    def grads(layer, output_weight, aux_weight):
        def loss(model):
            y, stats = model(x, valid)
            return output_weight * jnp.sum(y ** 2) + aux_weight * jnp.sum(stats[1] ** 2)
        return nnx.grad(loss)(layer)

    trained, detached = _moe(True), _moe(False)
    g_out_trained = grads(trained, 1.0, 0.0)
    g_out_detached = grads(detached, 1.0, 0.0)
    assert float(jnp.abs(g_out_trained.router[...]).max()) > 1e-6
    np.testing.assert_array_equal(np.asarray(g_out_detached.router[...]), 0.0)  # no path through the weights
    np.testing.assert_allclose(np.asarray(g_out_detached.gate_up_proj[...]),
                               np.asarray(g_out_trained.gate_up_proj[...]), rtol=1e-6)  # experts train alike
    g_aux_trained, g_aux_detached = grads(trained, 0.0, 1.0), grads(detached, 0.0, 1.0)
    assert float(jnp.abs(g_aux_detached.router[...]).max()) > 1e-6
    np.testing.assert_allclose(np.asarray(g_aux_detached.router[...]), np.asarray(g_aux_trained.router[...]),
                               rtol=1e-6)
    y_trained, _ = trained(x, valid)
    y_detached, _ = detached(x, valid)
    np.testing.assert_array_equal(np.asarray(y_trained), np.asarray(y_detached))  # the forward is the same


def test_train_router_and_freeze_router_reach_the_trainer():
    from xorl_jax.train_setup import model_options

    assert model_options(config_from_dict(None)).train_router is False
    assert model_options(config_from_dict({"model": {"train_router": True}})).train_router is True
    frozen = config_from_dict({"model": {"freeze_router": True}})
    assert frozen.model.freeze_router and not frozen.model.train_router  # two switches now, not one


def test_tokenized_labels_shift_as_xorl_detects():
    from xorl_jax.data.documents import tokenized_doc

    ids = [5, 6, 7, 8]
    hf = tokenized_doc({"input_ids": ids, "labels": [-100, 6, 7, 8]}, None)[1]  # unshifted (HF): shifted here
    assert hf.tolist() == [6, 7, 8, -100]
    pre = tokenized_doc({"input_ids": ids, "labels": [-100, 7, 8, -100]}, None)[1]  # already next-token targets
    assert pre.tolist() == [-100, 7, 8, -100]


def test_a_named_kernel_this_machine_lacks_is_one_line(tmp_path):
    """xorl's `moe_implementation: triton` (its server LoRA configs) off an NVIDIA GPU: refused before the model is
    built, naming the key and the values that run here (not a traceback from inside the model)."""
    import types

    from xorl_jax.kernels.gmm import triton_available
    from xorl_jax.preflight import check_kernels

    if triton_available():
        pytest.skip("the Triton grouped GEMM runs on this machine")
    cfg = _load(SERVER_MOE_LORA, tmp_path)
    with pytest.raises(ConfigError, match="model.moe_implementation triton: .*set model.moe_implementation to auto"):
        check_kernels(cfg, types.SimpleNamespace(num_experts=8))
    check_kernels(cfg, types.SimpleNamespace(num_experts=0))  # a dense model runs no grouped GEMM
