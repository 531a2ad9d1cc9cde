"""Typed training config: YAML sections `model`, `data`, `train`, `lora` with xorl's field names.

    cfg = load_config("configs/qwen3_8b_full.yaml", ["--train.lr=2e-5", "--train.max_steps", "100"])
    cfg = parse_cli(sys.argv[1:])          # --config FILE plus overrides
    plain = config_to_dict(cfg)            # saved with checkpoints; load_config / config_from_dict read it back

Everything is checked when the config is loaded: unknown keys (with the nearest valid key suggested), types,
allowed values, values that only make sense in xorl's PyTorch stack (with what to use instead) and impossible
combinations. Errors are `ConfigError`, one line naming the key. Keys from xorl that have no meaning in JAX are
accepted with a warning; see the tables at the end of this file and docs/CONFIG.md (made by
`render_config_reference()`, i.e. `python -m xorl_jax.config > docs/CONFIG.md`).

No JAX import here: the CLI reports config mistakes before JAX starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

log = logging.getLogger("xorl_jax.config")


class ConfigError(ValueError):
    """A config mistake. The message is one line naming the key and what to do."""


def _field(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple = (), factory: Callable | None = None):
    metadata = {"help": help, "choices": tuple(choices)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig:
    model_path: str | None = _field(
        None, "Hugging Face checkpoint directory (safetensors + config.json) or an Orbax directory from "
        "`xorl_jax.convert to-orbax`")
    config_path: str | None = _field(None, "where config.json comes from if not model_path (needed for "
                                           "train.init_from: scratch without model_path)")
    tokenizer_path: str | None = _field(None, "tokenizer directory; null = model_path")
    attn_implementation: str = _field("auto", "attention backend; auto = cudnn on GPU, xla elsewhere",
                                      choices=("auto", "cudnn", "xla"))
    moe_implementation: str = _field(
        "auto", "MoE expert matmuls: triton (jax-triton grouped GEMM), native (lax.ragged_dot), eager "
        "(dense jnp reference); auto = fastest correct one for the device",
        choices=("auto", "triton", "native", "eager"))
    gdn_implementation: str = _field(
        "auto", "Qwen3.5 Gated DeltaNet: pallas kernel, chunked or recurrent jnp; auto = pallas on GPU, chunked "
        "elsewhere", choices=("auto", "pallas", "chunked", "recurrent"))
    ep_dispatch: str = _field("alltoall", "how tokens travel between expert-parallel ranks: alltoall (fixed-size "
                                          "buffers, any platform) or ragged (ragged all-to-all: only the real rows; "
                                          "GPU only)", choices=("alltoall", "ragged"))
    scan_layers: bool = _field(True, "apply the layers with one scan (compile time flat in depth); false = unroll "
                                     "them: no stacked copies of what remat keeps, longer compilation")
    router_fp32: bool = _field(True, "compute router logits and softmax in float32")
    lm_head_fp32: bool = _field(True, "compute the output projection's logits and the loss in float32")
    freeze_router: bool = _field(False, "do not update MoE router weights")
    dtype: str = _field("bfloat16", "compute dtype of activations and matmuls (train.enable_mixed_precision: "
                                    "false forces float32; float16 is not offered: there is no loss scaling)",
                      choices=("bfloat16", "float32"))
    param_dtype: str = _field("float32", "storage dtype of parameters (and their gradients); bfloat16 weights are "
                                         "updated with unbiased stochastic rounding, so updates smaller than a bf16 "
                                         "step are kept on average instead of lost",
                              choices=("float32", "bfloat16"))


@dataclass
class DatasetConfig:
    path: str | None = _field(None, "jsonl or parquet file, a directory of them, or a HF dataset saved to disk")
    type: str = _field("tokenized", "tokenized: input_ids (+ labels) rows; messages: OpenAI chat format, loss on "
                                    "assistant turns; text: plain text, loss on all tokens",
                       choices=("tokenized", "messages", "text"))
    split: str = _field("train", "split to read from a HF dataset on disk")
    data_files: str | list[str] | None = _field(None, "file(s) or glob(s) inside path to read; null = all")
    max_seq_len: int | None = _field(None, "longest document in tokens before data.long_sequence_policy "
                                           "applies; null = data.sample_packing_sequence_len")
    weight: float | None = _field(None, "sampling weight when mixing datasets; null = proportional to size")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = _field(help="training datasets: list of {path, type, split, data_files, "
                                                "max_seq_len, weight}", factory=list)
    eval_datasets: list[DatasetConfig] = _field(help="evaluation datasets, same shape as datasets", factory=list)
    select_columns: list[str] | None = _field(None, "columns to keep from tokenized rows; null = all needed ones")
    dataset_prepared_path: str | None = _field(None, "directory caching tokenized documents (one .npz per "
                                                     "distinct datasets + tokenizer + limits); null = no cache")
    sample_packing_method: str = _field("sequential", "sequential: documents in order; multipack: bin-packing "
                                                      "for fewer pad tokens", choices=("sequential", "multipack"))
    sample_packing_sequence_len: int = _field(4096, "tokens per packed row (the training sequence length)")
    pad_to_multiple_of: int = _field(1, "sample_packing_sequence_len must be a multiple of this (e.g. 128 for "
                                        "kernel tiles)")
    long_sequence_policy: str = _field("truncate", "what to do with a document longer than its max_seq_len: "
                                                   "keep the head or split it into pieces",
                                       choices=("truncate", "split"))
    skip_bad_rows: bool = _field(False, "skip malformed rows with a warning instead of stopping")
    seed: int = _field(42, "seed of data shuffling")
    shuffle: bool = _field(True, "shuffle documents every epoch")
    dataloader_num_workers: int = _field(0, "> 0: a background thread packs batches ahead of the device step "
                                            "(0 = in the main thread between steps)")
    dataloader_prefetch_factor: int | None = _field(None, "batches prepared ahead = num_workers x this; null = 2")
    dataloader_pin_memory: bool = _field(False, "accepted for xorl configs; no effect (JAX copies batches to "
                                                "the devices itself)")


@dataclass
class TrainConfig:
    output_dir: str = _field("outputs", "run directory: checkpoints, metrics, exported weights")
    init_from: str = _field("auto", "initial weights: hf or orbax checkpoint in model.model_path, scratch = "
                                    "random init from config.json; auto = hf or orbax by what model_path holds",
                            choices=("auto", "hf", "orbax", "scratch"))
    # parallelism
    data_parallel_mode: str = _field(
        "fsdp2", "fsdp2: params, grads and optimizer state sharded over the FSDP group (HSDP with "
        "data_parallel_replicate_size > 1); ddp: params replicated, the batch split (the shard size becomes 1 "
        "and the replicas fill); none: one data-parallel rank (see Parallelism below)",
        choices=("fsdp2", "ddp", "none"))
    data_parallel_shard_size: int = _field(-1, "devices in one FSDP group, expert ranks included; -1 = the "
                                               "devices the other sizes leave")
    data_parallel_replicate_size: int = _field(1, "FSDP groups holding the same shards (HSDP replicas); -1 = "
                                                  "the devices the other sizes leave")
    tensor_parallel_size: int = _field(1, "size of the tensor mesh axis (Megatron-style sharding of heads, MLP "
                                          "and vocab); -1 = the devices the other sizes leave")
    expert_parallel_size: int | str = _field(1, "expert-parallel ranks for MoE models, carved out of the FSDP "
                                                "group (must divide data_parallel_shard_size); -1 or auto = the "
                                                "whole FSDP group")
    ulysses_parallel_size: int = _field(1, "sequence parallelism: only 1 is supported")
    ringattn_parallel_size: int = _field(1, "ring attention: only 1 is supported")
    pipeline_parallel_size: int = _field(1, "pipeline parallelism: only 1 is supported")
    # batch and length of the run
    micro_batch_size: int = _field(1, "packed rows per data-parallel rank per micro-batch")
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer update")
    num_train_epochs: float = _field(1.0, "epochs over data.datasets (used when max_steps is null)")
    max_steps: int | None = _field(None, "optimizer updates to run; null or -1 = from num_train_epochs")
    # optimizer and schedule
    optimizer: str = _field("adamw", "optimizer", choices=("adamw", "sgd"))
    optimizer_dtype: str = _field("float32", "dtype of optimizer moments", choices=("float32", "bfloat16"))
    lr: float = _field(1e-5, "peak learning rate")
    lr_min: float = _field(0.0, "learning rate at the end of decay")
    lr_warmup_ratio: float = _field(0.03, "fraction of the steps spent in linear warmup from 0 to lr")
    lr_decay_style: str = _field("cosine", "decay after warmup", choices=("constant", "linear", "cosine"))
    lr_decay_ratio: float = _field(1.0, "fraction of the steps after warmup over which lr decays to lr_min "
                                        "(then it stays at lr_min)")
    weight_decay: float = _field(0.0, "decoupled weight decay (optim.default_decay_mask picks the "
                                      "parameters it applies to)")
    adam_beta1: float = _field(0.9, "AdamW beta1 (SGD: momentum; 0 = none)")
    adam_beta2: float = _field(0.95, "AdamW beta2")
    adam_epsilon: float = _field(1e-8, "AdamW epsilon")
    max_grad_norm: float = _field(1.0, "clip the global gradient norm to this; 0 = no clipping")
    # memory and numerics
    enable_mixed_precision: bool = _field(True, "compute in model.dtype; false = compute in float32")
    enable_gradient_checkpointing: bool = _field(True, "rematerialise layer activations in the backward pass "
                                                       "with remat_policy")
    remat_policy: str = _field(
        "full", "what a layer keeps for the backward pass: full = nothing (recompute the layer), dots_saveable = "
        "matmul outputs, dots_attention_saveable = matmul (grouped expert GEMMs included), SwiGLU and "
        "fused-attention outputs, dots_with_no_batch_dims_saveable = weight matmul outputs, "
        "none = everything. Where memory allows, dots_attention_saveable is the fastest (one H200: Qwen3 1.7B at "
        "4 x 4096 tokens about 10% shorter steps than full for about 7 GiB more, and faster than none; the "
        "Qwen3-30B-A3B shapes cut to 4 layers 10% shorter for 1 GiB more, the Qwen3.5-35B-A3B cut 8% shorter)",
        choices=("full", "dots_saveable", "dots_attention_saveable", "dots_with_no_batch_dims_saveable", "none"))
    enable_full_shard: bool = _field(True, "accepted for xorl configs; parameters always stay sharded between "
                                           "uses (XLA gathers them per layer), false has no effect")
    ce_chunk_size: int = _field(2048, "tokens per chunk of the chunked cross-entropy: each chunk's [tokens, vocab] "
                                      "fp32 logits exist at once (2048 x 151936 = 1.2 GiB), the whole batch's never")
    router_aux_loss_coef: float | None = _field(None, "MoE load-balancing loss weight; null = the checkpoint's "
                                                      "router_aux_loss_coef")
    max_nonfinite_steps: int = _field(5, "stop after this many updates in a row skipped for a non-finite loss "
                                         "or gradient (each skip's log line names the parameters whose gradients "
                                         "were non-finite)")
    compilation_cache_dir: str | None = _field("auto", "persistent XLA compilation cache: a restart or resume "
                                                       "reuses the compiled step instead of compiling again; auto = "
                                                       "~/.cache/xorl_jax/xla on GPUs, off on CPU; null = off")
    enable_full_determinism: bool = _field(False, "ask XLA for deterministic GPU ops (XLA_FLAGS "
                                                  "--xla_gpu_deterministic_ops=true; slower); must be set before "
                                                  "JAX starts, as the CLI does")
    seed: int = _field(42, "seed of parameter init (scratch, LoRA) and dropout")
    # checkpoints, eval, logging
    ckpt_manager: str = _field("orbax", "checkpoint format of training state", choices=("orbax",))
    save_steps: int = _field(0, "save a training checkpoint every N updates; 0 = only at the end")
    save_total_limit: int | None = _field(None, "newest training checkpoints to keep; null = all")
    save_at_end: bool = _field(True, "save a training checkpoint when the run ends (false for benchmarks; a stop "
                                     "signal still saves)")
    save_async: bool = _field(True, "write checkpoints in the background while training continues")
    save_hf_weights: bool = _field(False, "export Hugging Face safetensors (bf16) at the end of the run")
    load_checkpoint_path: str | None = _field(None, "training checkpoint to resume from; auto = the newest "
                                                    "complete one in output_dir, if any")
    eval_steps: int = _field(0, "evaluate on data.eval_datasets every N updates; 0 = only at the end")
    log_steps: int = _field(1, "log metrics every N updates")
    sample_eval_prompts: int = _field(0, "after training, print greedy answers to the first N conversations of "
                                         "data.eval_datasets (messages type); 0 = off")
    use_tensorboard: bool = _field(True, "write TensorBoard event files to output_dir")
    use_wandb: bool = _field(False, "Weights & Biases logging is not available: must stay false")


@dataclass
class LoraConfig:
    enable_lora: bool = _field(False, "train low-rank adapters instead of all weights")
    lora_rank: int = _field(16, "adapter rank")
    lora_alpha: float = _field(16.0, "adapter scale numerator: the update is (alpha / rank) * B @ A")
    lora_dropout: float = _field(0.0, "dropout on the adapter input")
    lora_target_modules: list[str] = _field(
        help="linear layers that get adapters, by name",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_target_parameters: list[str] = _field(help="stacked expert weights that get adapters, by name (e.g. "
                                                    "experts.gate_up_proj)", factory=list)
    save_lora_only: bool = _field(True, "save and export only the adapters (a PEFT adapter directory)")
    enable_qlora: bool = _field(False, "QLoRA is not supported yet: must stay false")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig}

# ------------------------------------------------------------------------------ xorl (PyTorch) compatibility
_USE_ADAMW = "not supported yet; use adamw (or sgd)"
# Values of valid keys that name PyTorch machinery: key -> {value: what to use instead}.
PYTORCH_VALUES: dict[str, dict[str, str]] = {
    "model.attn_implementation": {
        v: "a PyTorch attention backend; use cudnn (GPU) or xla, or auto"
        for v in ("flash_attention_2", "flash_attention_3", "flash_attention_4", "sdpa", "eager", "native",
                  "flex_attention")},
    "model.moe_implementation": {"quack": "a PyTorch kernel library; use triton (or auto)"},
    "model.ep_dispatch": {"deepep": "PyTorch-only (DeepEP); use alltoall or ragged"},
    "train.optimizer": {v: _USE_ADAMW for v in ("anyprecision_adamw", "signsgd", "distsignsgd", "muon")},
    "train.ckpt_manager": {"dcp": "PyTorch Distributed Checkpoint; use orbax"},
    "train.data_parallel_mode": {"fsdp": "FSDP1; use fsdp2 (sharded params) or ddp"},
}

# xorl keys that mean nothing here: accepted, a warning says why, and dropped.
IGNORED_KEYS: dict[str, str] = {
    "model.merge_qkv": "q, k and v stay separate parameters here, as in the HF checkpoint",
    "model.deepep_buffer_size_gb": "DeepEP is PyTorch-only",
    "model.deepep_num_sms": "DeepEP is PyTorch-only",
    "train.enable_compile": "not needed: XLA compiles every step",
    "train.init_device": "the model is always built abstractly and each device materialises only its shard "
                         "(what meta-device init achieves in PyTorch)",
    "train.load_weights_mode": "the checkpoint reader decides how to read shards",
    "train.empty_cache_steps": "XLA manages device memory; there is no cache to empty",
    "train.ce_mode": "the loss is always a chunked float32 cross-entropy (see train.ce_chunk_size)",
    "train.pipeline_parallel_schedule": "pipeline parallelism is not supported",
    "train.pipeline_parallel_virtual_stages": "pipeline parallelism is not supported",
    "train.cp_fsdp_mode": "context parallelism is not supported",
    "train.muon_lr": "muon is not supported",
    "train.muon_momentum": "muon is not supported",
    "train.muon_ns_steps": "muon is not supported",
    "lora.quant_format": "QLoRA is not supported",
    "lora.quant_group_size": "QLoRA is not supported",
}

# xorl switches for features that do not exist here: false/0/None accepted silently, anything else is an error.
UNSUPPORTED_SWITCHES: dict[str, str] = {
    "train.enable_activation_offload": "activation offload is not supported; use train.remat_policy",
    "train.enable_fp8_training": "FP8 training is not supported",
    "train.enable_qarl": "QARL is not supported",
    "train.softmax_auxiliary_loss": "not supported; the MoE aux loss follows HF's load_balancing_loss_func",
    "train.moe_global_load_balancing": "not supported; the MoE aux loss follows HF's load_balancing_loss_func",
    "lora.merge_lora_interval": "ReLoRA-style merging is not supported",
    "lora.moe_hybrid_shared_lora": "hybrid shared LoRA is not supported",
    "distill.enable_distillation": "distillation is not supported; remove the distill section",
}

_XORL_REMAT = {"recompute_full_layer": "full", "no_recompute": "none"}


def _rename_remat(value):
    if value in _XORL_REMAT:
        return "train.remat_policy", _XORL_REMAT[value]
    raise ConfigError(f"train.gradient_checkpointing_method {value!r} has no JAX equivalent; use train.remat_policy "
                      f"(full|dots_saveable|dots_attention_saveable|dots_with_no_batch_dims_saveable|none)")


def _rename_train_router(value):
    if not isinstance(value, bool):
        raise ConfigError(f"model.train_router must be a bool, got {value!r}")
    return "model.freeze_router", not value


def _reject_ce_num_chunks(value):
    raise ConfigError("train.ce_num_chunks is not used; set train.ce_chunk_size (tokens per chunk) instead")


# xorl names of fields that exist here under another name: key -> value -> (new key, new value).
RENAMED_KEYS: dict[str, tuple[str, Callable[[Any], tuple[str, Any]]]] = {
    "train.gradient_checkpointing_method": ("recompute_full_layer -> remat_policy full, no_recompute -> none",
                                            _rename_remat),
    "model.train_router": ("model.freeze_router = not train_router", _rename_train_router),
    "train.ce_num_chunks": ("rejected: use train.ce_chunk_size", _reject_ce_num_chunks),
}

# ------------------------------------------------------------------------------------------------- types
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$", re.IGNORECASE)
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return tp.__name__


def _coerce(value, tp, key: str):
    """`value` checked against the annotation `tp` (and converted where YAML is lossy); ConfigError otherwise."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads 2e-5 and 1e3 as strings.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
        if isinstance(value, tp):
            return _build(tp, dataclasses.asdict(value), key)
    else:  # pragma: no cover - a field annotation this module does not handle
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _suggest(key: str) -> str:
    """' did you mean X?' for an unknown dotted key, or a pointer to the reference."""
    section, _, name = key.rpartition(".")
    base = re.sub(r"\[\d+\]", "", section)
    if base in SECTIONS:
        for other, cls in SECTIONS.items():
            if other != base and name in _hints(cls):
                return f"; did you mean '{other}.{name}'?"
    candidates = _field_names(base)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{section}.{close[0]}'?"
    everywhere = [f"{s}.{n}" for s, cls in SECTIONS.items() for n in _hints(cls)]
    close = difflib.get_close_matches(key, everywhere, n=1, cutoff=0.75)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; see docs/CONFIG.md for the keys of '{base}'"


def _field_names(section: str) -> list[str]:
    cls = SECTIONS.get(section, DatasetConfig if section.endswith("datasets") else None)
    return list(_hints(cls)) if cls else []


def _translate_xorl(section: str, raw: dict) -> dict:
    """Drop ignored xorl keys (with a warning), apply renames, reject unsupported switches."""
    out = {}
    for name, value in raw.items():
        key = f"{section}.{name}"
        if key in IGNORED_KEYS:
            log.warning("config: %s is ignored: %s", key, IGNORED_KEYS[key])
        elif key in UNSUPPORTED_SWITCHES:
            if value not in (None, False, 0):
                raise ConfigError(f"{key}: {value!r}: {UNSUPPORTED_SWITCHES[key]}")
        elif key in RENAMED_KEYS:
            new_key, new_value = RENAMED_KEYS[key][1](value)
            new_name = new_key.split(".", 1)[1]
            if new_name in raw and raw[new_name] != new_value:
                raise ConfigError(f"{key} ({value!r}) and {new_key} ({raw[new_name]!r}) disagree; keep only {new_key}")
            out[new_name] = new_value
        else:
            out[name] = value
    return out


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {raw!r}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        if not isinstance(name, str) or name not in hints:
            raise ConfigError(f"unknown key '{key}'{_suggest(key)}")
        value = _coerce(value, hints[name], key)
        meta = cls.__dataclass_fields__[name].metadata
        pytorch = PYTORCH_VALUES.get(f"{prefix}.{name}", {})
        if isinstance(value, str) and value in pytorch:
            raise ConfigError(f"{key}: {value!r} is {pytorch[value]}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key} must be one of {'|'.join(meta['choices'])}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------ validation
def _need(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def config_sizes(t: TrainConfig) -> dict[str, int | str]:
    """The four mesh sizes as the mesh builder reads them, after data_parallel_mode is applied."""
    shard, replicate = t.data_parallel_shard_size, t.data_parallel_replicate_size
    if t.data_parallel_mode == "ddp" and shard == -1:
        shard, replicate = 1, (-1 if replicate == 1 else replicate)
    elif t.data_parallel_mode == "none":
        shard, replicate = 1, 1
    return {"data_parallel_replicate_size": replicate, "data_parallel_shard_size": shard,
            "expert_parallel_size": t.expert_parallel_size, "tensor_parallel_size": t.tensor_parallel_size}


def _apply_data_parallel_mode(t: TrainConfig):
    """ddp and none are spelled as sizes, so the mesh builder only reads sizes."""
    sizes = config_sizes(t)
    t.data_parallel_shard_size = sizes["data_parallel_shard_size"]
    t.data_parallel_replicate_size = sizes["data_parallel_replicate_size"]


def validate(cfg: Config) -> Config:
    """Value ranges and combinations; raises ConfigError on the first problem."""
    d, t, lo = cfg.data, cfg.train, cfg.lora

    for list_name in ("datasets", "eval_datasets"):
        for i, ds in enumerate(getattr(d, list_name)):
            key = f"data.{list_name}[{i}]"
            _need(bool(ds.path), f"{key}.path is missing; give a file, directory or HF dataset saved to disk")
            _need(ds.max_seq_len is None or ds.max_seq_len > 0, f"{key}.max_seq_len must be > 0, got {ds.max_seq_len}")
            _need(ds.weight is None or (math.isfinite(ds.weight) and ds.weight > 0),
                  f"{key}.weight must be > 0, got {ds.weight}")
    _need(d.sample_packing_sequence_len > 0,
          f"data.sample_packing_sequence_len must be > 0, got {d.sample_packing_sequence_len}")
    _need(d.pad_to_multiple_of >= 1, f"data.pad_to_multiple_of must be >= 1, got {d.pad_to_multiple_of}")
    _need(d.sample_packing_sequence_len % d.pad_to_multiple_of == 0,
          f"data.sample_packing_sequence_len ({d.sample_packing_sequence_len}) must be a multiple of "
          f"data.pad_to_multiple_of ({d.pad_to_multiple_of})")
    _need(d.dataloader_num_workers >= 0, f"data.dataloader_num_workers must be >= 0, got {d.dataloader_num_workers}")
    _need(d.dataloader_prefetch_factor is None or d.dataloader_prefetch_factor >= 1,
          f"data.dataloader_prefetch_factor must be >= 1, got {d.dataloader_prefetch_factor}")

    # parallelism
    for name in ("ulysses_parallel_size", "ringattn_parallel_size", "pipeline_parallel_size"):
        value = getattr(t, name)
        _need(value == 1, f"train.{name}={value} is not supported yet; set it to 1 (use data, expert or tensor "
                          f"parallelism)")
    for name in ("data_parallel_shard_size", "data_parallel_replicate_size", "tensor_parallel_size"):
        value = getattr(t, name)
        _need(value == -1 or value >= 1, f"train.{name} must be -1 (fill) or >= 1, got {value}")
    ep = t.expert_parallel_size
    _need(ep == -1 or ep == "auto" or (isinstance(ep, int) and ep >= 1),
          f"train.expert_parallel_size must be -1, auto or >= 1, got {ep!r}")
    if t.data_parallel_mode == "ddp":
        _need(t.data_parallel_shard_size in (1, -1),
              f"train.data_parallel_shard_size={t.data_parallel_shard_size} shards parameters, which ddp does "
              f"not; use data_parallel_mode fsdp2 or set data_parallel_shard_size 1")
    if t.data_parallel_mode == "none":
        _need(t.data_parallel_shard_size in (1, -1) and t.data_parallel_replicate_size in (1, -1),
              "train.data_parallel_mode none means one data-parallel rank; set data_parallel_shard_size and "
              "data_parallel_replicate_size to 1 or use fsdp2/ddp")
    fills = [name for name in config_sizes(t) if config_sizes(t)[name] in (-1, "auto")]
    _need(len(fills) <= 1, f"train.{' and train.'.join(fills)} are all -1/auto, but only one size can take the "
                           f"devices the others leave; give the others explicit sizes")
    if isinstance(ep, int) and ep > 1 and isinstance(t.data_parallel_shard_size, int) \
            and t.data_parallel_shard_size > 0:
        _need(t.data_parallel_shard_size % ep == 0,
              f"train.expert_parallel_size={ep} must divide train.data_parallel_shard_size="
              f"{t.data_parallel_shard_size} (expert ranks are carved out of the FSDP group)")

    # batch and steps
    _need(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    _need(t.gradient_accumulation_steps >= 1,
          f"train.gradient_accumulation_steps must be >= 1, got {t.gradient_accumulation_steps}")
    _need(t.num_train_epochs > 0, f"train.num_train_epochs must be > 0, got {t.num_train_epochs}")
    _need(t.max_steps is None or t.max_steps == -1 or t.max_steps >= 1,
          f"train.max_steps must be >= 1 (or null/-1 to use num_train_epochs), got {t.max_steps}")

    # optimizer and schedule
    _need(math.isfinite(t.lr) and t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _need(0 <= t.lr_min <= t.lr, f"train.lr_min ({t.lr_min}) must be between 0 and train.lr ({t.lr})")
    _need(0 <= t.lr_warmup_ratio <= 1, f"train.lr_warmup_ratio must be in [0, 1], got {t.lr_warmup_ratio}")
    _need(0 <= t.lr_decay_ratio <= 1, f"train.lr_decay_ratio must be in [0, 1], got {t.lr_decay_ratio}")
    _need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _need(0 <= t.adam_beta1 < 1, f"train.adam_beta1 must be in [0, 1), got {t.adam_beta1}")
    _need(0 <= t.adam_beta2 < 1, f"train.adam_beta2 must be in [0, 1), got {t.adam_beta2}")
    _need(t.adam_epsilon > 0, f"train.adam_epsilon must be > 0, got {t.adam_epsilon}")
    _need(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (0 = no clipping), got {t.max_grad_norm}")

    # numerics, checkpoints, logging
    _need(t.ce_chunk_size >= 1, f"train.ce_chunk_size must be >= 1, got {t.ce_chunk_size}")
    _need(t.router_aux_loss_coef is None or t.router_aux_loss_coef >= 0,
          f"train.router_aux_loss_coef must be >= 0 (or null = the checkpoint's), got {t.router_aux_loss_coef}")
    _need(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    _need(t.save_steps >= 0, f"train.save_steps must be >= 0 (0 = only at the end), got {t.save_steps}")
    _need(t.save_total_limit is None or t.save_total_limit >= 1,
          f"train.save_total_limit must be >= 1 (or null = keep all), got {t.save_total_limit}")
    _need(t.eval_steps >= 0, f"train.eval_steps must be >= 0 (0 = only at the end), got {t.eval_steps}")
    _need(t.log_steps >= 1, f"train.log_steps must be >= 1, got {t.log_steps}")
    _need(t.sample_eval_prompts >= 0, f"train.sample_eval_prompts must be >= 0, got {t.sample_eval_prompts}")
    _need(bool(t.output_dir), "train.output_dir is empty; give a directory for checkpoints and metrics")
    _need(not t.use_wandb, "train.use_wandb: Weights & Biases is not available; set it false and use "
                           "train.use_tensorboard")

    # LoRA
    _need(not lo.enable_qlora, "lora.enable_qlora: QLoRA is not supported yet; set it false (plain LoRA works)")
    if lo.enable_lora:
        _need(lo.lora_rank >= 1, f"lora.lora_rank must be >= 1 with enable_lora, got {lo.lora_rank}")
        _need(lo.lora_alpha > 0, f"lora.lora_alpha must be > 0, got {lo.lora_alpha}")
        _need(0 <= lo.lora_dropout < 1, f"lora.lora_dropout must be in [0, 1), got {lo.lora_dropout}")
        _need(bool(lo.lora_target_modules or lo.lora_target_parameters),
              "lora.lora_target_modules and lora.lora_target_parameters are both empty; name the layers to adapt")
        _need(t.tensor_parallel_size == 1,
              f"train.tensor_parallel_size={t.tensor_parallel_size} cannot be combined with lora.enable_lora "
              f"(as in xorl); use data_parallel_shard_size instead")
        _need(t.init_from != "scratch", "lora.enable_lora with train.init_from scratch trains adapters on random "
                                        "weights; use hf or orbax")
    return cfg


# ------------------------------------------------------------------------------------------------ loading
def config_from_dict(raw: dict | None, overrides: list[str] | tuple = ()) -> Config:
    """Config from plain data (a parsed YAML file or `config_to_dict` output) plus CLI-style overrides."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, name, value in _parse_overrides(overrides):
        current = raw.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {current!r}")
        current[name] = value
    sections = {}
    for section, value in raw.items():
        if section == "distill":  # xorl's distillation section: accepted only when it switches nothing on
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"section 'distill' must be a mapping of keys to values, got {value!r}")
            for name, switch in (value or {}).items():
                if name != "enable_distillation" and switch not in (None, False, 0, ""):
                    log.warning("config: distill.%s is ignored: distillation is not supported", name)
            _translate_xorl("distill", {"enable_distillation": (value or {}).get("enable_distillation")})
            continue
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), list(SECTIONS), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; the sections are {', '.join(SECTIONS)}"
            raise ConfigError(f"unknown section '{section}'{hint}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {value!r}")
        sections[section] = _build(SECTIONS[section], _translate_xorl(section, value), section)
    cfg = Config(**sections)
    _warn_no_effect(cfg)
    validate(cfg)
    _apply_data_parallel_mode(cfg.train)
    return cfg


def _warn_no_effect(cfg: Config):
    if not cfg.train.enable_full_shard:
        log.warning("config: train.enable_full_shard false has no effect: parameters stay sharded between uses")


def load_config(path: str | None, overrides: list[str] | tuple = ()) -> Config:
    """Config from a YAML file (None = all defaults) plus `--section.key=value` / `--section.key value` overrides."""
    raw = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" line {where.line + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}{at}: not valid YAML ({problem})") from None
    return config_from_dict(raw, overrides)


def _parse_value(section: str, name: str, text: str):
    """An override string as YAML, falling back to the raw text for string fields (`--model.model_path=123`)."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    cls = SECTIONS.get(section)
    tp = _hints(cls).get(name) if cls else None
    if tp is not None and isinstance(value, (bool, int, float)):  # scalars only: a list stays a list
        try:
            _coerce(value, tp, f"{section}.{name}")
        except ConfigError:
            try:
                _coerce(text, tp, f"{section}.{name}")
                return text
            except ConfigError:
                pass
    return value


def _parse_overrides(overrides) -> list[tuple[str, str, Any]]:
    out = []
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        if not isinstance(arg, str) or not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            dotted, text = body.split("=", 1)
            i += 1
        else:
            dotted = body
            if i + 1 >= len(args):
                raise ConfigError(f"--{dotted} needs a value: --{dotted}=VALUE or --{dotted} VALUE")
            text = args[i + 1]
            i += 2
        parts = dotted.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override --{dotted} must name section.key (e.g. --train.lr=2e-5); lists such as "
                              f"data.datasets are given whole in YAML flow style")
        section, name = parts
        out.append((section, name, _parse_value(section, name, text)))
    return out


def parse_cli(argv: list[str]) -> Config:
    """`--config FILE` (or `--config=FILE`) plus overrides, checked for a runnable training job."""
    argv = list(argv)
    path = None
    rest = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file: --config FILE")
            path, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            path, i = arg.split("=", 1)[1], i + 1
        elif arg in ("-h", "--help"):
            raise ConfigError("usage: python -m xorl_jax.train --config FILE [--section.key=value ...]; "
                              "every key is listed in docs/CONFIG.md")
        else:
            rest.append(arg)
            i += 1
    if path is None and not rest:
        raise ConfigError("no config given; usage: python -m xorl_jax.train --config FILE [--section.key=value ...]")
    cfg = load_config(path, rest)
    check_runnable(cfg)
    return cfg


def check_runnable(cfg: Config) -> Config:
    """What a training run needs beyond a valid config: weights or an architecture, and data."""
    m, t = cfg.model, cfg.train
    if t.init_from == "scratch":
        _need(bool(m.model_path or m.config_path),
              "train.init_from scratch needs model.config_path (or model.model_path) for the architecture")
    else:
        _need(bool(m.model_path), "model.model_path is not set; give a HF or Orbax checkpoint directory "
                                  "(or --model.model_path=DIR)")
    _need(bool(cfg.data.datasets), "data.datasets is empty; add at least one {path, type} entry")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain dicts, lists and scalars; `config_from_dict` (or YAML + `load_config`) gives back an equal Config."""
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------ reference
def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"


def _table(cls) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += " (" + " \\| ".join(choices) + ")"
        type_text = str(f.type).replace("|", "\\|")
        lines.append(f"| `{f.name}` | {type_text} | {_default_text(f)} | {help_text} |")
    return lines


def render_config_reference() -> str:
    """The Markdown of docs/CONFIG.md, generated from the dataclasses' metadata."""
    out = [
        "# Config reference",
        "",
        "Generated by `python -m xorl_jax.config > docs/CONFIG.md` from the dataclasses in `xorl_jax/config.py`;",
        "a test fails when this file is out of date.",
        "",
        "A config is a YAML file with the sections `model`, `data`, `train` and `lora`; every key is optional.",
        "Override any key on the command line with `--section.key=value` or `--section.key value`; the value is",
        "read as YAML (`--train.lr=2e-5`, `--train.save_hf_weights=true`,",
        "`--lora.lora_target_modules=[q_proj,v_proj]`, `--data.datasets='[{path: a.jsonl, type: messages}]'`).",
        "Unknown keys, wrong types, values out of range and impossible combinations are errors with one line",
        "naming the key; a training run (`python -m xorl_jax.train`) also needs `model.model_path` (or",
        "`model.config_path` with `train.init_from: scratch`) and at least one entry in `data.datasets`.",
        "",
    ]
    for section, cls in SECTIONS.items():
        out += [f"## `{section}`", "", *_table(cls), ""]
        if section == "data":
            out += ["### Entries of `data.datasets` and `data.eval_datasets`", "", *_table(DatasetConfig), ""]
    out += [
        "## Parallelism",
        "",
        "The devices form a mesh with axes `data`, `fsdp`, `expert` and `tensor`, sized as in xorl:",
        "`data_parallel_replicate_size` x `data_parallel_shard_size` x `tensor_parallel_size` = the number of",
        "devices, and the `expert_parallel_size` ranks are carved out of the FSDP group (so with 8 devices,",
        "`data_parallel_shard_size: 8, expert_parallel_size: 4` gives fsdp 2 x expert 4). One size may be -1",
        "(or `auto` for `expert_parallel_size`, meaning the whole FSDP group) and takes what the others leave.",
        "`data_parallel_mode` keeps xorl's names and is applied to the sizes when the config is loaded:",
        "",
        "- `fsdp2` (default): parameters, gradients and optimizer state are sharded over the FSDP group and",
        "  replicated over `data_parallel_replicate_size` groups (HSDP). XLA gathers each layer's weights when",
        "  it runs.",
        "- `ddp`: parameters are replicated and the batch is split: `data_parallel_shard_size` -1 becomes 1 and",
        "  `data_parallel_replicate_size` 1 becomes -1 (the replicas fill the devices). A shard size > 1 is an error.",
        "- `none`: one data-parallel rank: both data-parallel sizes become 1 (the devices must go to",
        "  `tensor_parallel_size`, or there is one device).",
        "",
        "## Coming from xorl",
        "",
        "Values that name PyTorch machinery are rejected with what to use instead:",
        "",
        "| key | value | use instead |",
        "|---|---|---|",
    ]
    for key, values in PYTORCH_VALUES.items():
        for value, why in values.items():
            out.append(f"| `{key}` | `{value}` | {why} |")
    out += ["", "xorl keys accepted and ignored (a warning says why):", "", "| key | why |", "|---|---|"]
    out += [f"| `{k}` | {why} |" for k, why in IGNORED_KEYS.items()]
    out += ["", "xorl switches for features that do not exist here (false/0/null accepted, anything else is an",
            "error; a `distill` section is accepted only with `enable_distillation` false):", "",
            "| key | why |", "|---|---|"]
    out += [f"| `{k}` | {why} |" for k, why in UNSUPPORTED_SWITCHES.items()]
    out += ["", "xorl keys translated to fields here:", "", "| key | becomes |", "|---|---|"]
    out += [f"| `{k}` | {how} |" for k, (how, _) in RENAMED_KEYS.items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_config_reference(), end="")
