"""Config loading, overrides, validation, xorl compatibility and the generated reference."""

import dataclasses
import logging
import pathlib
import subprocess
import sys

import pytest
import yaml

from xorl_jax import config as config_lib
from xorl_jax.config import (
    Config,
    ConfigError,
    DatasetConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_cli,
    render_config_reference,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def _error(overrides=(), raw=None) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"qwen3_8b_full.yaml", "qwen3_30b_a3b_full.yaml", "qwen3_5_35b_a3b_full.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_is_runnable(path):
    text = path.read_text()
    assert text.startswith("#"), "a recipe starts with a header comment (command, hardware, expected behaviour)"
    raw = yaml.safe_load(text)
    # a server recipe (python -m xorl_jax.server) is checked as the server checks it: it trains on requests, not data
    cfg = parse_cli(["--config", str(path)], need_data="server" not in raw)
    # every key written in the file arrives in the typed config unchanged (no silent drops)
    for section, values in raw.items():
        for key, value in values.items():
            if key in ("data_parallel_shard_size", "data_parallel_replicate_size") and \
                    values.get("data_parallel_mode", "fsdp2") != "fsdp2":
                continue  # ddp / none rewrite these sizes on purpose
            where = getattr(cfg, section)
            got = where[key] if isinstance(where, dict) else getattr(where, key)  # `server` is a plain mapping
            if isinstance(value, list) and value and isinstance(value[0], dict):
                assert [{k: getattr(d, k) for k in v} for d, v in zip(got, value)] == value
            else:
                assert got == value or (isinstance(value, str) and got == float(value)), (section, key)


def test_moe_recipes_use_expert_parallelism():
    assert parse_cli(["--config", str(REPO / "configs/qwen3_30b_a3b_full.yaml")]).train.expert_parallel_size == 8
    assert parse_cli(["--config", str(REPO / "configs/qwen3_5_35b_a3b_full.yaml")]).train.expert_parallel_size == 8


# ---------------------------------------------------------------------------------------------- defaults
def test_defaults_are_xorls():
    """Omitted keys mean what they mean in xorl (xorl.arguments' defaults; tests/test_config_xorl.py has more)."""
    cfg = load_config(None)
    t = cfg.train
    assert (t.lr, t.lr_min, t.lr_decay_style, t.lr_warmup_ratio, t.max_grad_norm) == (5e-5, 1e-7, "constant", 0.0, 1.0)
    assert t.save_hf_weights and not cfg.model.train_router and not cfg.model.freeze_router
    assert (cfg.model.attn_implementation, cfg.model.dtype, cfg.model.param_dtype) == ("auto", "bfloat16", "float32")
    assert (cfg.data.sample_packing_sequence_len, cfg.data.pad_to_multiple_of) == (32000, 128)
    assert cfg.data.long_sequence_policy == "drop" and cfg.data.seed == 42 and cfg.data.shuffle
    assert cfg.model.ep_dispatch == "alltoall" and cfg.model.router_fp32 and cfg.model.lm_head_fp32
    assert not cfg.lora.enable_lora and t.init_from == "auto"


def test_every_field_has_help():
    for cls in (*config_lib.SECTIONS.values(), DatasetConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help string"


def test_empty_file_and_empty_sections_give_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "model:\ntrain: {}\n")) == Config()


# ---------------------------------------------------------------------------------------------- overrides
def test_overrides_both_syntaxes_and_yaml_scalars():
    cfg = load_config(None, ["--train.lr=2e-5", "--train.max_steps", "100", "--train.save_hf_weights=true",
                             "--model.model_path", "/ckpt/Qwen3-8B", "--lora.lora_target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 100 and cfg.train.save_hf_weights is True
    assert cfg.model.model_path == "/ckpt/Qwen3-8B"
    assert cfg.lora.lora_target_modules == ["q_proj", "v_proj"]


def test_override_beats_file_and_later_override_wins(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 3.0e-5\n  micro_batch_size: 2\n")
    cfg = load_config(path, ["--train.lr", "1e-4", "--train.micro_batch_size=4", "--train.micro_batch_size=8"])
    assert cfg.train.lr == 1e-4 and cfg.train.micro_batch_size == 8


def test_string_fields_keep_the_raw_override_text():
    cfg = load_config(None, ["--model.model_path=123", "--train.output_dir=2024", "--train.load_checkpoint_path=auto"])
    assert cfg.model.model_path == "123" and cfg.train.output_dir == "2024"
    assert cfg.train.load_checkpoint_path == "auto"
    assert load_config(None, ["--model.tokenizer_path=null"]).model.tokenizer_path is None


def test_yaml11_exponent_floats_in_files(tmp_path):
    # PyYAML reads `1e-5` (no dot) as a string; float fields accept it, int fields do not
    cfg = load_config(_write(tmp_path, "train:\n  lr: 1e-5\n  adam_epsilon: 1E-8\n  weight_decay: 0\n"))
    assert cfg.train.lr == 1e-5 and cfg.train.adam_epsilon == 1e-8 and cfg.train.weight_decay == 0.0
    assert "train.micro_batch_size must be int" in _error(["--train.micro_batch_size=1e3"])


def test_datasets_from_an_override():
    cfg = load_config(None, ["--data.datasets=[{path: a.jsonl, type: messages}, {path: b, weight: 2}]"])
    assert cfg.data.datasets == [DatasetConfig(path="a.jsonl", type="messages"), DatasetConfig(path="b", weight=2.0)]


@pytest.mark.parametrize("argv, needle", [
    (["train.lr=1"], "overrides look like --section.key=value"),
    (["--train.lr"], "--train.lr needs a value"),
    (["--lr=1"], "unknown option --lr; did you mean --train.lr?"),  # a key without its section
    (["--max-steps", "2"], "unknown option --max-steps; did you mean --train.max_steps?"),
    (["--dryrun", "--train.lr=1"], "unknown option --dryrun; overrides look like"),  # never --dryrun's "value"
    (["--data.datasets.0.path=x"], "must name section.key"),
])
def test_malformed_overrides(argv, needle):
    assert needle in _error(argv)


# ---------------------------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("override, needle", [
    ("--train.lr_warmup_ration=0.1", "unknown key 'train.lr_warmup_ration'; did you mean 'train.lr_warmup_ratio'?"),
    ("--train.save_step=3", "did you mean 'train.save_steps'?"),
    ("--model.attn_implmentation=xla", "did you mean 'model.attn_implementation'?"),
    ("--model.lr=1e-5", "unknown key 'model.lr'; did you mean 'train.lr'?"),
    ("--trian.lr=1", "unknown section 'trian'; did you mean 'train'?"),
    ("--train.zzqqxx=1", "see docs/CONFIG.md"),
])
def test_unknown_keys_suggest_the_nearest(override, needle):
    assert needle in _error([override])


def test_unknown_key_in_a_file_and_in_a_dataset_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'lora\.lora_rank'\?"):
        load_config(_write(tmp_path, "lora:\n  lora_rnak: 8\n"))
    message = _error(raw={"data": {"datasets": [{"path": "a"}, {"path": "b", "tpye": "text"}]}})
    assert message == "unknown key 'data.datasets[1].tpye'; did you mean 'data.datasets[1].type'?"


# ---------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize("override, needle", [
    ("--train.lr=fast", "train.lr must be float, got 'fast'"),
    ("--train.micro_batch_size=2.5", "train.micro_batch_size must be int, got 2.5"),
    ("--train.micro_batch_size=true", "train.micro_batch_size must be int, got True"),
    ("--train.save_async=1", "train.save_async must be bool, got 1"),
    ("--lora.lora_target_modules=q_proj", "lora.lora_target_modules must be list of str"),
    ("--data.datasets={path: a}", "data.datasets must be list of mapping"),
    ("--train.expert_parallel_size=[8]", "train.expert_parallel_size must be int or str"),
])
def test_wrong_types_name_key_type_and_value(override, needle):
    assert needle in _error([override])


def test_bad_section_shapes(tmp_path):
    assert "section 'train' must be a mapping" in _error(raw={"train": [1, 2]})
    assert "a config must be a mapping" in _error(raw=[1])
    with pytest.raises(ConfigError, match=r"c\.yaml line 3: not valid YAML"):
        load_config(_write(tmp_path, "train:\n  lr: [1\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))
    # a section or key given twice: YAML keeps the last, which would drop train.max_steps silently
    with pytest.raises(ConfigError, match=r"c\.yaml line 4: .*'train' is given twice"):
        load_config(_write(tmp_path, "train:\n  max_steps: 7\n  lr: 1.0e-5\ntrain:\n  lr: 2.0e-5\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml line 3: .*'lr' is given twice"):
        load_config(_write(tmp_path, "train:\n  lr: 1.0e-5\n  lr: 2.0e-5\n"))


@pytest.mark.parametrize("override, needle", [
    ("--model.attn_implementation=auto_magic", "model.attn_implementation must be one of auto|cudnn|xla"),
    ("--data.sample_packing_method=greedy", "must be one of sequential|multipack"),
    ("--train.lr_decay_style=step", "must be one of constant|linear|cosine"),
    ("--train.remat_policy=everything", "must be one of auto|full|dots_saveable"),
])
def test_choices(override, needle):
    assert needle in _error([override])


# ---------------------------------------------------------------------------------------------- PyTorch values
@pytest.mark.parametrize("override, field, value", [
    ("--model.attn_implementation=flash_attention_2", "model.attn_implementation", "auto"),
    ("--model.attn_implementation=flash_attention_3", "model.attn_implementation", "auto"),
    ("--model.attn_implementation=flash_attention_4", "model.attn_implementation", "auto"),
    ("--model.attn_implementation=sdpa", "model.attn_implementation", "auto"),
    ("--model.attn_implementation=eager", "model.attn_implementation", "auto"),
    ("--model.attn_implementation=flex_attention", "model.attn_implementation", "auto"),
    ("--model.attn_implementation=null", "model.attn_implementation", "auto"),
    ("--model.moe_implementation=quack", "model.moe_implementation", "triton"),
    ("--model.moe_implementation=null", "model.moe_implementation", "auto"),
    ("--model.ep_dispatch=deepep", "model.ep_dispatch", "alltoall"),
    ("--model.router_fp32=null", "model.router_fp32", True),
    ("--model.lm_head_fp32=null", "model.lm_head_fp32", True),
    ("--train.ckpt_manager=dcp", "train.ckpt_manager", "orbax"),
    ("--train.data_parallel_mode=fsdp", "train.data_parallel_mode", "fsdp2"),
    ("--train.optimizer_dtype=fp32", "train.optimizer_dtype", "float32"),
    ("--train.gradient_checkpointing_method=recompute_before_dispatch", "train.remat_policy",
     "dots_attention_saveable"),
    ("--train.gradient_checkpointing_method=no_recompute", "train.remat_policy", "none"),
    ("--train.max_grad_norm=-1", "train.max_grad_norm", 0.0),
])
def test_pytorch_values_map_to_the_equivalent_with_a_note(override, field, value, caplog):
    with caplog.at_level(logging.INFO, logger="xorl_jax.config"):
        cfg = load_config(None, [override])
    section, name = field.split(".")
    assert getattr(getattr(cfg, section), name) == value
    if "null" not in override:
        assert override[2:].split("=")[0] in caplog.text  # one line says what became of it


@pytest.mark.parametrize("override, needle", [
    ("--train.optimizer=distsignsgd", "use signsgd"),
    ("--lora.enable_qlora=true", "QLoRA is not supported"),
    ("--train.enable_fp8_training=true", "FP8 training is not supported"),
    ("--train.softmax_auxiliary_loss=true", "z-loss is not supported"),
    ("--train.lr_start=1e-6", "warmup starts from a learning rate of 0"),
    ("--train.gradient_checkpointing_method=sometimes", "not one of xorl's"),
    ("--train.ulysses_parallel_size=0", "must be an integer >= 1"),
    ("--train.ringattn_parallel_size=-1", "must be an integer >= 1"),
    ("--train.pipeline_parallel_size=4", "pipeline parallelism is not supported yet; set it to 1"),
])
def test_what_has_no_equivalent_says_what_to_use(override, needle):
    key = override[2:].split("=")[0]
    message = _error([override])
    assert key in message and needle in message


@pytest.mark.parametrize("override", ["--train.use_wandb=true", "--train.enable_activation_offload=true",
                                      "--train.fsdp_reduce_dtype=bf16", "--data.dataloader_drop_last=true"])
def test_what_changes_no_training_warns_and_runs(override, caplog):
    with caplog.at_level(logging.WARNING, logger="xorl_jax.config"):
        load_config(None, [override])
    assert override[2:].split("=")[0] in caplog.text and "not available" in caplog.text


def test_supported_alternatives_are_accepted():
    cfg = load_config(None, ["--model.attn_implementation=cudnn", "--model.moe_implementation=triton",
                             "--train.optimizer=sgd", "--train.data_parallel_mode=ddp",
                             "--train.data_parallel_shard_size=1", "--train.data_parallel_replicate_size=-1"])
    assert (cfg.model.attn_implementation, cfg.model.moe_implementation, cfg.train.optimizer) == ("cudnn", "triton",
                                                                                                  "sgd")


def test_keys_with_no_effect_are_named_in_one_info_line(caplog):
    with caplog.at_level(logging.INFO, logger="xorl_jax.config"):
        cfg = config_from_dict({"data": {"dataloader_pin_memory": True, "dataset_num_proc": 8},
                                "train": {"init_device": "meta", "enable_compile": True, "empty_cache_steps": 500},
                                "model": {"merge_qkv": False}, "distill": {"enable_distillation": False}})
    lines = [r for r in caplog.records if "no effect here" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    for key in ("data.dataloader_pin_memory", "data.dataset_num_proc", "train.init_device", "train.enable_compile",
                "train.empty_cache_steps", "model.merge_qkv"):
        assert key in lines[0].getMessage()
    assert cfg == config_from_dict(None)  # and nothing else changed
    assert "distillation is not supported" in _error(raw={"distill": {"enable_distillation": True}})
    assert "unknown key 'distill.teacher'" in _error(raw={"distill": {"teacher": "x"}})


def test_renamed_key_conflicting_with_its_target():
    message = _error(["--train.gradient_checkpointing_method=no_recompute", "--train.remat_policy=full"])
    assert "disagree" in message and "train.remat_policy" in message


# ---------------------------------------------------------------------------------------------- combinations
@pytest.mark.parametrize("overrides, needle", [
    (["--train.lr_warmup_ratio=1.5"], "train.lr_warmup_ratio must be in [0, 1]"),
    (["--train.lr_warmup_ratio=-0.1"], "train.lr_warmup_ratio must be in [0, 1]"),
    (["--train.lr_decay_ratio=2"], "train.lr_decay_ratio must be in [0, 1]"),
    (["--train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
    (["--train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps must be >= 1"),
    (["--train.save_total_limit=0"], "train.save_total_limit must be >= 1"),
    (["--data.sample_packing_sequence_len=0"], "data.sample_packing_sequence_len must be > 0"),
    (["--data.pad_to_multiple_of=0"], "data.pad_to_multiple_of must be >= 1"),
    (["--lora.enable_lora=true", "--lora.lora_rank=0"], "lora.lora_rank must be >= 1"),
    (["--lora.enable_lora=true", "--train.tensor_parallel_size=2"], "cannot be combined with lora.enable_lora"),
    (["--lora.enable_lora=true", "--lora.lora_target_modules=[]"], "both empty"),
    (["--train.expert_parallel_size=0"], "train.expert_parallel_size must be -1, auto or >= 1"),
    (["--train.expert_parallel_size=-2"], "train.expert_parallel_size must be -1, auto or >= 1"),
    (["--train.expert_parallel_size=eight"], "train.expert_parallel_size must be -1, auto or >= 1"),
    (["--train.lr=1e-5", "--train.lr_min=1e-4"], "train.lr_min (0.0001) must be between 0 and train.lr"),
    (["--train.lr=0"], "train.lr must be > 0"),
    (["--train.lr=.nan"], "train.lr must be > 0"),
    (["--train.max_steps=0"], "train.max_steps must be >= 1"),
    (["--train.max_nonfinite_steps=0"], "train.max_nonfinite_steps must be >= 1"),
    (["--train.data_parallel_replicate_size=-1"], "train.data_parallel_replicate_size and "
                                                   "train.data_parallel_shard_size are all -1/auto"),
    (["--train.expert_parallel_size=auto"], "only one size can take the devices"),
    (["--train.tensor_parallel_size=-1"], "only one size can take the devices"),
    (["--train.data_parallel_shard_size=8", "--train.expert_parallel_size=3"], "must divide"),
    (["--train.data_parallel_shard_size=0"], "train.data_parallel_shard_size must be -1 (fill) or >= 1"),
    (["--train.data_parallel_mode=ddp", "--train.data_parallel_shard_size=4"], "ddp"),
    (["--train.data_parallel_mode=none", "--train.data_parallel_replicate_size=2"], "one data-parallel rank"),
    (["--train.adam_beta2=1"], "train.adam_beta2 must be in [0, 1)"),
    (["--data.datasets=[{type: text}]"], "data.datasets[0].path is missing"),
    (["--data.datasets=[{path: a, max_seq_len: 0}]"], "data.datasets[0].max_seq_len must be > 0"),
])
def test_impossible_combinations(overrides, needle):
    assert needle in _error(overrides)


def test_edge_values_that_are_allowed():
    cfg = load_config(None, ["--train.lr_warmup_ratio=0", "--train.lr=1e-5", "--train.lr_min=1e-5",
                             "--train.max_steps=-1",
                             "--train.expert_parallel_size=-1", "--train.data_parallel_shard_size=8",
                             "--train.max_grad_norm=0", "--lora.enable_lora=true",
                             "--lora.lora_rank=1", "--train.save_total_limit=1"])
    assert cfg.train.lr_min == cfg.train.lr and cfg.lora.lora_rank == 1


def test_data_parallel_mode_becomes_sizes():
    ddp = load_config(None, ["--train.data_parallel_mode=ddp"]).train
    assert (ddp.data_parallel_shard_size, ddp.data_parallel_replicate_size) == (1, -1)
    ddp4 = load_config(None, ["--train.data_parallel_mode=ddp", "--train.data_parallel_replicate_size=4"]).train
    assert (ddp4.data_parallel_shard_size, ddp4.data_parallel_replicate_size) == (1, 4)
    none = load_config(None, ["--train.data_parallel_mode=none", "--train.tensor_parallel_size=-1"]).train
    assert (none.data_parallel_shard_size, none.data_parallel_replicate_size) == (1, 1)
    fsdp = load_config(None, ["--train.data_parallel_replicate_size=2"]).train
    assert (fsdp.data_parallel_shard_size, fsdp.data_parallel_replicate_size) == (-1, 2)
    assert config_from_dict(config_to_dict(load_config(None, ["--train.data_parallel_mode=ddp"]))).train == ddp


def test_disabled_lora_ignores_its_rank():
    assert load_config(None, ["--lora.lora_rank=0"]).lora.lora_rank == 0


# ---------------------------------------------------------------------------------------------- CLI
def test_parse_cli_needs_weights_and_data(tmp_path):
    path = _write(tmp_path, "data:\n  datasets:\n    - {path: d.jsonl, type: text}\n")
    with pytest.raises(ConfigError, match="model.model_path is not set"):
        parse_cli(["--config", path])
    cfg = parse_cli([f"--config={path}", "--model.model_path", "ckpt/"])
    assert cfg.model.model_path == "ckpt/" and cfg.data.datasets[0].type == "text"
    assert parse_cli(["--config", path, "--train.init_from=scratch", "--model.config_path=c.json"]).model.config_path
    with pytest.raises(ConfigError, match="model.config_path"):
        parse_cli(["--config", path, "--train.init_from=scratch"])
    with pytest.raises(ConfigError, match="data.datasets is empty"):
        parse_cli(["--model.model_path=ckpt/"])
    with pytest.raises(ConfigError, match="no config given"):
        parse_cli([])
    with pytest.raises(ConfigError, match="--config needs a YAML file"):
        parse_cli(["--config"])


def test_train_cli_exits_2_with_one_line(tmp_path):
    path = _write(tmp_path, "train:\n  lr_warmup_ration: 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "xorl_jax.train", "--config", path], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown key 'train.lr_warmup_ration'; did you mean "
                                   "'train.lr_warmup_ratio'?")


def test_config_module_does_not_import_jax():
    code = "import sys, xorl_jax.config; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(str(REPO / "configs/qwen3_30b_a3b_full.yaml"),
                      ["--train.lr=3e-5", "--lora.lora_target_parameters=[experts.gate_up_proj]",
                       "--data.eval_datasets=[{path: e.jsonl, type: messages, data_files: [a, b], weight: 0.5}]",
                       "--train.expert_parallel_size=auto", "--train.data_parallel_shard_size=8"])
    plain = config_to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # plain data only
    path = _write(tmp_path, yaml.safe_dump(plain))
    assert load_config(path) == cfg
    assert config_from_dict(plain) == cfg
    assert config_from_dict(config_to_dict(Config())) == Config()


def test_round_trip_through_json():
    import json

    cfg = load_config(None, ["--train.max_steps=7", "--data.datasets=[{path: x}]"])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


# ---------------------------------------------------------------------------------------------- reference
def test_config_reference_is_up_to_date():
    on_disk = (REPO / "docs/CONFIG.md").read_text()
    assert on_disk == render_config_reference(), "regenerate with: python -m xorl_jax.config > docs/CONFIG.md"


def test_reference_lists_every_field():
    text = render_config_reference()
    for cls in (*config_lib.SECTIONS.values(), DatasetConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text
    assert "`flash_attention_3`" in text and "MIGRATING_FROM_XORL.md" in text
