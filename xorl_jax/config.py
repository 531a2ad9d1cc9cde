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
        None, "Hugging Face checkpoint directory (safetensors + config.json), an Orbax directory from "
        "`xorl_jax.convert to-orbax`, or a training step directory (output_dir/checkpoints/N: its weights, "
        "a LoRA run's merged; fresh optimizer)")
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
    scan_layers: bool | str = _field(
        "auto", "true = apply the layers with one scan (compile time flat in depth); false = unroll them (no stacked "
        "copies of what remat keeps, longer compilation); auto = unrolled where that was measured faster (a remat "
        "policy that keeps outputs, on models whose layers are all alike) and its compiled step fits the device, "
        "else scanned; scanned on CPU (see train.remat_policy auto)")
    router_fp32: bool = _field(True, "compute router logits and softmax in float32")
    lm_head_fp32: bool = _field(True, "compute the output projection's logits and the loss in float32")
    train_router: bool = _field(False, "as xorl's: true = the expert outputs' gradient reaches the MoE router "
                                       "through the routing weights; false = the routing weights are detached "
                                       "before the experts, so the router learns only from the load-balancing "
                                       "loss (train.router_aux_loss_coef)")
    freeze_router: bool = _field(False, "as xorl's: MoE router weights get no update and no optimizer state "
                                        "(independent of train_router)")
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
    name: str | None = _field(None, "configuration (subset) of a HF dataset, as `datasets.load_dataset(path, name)` "
                                    "reads it (a hub id or a local dataset repository); also names the dataset in "
                                    "log lines")
    split: str = _field("train", "split to read from a HF dataset (on disk or on the hub)")
    revision: str | None = _field(None, "revision (branch, tag or commit) of a HF hub dataset")
    data_files: str | list[str] | None = _field(None, "file(s) or glob(s) inside path to read; null = all")
    max_seq_len: int | None = _field(None, "longest document in tokens; a longer one is dropped (as in xorl), "
                                           "truncated or split by data.long_sequence_policy; null = "
                                           "data.sample_packing_sequence_len")
    num_samples: int | None = _field(None, "documents of the `dummy` dataset (random tokens); null = 1024")
    weight: float | None = _field(None, "sampling weight when mixing datasets; null = proportional to size")
    chat_template: str | None = _field(None, "messages: the chat template, a .jinja file or one shipped with xorl_jax "
                                             "(chatml, qwen3, qwen3_5); null = the tokenizer's own (docs/DATA.md)")
    chat_template_kwargs: dict[str, Any] | None = _field(None, "messages: variables for the chat template, e.g. "
                                                               "{enable_thinking: false}")
    mask_history: bool = _field(False, "messages: train only the last assistant turn of each conversation (false: "
                                       "every assistant turn as the template renders it; docs/DATA.md)")


def _check_chat_options(ds: DatasetConfig, key: str):
    chat = [n for n in ("chat_template", "chat_template_kwargs", "mask_history") if getattr(ds, n)]
    _need(ds.type == "messages" or not chat, f"{key}.{chat[0] if chat else ''} applies to type: messages only "
                                             f"(this entry is type: {ds.type})")
    if not (ds.chat_template or ds.chat_template_kwargs):
        return
    import os

    from xorl_jax.data.chat import RESERVED_KWARGS, template_names  # no JAX here either

    if ds.chat_template:
        names = template_names()
        _need(ds.chat_template in names or os.path.isfile(os.path.expanduser(ds.chat_template)),
              f"{key}.chat_template={ds.chat_template!r} is neither a file nor a shipped template "
              f"({'|'.join(names)}); give a .jinja file")
    for name in ds.chat_template_kwargs or {}:
        _need(name not in RESERVED_KWARGS, f"{key}.chat_template_kwargs.{name} is set by the data pipeline; "
                                           f"remove it")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = _field(help="training datasets: list of {path, type, name, split, data_files, "
                                                "max_seq_len, weight, ...}", factory=list)
    eval_datasets: list[DatasetConfig] = _field(help="evaluation datasets, same shape as datasets", factory=list)
    select_columns: list[str] | None = _field(None, "columns to keep from tokenized rows; null = all needed ones")
    dataset_prepared_path: str | None = _field(None, "directory caching tokenized documents (one .npz per "
                                                     "distinct datasets + tokenizer + limits); null = no cache")
    sample_packing_method: str = _field("sequential", "sequential: documents in order; multipack: bin-packing "
                                                      "for fewer pad tokens", choices=("sequential", "multipack"))
    sample_packing_sequence_len: int = _field(32000, "tokens of documents packed into one row (xorl's default)")
    pad_to_multiple_of: int = _field(128, "packed rows are padded to a multiple of this, as in xorl: a row is "
                                          "sample_packing_sequence_len rounded up to it (the training sequence "
                                          "length)")
    long_sequence_policy: str = _field("drop", "a document longer than its max_seq_len: drop it (xorl's filter; "
                                               "the count is logged), keep its head (truncate) or cut it into "
                                               "pieces (split)", choices=("drop", "truncate", "split"))
    skip_bad_rows: bool = _field(False, "skip malformed rows with a warning instead of stopping")
    seed: int = _field(42, "seed of data shuffling")
    shuffle: bool = _field(True, "shuffle documents every epoch")
    dataloader_num_workers: int = _field(0, "> 0: a background thread packs batches ahead of the device step "
                                            "(0 = in the main thread between steps)")
    dataloader_prefetch_factor: int | None = _field(None, "batches prepared ahead = num_workers x this; null = 2")


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
                                                "group (a divisor of data_parallel_shard_size, times the Ulysses "
                                                "and/or ring sizes when larger, as in xorl); -1 or auto = the "
                                                "whole FSDP group")
    ulysses_parallel_size: int = _field(1, "context parallelism, Ulysses: ranks splitting each row's tokens, "
                                           "all-to-all to a head split around attention (heads must divide); "
                                           "on top of the data-parallel ranks, as in xorl")
    ringattn_parallel_size: int = _field(1, "context parallelism, ring attention: ranks splitting each row's "
                                            "tokens, keys and values passed around the ring (any head count); "
                                            "may be combined with Ulysses")
    pipeline_parallel_size: int = _field(1, "pipeline parallelism: only 1 is supported")
    # batch and length of the run
    micro_batch_size: int = _field(1, "packed rows per data-parallel rank per micro-batch")
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer update")
    num_train_epochs: float = _field(1.0, "epochs over data.datasets (used when max_steps is null)")
    max_steps: int | None = _field(None, "optimizer updates to run; null or -1 = from num_train_epochs")
    # optimizer and schedule
    optimizer: str = _field(
        "adamw", "optimizer: adamw; anyprecision_adamw (the same here: optimizer_dtype sets the moments' dtype); "
        "sgd; signsgd (sign of the gradient, decoupled weight decay); muon (Newton-Schulz orthogonalised momentum "
        "on the weight matrices, AdamW with lr for embeddings, lm_head, norms, routers, biases and vectors; "
        "docs/OPTIMIZERS.md)", choices=("adamw", "anyprecision_adamw", "sgd", "signsgd", "muon"))
    optimizer_dtype: str = _field("float32", "dtype of optimizer moments", choices=("float32", "bfloat16"))
    muon_lr: float = _field(0.02, "muon: peak learning rate of the weight matrices (the lr schedule's shape "
                                  "scaled to it; train.lr drives the AdamW part)")
    muon_momentum: float = _field(0.95, "muon: momentum of the weight matrices (0 = no momentum buffer)")
    muon_nesterov: bool = _field(True, "muon: Nesterov momentum")
    muon_ns_steps: int = _field(5, "muon: Newton-Schulz iterations")
    muon_adjust_lr_fn: str | None = _field(
        None, "muon: learning-rate scale of a matrix with fan-out A and fan-in B: original (or null) = "
        "sqrt(max(1, A/B)); match_rms_adamw = 0.2 * sqrt(max(A, B)) (muon then reuses AdamW's lr and weight decay)")
    lr: float = _field(5e-5, "peak learning rate (xorl's default)")
    lr_min: float = _field(1e-7, "learning rate at the end of decay (xorl's default)")
    lr_warmup_ratio: float = _field(0.0, "fraction of the steps spent in linear warmup from 0 to lr")
    lr_decay_style: str = _field("constant", "decay after warmup (xorl's default: constant)",
                                 choices=("constant", "linear", "cosine"))
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
        "auto", "what a layer keeps for the backward pass: full = nothing (recompute the layer), dots_saveable = "
        "matmul outputs, dots_attention_saveable = matmul (grouped expert GEMMs included), SwiGLU and "
        "fused-attention outputs, dots_with_no_batch_dims_saveable = weight matmul outputs, none = everything. "
        "dots_attention_saveable is the fastest (one H200: Qwen3 1.7B at 4 x 4096 tokens about 10% shorter steps "
        "than full for about 7 GiB more, and faster than none; the Qwen3-30B-A3B and Qwen3.5-35B-A3B shapes cut to "
        "4 layers 10% and 8% shorter). auto = the fastest that fits: dots_attention_saveable, else full, each "
        "compiled on the run's mesh (with model.scan_layers auto, dots_attention_saveable unrolled, scanned for the "
        "hybrid Qwen3.5, and full scanned) until one's peak in "
        "XLA's memory analysis fits the device's limit with 10% to spare; that compiled step trains, and a start-up "
        "line says what was picked, its planned GiB, the limit and the seconds spent. CPU reports no limit: full, "
        "nothing compiled to choose",
        choices=("auto", "full", "dots_saveable", "dots_attention_saveable", "dots_with_no_batch_dims_saveable",
                 "none"))
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
    save_hf_weights: bool = _field(True, "export Hugging Face safetensors to output_dir/global_step_N/hf_ckpt at "
                                         "the end of the run (a PEFT adapter with lora.save_lora_only): a drop-in "
                                         "replacement of model_path: trained tensors in the source's dtypes "
                                         "(model.dtype from scratch), untrained ones (vision tower, MTP) copied "
                                         "unchanged, LoRA merged; docs/CHECKPOINTS.md")
    load_checkpoint_path: str | None = _field("auto", "training checkpoint to resume from: auto = the newest "
                                                      "readable one in output_dir, if any (a rerun resumes); none = "
                                                      "start fresh (refused if output_dir holds checkpoints); or a "
                                                      "step / checkpoints directory (docs/CHECKPOINTS.md)")
    eval_steps: int = _field(0, "evaluate on data.eval_datasets every N updates; 0 = only at the end")
    log_steps: int = _field(1, "log metrics every N updates")
    sample_eval_prompts: int = _field(0, "after training, print greedy answers to the first N conversations of "
                                         "data.eval_datasets (messages type); 0 = off")
    use_tensorboard: bool = _field(True, "write TensorBoard event files to output_dir")
    use_wandb: bool = _field(False, "Weights & Biases logging is not available: true (xorl's default) logs a "
                                    "warning and the metrics go to TensorBoard")


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
    # keys of xorl's training server (SERVER_KEYS) from a flat config or a `server` section, kept for the server mode
    server: dict[str, Any] = field(default_factory=dict)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig}

# ------------------------------------------------------------------------------ xorl (PyTorch) compatibility
# A xorl YAML runs as it is and means what it means in xorl. XORL_KEYS lists every key of xorl's config schema
# (its local trainer's sections and its training server's flat keys); each one is a field here with the same meaning,
# or it is in exactly one of the tables below. docs/MIGRATING_FROM_XORL.md is generated from them
# (`python -m xorl_jax.config migrating`).
XORL_KEYS: dict[str, tuple[str, ...]] = {section: tuple(names.split()) for section, names in {
    "model": """
        config_path model_path tokenizer_path foundation encoders attn_implementation
        flash_attention_deterministic moe_implementation moe_routing_weights_before_down ep_dispatch
        train_router freeze_router record_routing_weights deepep_buffer_size_gb deepep_num_sms
        deepep_async_combine alltoall_combine_hidden_chunk_size basic_modules merge_qkv rmsnorm_mode
        qwen35_rmsnorm_family router_fp32 lm_head_fp32 activation_native rope_native rope_class_b
        attention_cast_bf16 sparse_mla_enabled sparse_mla_backend
        """,
    "data": """
        datasets test_datasets dataset_prepared_path shuffle_merged_datasets shuffle_before_merging_datasets
        push_dataset_to_hub hf_use_auth_token skip_prepare_dataset is_preprocess num_dataset_shards_to_save
        dataset_shard_num dataset_shard_idx val_set_size dataset_num_proc sample_packing_method
        sample_packing_group_size sample_packing_bin_size sample_packing_sequentially
        sample_packing_mp_start_method eval_sample_packing sample_packing_sequence_len select_columns
        dataloader_pin_memory dataloader_num_workers dataloader_prefetch_factor dataloader_drop_last
        pad_to_multiple_of fa_max_length_bucket
        """,
    "data.datasets[]": """
        path type name split revision trust_remote_code data_files ds_type shards shards_idx preprocess_shards
        max_seq_len num_samples activations_path
        """,
    "train": """
        output_dir lr lr_min lr_start weight_decay cautious_weight_decay no_decay_modules no_decay_params
        optimizer optimizer_dtype anyprecision_adamw_denominator_chunk_size
        anyprecision_adamw_reuse_grad_for_momentum anyprecision_adamw_state_cpu_offload muon_lr muon_momentum
        muon_nesterov muon_ns_steps muon_adjust_lr_fn muon_ns_algorithm muon_ns_use_quack_kernels
        muon_gram_ns_num_restarts muon_gram_ns_restart_iterations muon_grouped_gram_ns_fp32_byte_limit
        muon_fallback_optimizer muon_grad_dtype muon_update_dtype muon_force_momentum_path muon_distributed_mode
        max_grad_norm softmax_auxiliary_loss auxiliary_loss_multiplier moe_global_load_balancing ce_mode
        ce_num_chunks micro_batch_size gradient_accumulation_steps defer_grad_sync_in_accumulation
        num_train_epochs lr_warmup_ratio lr_decay_style lr_decay_ratio enable_mixed_precision fsdp_reduce_dtype
        skip_param_upcast fp8_cfg enable_fp8_training enable_qarl qarl_quant_cfg qarl_calib_data qarl_calib_size
        qarl_quant_sequence_length qarl_sync_format qarl_target_modules qarl_exclude_modules
        fp8_training_num_first_layers_bf16 fp8_training_num_last_layers_bf16 fp8_training_allow_blackwell
        fp8_training_blackwell_validation_artifact fp8_training_block_size fp8_training_backward
        fp8_training_smoothquant_alpha fp8_training_lm_head_smoothquant_alpha fp8_training_activation_amax_scale
        fp8_training_weight_amax_scale fp8_training_correction_mode fp8_training_module_overrides
        fp8_training_moe_grouped_backend fp8_training_target_modules fp8_training_exclude_modules
        fp8_training_allow_bf16_fallback enable_gradient_checkpointing enable_reentrant
        gradient_checkpointing_method moe_checkpoint_method enable_full_shard enable_forward_prefetch
        enable_backward_prefetch enable_activation_offload activation_gpu_limit
        activation_offload_prefetch_count init_device load_weights_mode enable_full_determinism
        high_precision_bf16 allow_cuda_launch_blocking prewarm_cuda_blas empty_cache_steps gc_steps
        data_parallel_mode data_parallel_replicate_size data_parallel_shard_size expert_parallel_size
        ep_intranode ep_outside ulysses_parallel_size tensor_parallel_size lm_head_tensor_parallel_size
        ringattn_parallel_size pipeline_parallel_size pipeline_parallel_schedule
        pipeline_parallel_virtual_stages pipeline_parallel_input_weight pipeline_parallel_output_weight
        pipeline_parallel_num_layers_in_first_stage pipeline_parallel_num_layers_in_last_stage
        pp_seq_len_bucket_size pp_variable_seq_lengths reshard_after_forward cp_fsdp_mode
        fsdp_sharded_lm_head_loss fsdp_sharded_lm_head_loss_num_chunks moe_grad_reduce_mode ckpt_manager
        save_async load_checkpoint_path load_optimizer save_steps save_epochs save_hf_weights seed
        enable_compile compile_dynamic_shapes log_format enable_step_phase_timing step_phase_timing_sync_cuda
        enable_per_component_timing enable_step_memory_profiling use_wandb wandb_project wandb_name wandb_tags
        repo_commit wandb_log_interval enable_profiling profile_start_step profile_end_step profile_trace_dir
        profile_record_shapes profile_profile_memory profile_with_stack profile_rank0_only max_steps
        adam_betas adam_eps glm52_fullparam_fp8_training glm52_fullparam_trainable_expert_layers
        glm52_fullparam_publish_dir
        """,
    "lora": """
        enable_lora lora_rank lora_alpha lora_b_init_std lora_b_init_seed lora_target_modules
        lora_target_manifest unfuse_for_lora save_lora_only enable_qlora block_fp8_qlora_training quant_format
        quant_group_size merge_lora_interval reset_optimizer_on_merge exclude_modules enable_aqn aqn_alpha
        moe_hybrid_shared_lora qlora_exclude_modules
        """,
    "distill": """
        enable_distillation teacher_model_path distillation_loss_type distillation_loss_weight
        stream_num_workers
        """,
    "server": """
        model_name r3_payload_transport r3_payload_dir r3_payload_keep r3_payload_namespace_prefix storage_limit
        idle_session_timeout log_level enable_self_test skip_initial_checkpoint log_gradient_norms
        log_router_stats worker_bind_host worker_bind_port engine_connect_host worker_bind_address
        worker_connection_timeout worker_max_retries enable_packing sample_packing_strategy
        sample_packing_on_oversized max_lora_rank adapter_gradient_ownership_bucket_bytes lora_export_format
        adapter_state_load_mode sync_inference_method receiver_kv_cache_dtype
        """,
}.items()}
# Keys that only xorl's flat server format has; the section here they belong to is given by XORL_KEYS.
SERVER_FORMAT_ONLY = frozenset({"train.adam_betas", "train.adam_eps", "train.glm52_fullparam_fp8_training",
                                "train.glm52_fullparam_trainable_expert_layers", "train.glm52_fullparam_publish_dir",
                                "lora.qlora_exclude_modules"})

_ATTN = "auto (cuDNN attention on NVIDIA GPUs, XLA elsewhere)"
# Values of fields here that name xorl's PyTorch machinery: key -> {xorl value: (value here, why)}; one info line each.
XORL_VALUES: dict[str, dict[str, tuple[str, str]]] = {
    "model.attn_implementation": {
        v: ("auto", f"a PyTorch attention kernel; {_ATTN}")
        for v in ("flash_attention_2", "flash_attention_3", "flash_attention_4", "sdpa", "native", "eager",
                  "flex_attention")},
    "model.moe_implementation": {"quack": ("triton", "Quack (CuTe-DSL) grouped GEMMs; the Triton grouped GEMM "
                                                     "here")},
    "model.ep_dispatch": {"deepep": ("alltoall", "DeepEP is PyTorch-only; XLA all-to-all exchanges the tokens")},
    "train.ckpt_manager": {v: ("orbax", "PyTorch's checkpoint format; Orbax holds the same training state")
                           for v in ("dcp", "torch")},
    "train.data_parallel_mode": {"fsdp": ("fsdp2", "sharded parameters, gradients and optimizer state")},
    "train.optimizer_dtype": {"fp32": ("float32", "xorl's spelling"),
                              "bf16": ("bfloat16", "xorl's spelling")},  # and see _xorl_train_defaults
}

# Values with no counterpart here: rejected with what to use instead.
PYTORCH_VALUES: dict[str, dict[str, str]] = {
    "train.optimizer": {"distsignsgd": "a PyTorch FSDP hook that signs gradients before their reduction; use "
                                       "signsgd (sign of the reduced gradient)"},
}

# xorl keys whose null means "xorl's default": null is dropped and the default here (the same meaning) applies.
NULL_IS_DEFAULT = frozenset({"model.attn_implementation", "model.moe_implementation", "model.router_fp32",
                             "model.lm_head_fp32", "lora.lora_target_modules", "data.datasets[].split",
                             "data.datasets[].type", "train.gradient_checkpointing_method",
                             "train.moe_checkpoint_method"})

_DEEPEP = "DeepEP is PyTorch-only (ep_dispatch deepep runs as alltoall)"
_PP = "pipeline parallelism is not available (train.pipeline_parallel_size must be 1)"
_FP8 = "FP8 training is not available (train.enable_fp8_training)"
_QARL = "QARL is not available (train.enable_qarl)"
_QLORA = "QLoRA is not available (lora.enable_qlora)"
_DISTILL = "distillation is not available (distill.enable_distillation)"
_PARITY = "a kernel or rounding choice of xorl for bitwise parity with SGLang; the math is the same"
_PROFILE = "xorl's step profiler settings; the trainer here does not profile (benchmarks/bench_train.py does)"
_WANDB = "Weights & Biases is not available; metrics go to TensorBoard and the log"
_TIMING = "xorl's per-phase step timers; benchmarks/bench_train.py times steps here"
# xorl keys that change nothing here whatever their value (PyTorch kernels, memory and runtime knobs, features of
# xorl's that are switched off): accepted, and one info line names those a config sets.
NO_EFFECT_KEYS: dict[str, str] = {
    "model.flash_attention_deterministic": "a FlashAttention flag; train.enable_full_determinism asks XLA for "
                                           "deterministic GPU ops",
    "model.moe_routing_weights_before_down": "where xorl's Triton experts round the routing weights to bf16",
    "model.record_routing_weights": "PyTorch's recompute replay cache; XLA's rematerialisation recomputes the "
                                    "routing exactly",
    "model.deepep_buffer_size_gb": _DEEPEP,
    "model.deepep_num_sms": _DEEPEP,
    "model.deepep_async_combine": _DEEPEP,
    "model.alltoall_combine_hidden_chunk_size": "memory chunking of xorl's expert combine; XLA plans the exchange",
    "model.basic_modules": "FSDP wrapping units; sharding here follows the logical-axis rules (parallel/rules.py)",
    "model.merge_qkv": "q, k and v (and gate, up) stay separate parameters here, as in the HF checkpoint",
    "model.rmsnorm_mode": _PARITY,
    "model.qwen35_rmsnorm_family": _PARITY,
    "model.activation_native": _PARITY,
    "model.rope_native": _PARITY,
    "model.rope_class_b": _PARITY,
    "model.attention_cast_bf16": _PARITY,
    "model.sparse_mla_enabled": "GLM-5 only",
    "model.sparse_mla_backend": "GLM-5 only",
    "data.shuffle_before_merging_datasets": "the documents of all datasets are shuffled together every epoch "
                                            "(data.shuffle)",
    "data.hf_use_auth_token": "the datasets library reads the Hugging Face token from the environment",
    "data.skip_prepare_dataset": "documents are tokenized when training starts, cached with dataset_prepared_path",
    "data.is_preprocess": "there is no separate preprocessing command; data.dataset_prepared_path caches documents",
    "data.num_dataset_shards_to_save": "the document cache is one file per dataset set",
    "data.dataset_num_proc": "tokenization runs in the training process (batched)",
    "data.sample_packing_group_size": "multipack packs the documents of a whole epoch at once",
    "data.sample_packing_bin_size": "a packed row holds as many documents as fit",
    "data.sample_packing_sequentially": "data.sample_packing_method picks the packing",
    "data.sample_packing_mp_start_method": "packing runs in the training process",
    "data.eval_sample_packing": "eval documents are always packed like the training ones",
    "data.dataloader_pin_memory": "JAX copies host batches to the devices itself",
    "data.fa_max_length_bucket": "a torch.compile recompilation guard; row shapes here are fixed",
    "data.datasets[].ds_type": "the file format comes from the file names (.jsonl, .json, .parquet) or a saved "
                               "HF dataset",
    "data.datasets[].preprocess_shards": "memory chunking of xorl's preprocessing",
    "train.no_decay_modules": "xorl's trainer does not pass it to its optimizer either (weight decay applies to "
                              "every parameter there); here norms, biases and vectors never decay",
    "train.no_decay_params": "xorl's trainer does not pass it to its optimizer either (weight decay applies to "
                             "every parameter there); here norms, biases and vectors never decay",
    "train.anyprecision_adamw_denominator_chunk_size": "a memory option of xorl's AnyPrecisionAdamW",
    "train.anyprecision_adamw_reuse_grad_for_momentum": "a memory option of xorl's AnyPrecisionAdamW",
    "train.anyprecision_adamw_state_cpu_offload": "a memory option of xorl's AnyPrecisionAdamW",
    "train.muon_ns_algorithm": "Newton-Schulz runs as the standard iteration (Gram Newton-Schulz computes the same "
                               "polynomial with other rounding)",
    "train.muon_ns_use_quack_kernels": "Quack is a PyTorch kernel library; XLA compiles the iteration",
    "train.muon_gram_ns_num_restarts": "Gram Newton-Schulz is not used",
    "train.muon_gram_ns_restart_iterations": "Gram Newton-Schulz is not used",
    "train.muon_grouped_gram_ns_fp32_byte_limit": "XLA plans the iteration's memory",
    "train.muon_distributed_mode": "Newton-Schulz always sees the whole matrix of a sharded parameter (what xorl "
                                   "calls full_gradient; its default shard_local orthogonalises each rank's shard)",
    "train.muon_force_momentum_path": "a debugging switch of xorl's Muon (the same update either way)",
    "train.auxiliary_loss_multiplier": "the z-loss (train.softmax_auxiliary_loss) is not available",
    "train.ce_mode": "the loss is always a chunked float32 cross-entropy (train.ce_chunk_size)",
    "train.ce_num_chunks": "the loss is chunked by train.ce_chunk_size tokens",
    "train.defer_grad_sync_in_accumulation": "XLA schedules the gradient reduction of the accumulated step",
    "train.qarl_quant_cfg": _QARL,
    "train.qarl_calib_data": _QARL,
    "train.qarl_calib_size": _QARL,
    "train.qarl_quant_sequence_length": _QARL,
    "train.qarl_sync_format": _QARL,
    "train.qarl_target_modules": _QARL,
    "train.qarl_exclude_modules": _QARL,
    **{f"train.fp8_training_{n}": _FP8 for n in (
        "num_first_layers_bf16", "num_last_layers_bf16", "allow_blackwell", "blackwell_validation_artifact",
        "block_size", "backward", "smoothquant_alpha", "lm_head_smoothquant_alpha", "activation_amax_scale",
        "weight_amax_scale", "correction_mode", "module_overrides", "moe_grouped_backend", "target_modules",
        "exclude_modules", "allow_bf16_fallback")},
    "train.glm52_fullparam_trainable_expert_layers": "GLM-5.2 only",
    "train.glm52_fullparam_publish_dir": "GLM-5.2 only",
    "train.enable_reentrant": "a PyTorch checkpointing variant; train.remat_policy decides what is recomputed",
    "train.enable_forward_prefetch": "XLA schedules the parameter gathers",
    "train.enable_backward_prefetch": "XLA schedules the parameter gathers",
    "train.activation_gpu_limit": "activation offload is not available (train.enable_activation_offload)",
    "train.activation_offload_prefetch_count": "activation offload is not available (train.enable_activation_offload)",
    "train.init_device": "the model is always built abstractly and each device materialises only its shard "
                         "(what meta-device init achieves in PyTorch)",
    "train.load_weights_mode": "the checkpoint reader decides how to read shards",
    "train.high_precision_bf16": "a PyTorch matmul-precision switch for parity with xorl's server",
    "train.allow_cuda_launch_blocking": "a PyTorch CUDA runtime guard",
    "train.prewarm_cuda_blas": "a PyTorch CUDA runtime warm-up",
    "train.empty_cache_steps": "XLA manages device memory; there is no cache to empty",
    "train.gc_steps": "Python garbage collection is left to Python",
    "train.ep_intranode": "expert ranks are placed by the mesh (parallel/mesh.py)",
    "train.ep_outside": "expert ranks are placed by the mesh (parallel/mesh.py)",
    "train.lm_head_tensor_parallel_size": "the output head is sharded with the model and the loss is chunked",
    "train.pipeline_parallel_schedule": _PP,
    "train.pipeline_parallel_virtual_stages": _PP,
    "train.pipeline_parallel_input_weight": _PP,
    "train.pipeline_parallel_output_weight": _PP,
    "train.pipeline_parallel_num_layers_in_first_stage": _PP,
    "train.pipeline_parallel_num_layers_in_last_stage": _PP,
    "train.pp_seq_len_bucket_size": _PP,
    "train.pp_variable_seq_lengths": _PP,
    "train.reshard_after_forward": "XLA gathers each layer's parameters where it uses them",
    "train.cp_fsdp_mode": "parameters always shard over the context-parallel ranks too (xorl's default `all`)",
    "train.fsdp_sharded_lm_head_loss": "the output head is sharded and the loss chunked (train.ce_chunk_size)",
    "train.fsdp_sharded_lm_head_loss_num_chunks": "the output head is sharded and the loss chunked "
                                                  "(train.ce_chunk_size)",
    "train.enable_compile": "not needed: XLA compiles every step",
    "train.compile_dynamic_shapes": "not needed: XLA compiles every step",
    "train.log_format": "metrics are logged as key=value lines and to TensorBoard",
    "train.enable_step_phase_timing": _TIMING,
    "train.step_phase_timing_sync_cuda": _TIMING,
    "train.enable_per_component_timing": _TIMING,
    "train.enable_step_memory_profiling": _TIMING,
    "train.wandb_project": _WANDB,
    "train.wandb_name": _WANDB,
    "train.wandb_tags": _WANDB,
    "train.wandb_log_interval": _WANDB,
    "train.repo_commit": "experiment metadata for Weights & Biases",
    **{f"train.profile_{n}": _PROFILE for n in ("start_step", "end_step", "trace_dir", "record_shapes",
                                                "profile_memory", "with_stack", "rank0_only")},
    "lora.lora_b_init_seed": "LoRA B starts at zero (lora.lora_b_init_std 0)",
    "lora.unfuse_for_lora": "q/k/v and gate/up are separate projections here; adapters attach to each",
    "lora.quant_format": _QLORA,
    "lora.quant_group_size": _QLORA,
    "lora.exclude_modules": _QLORA,
    "lora.qlora_exclude_modules": _QLORA,
    "lora.reset_optimizer_on_merge": "LoRA merging is not available (lora.merge_lora_interval)",
    "lora.aqn_alpha": "adaptive quantization noise is not available (lora.enable_aqn)",
    "distill.teacher_model_path": _DISTILL,
    "distill.distillation_loss_type": _DISTILL,
    "distill.distillation_loss_weight": _DISTILL,
    "distill.stream_num_workers": _DISTILL,
}

# xorl features that are not available here and whose absence changes memory, speed or bookkeeping, not what is
# trained: key -> (accepted values, why). Another value gives one warning and the run goes on without the feature.
NOT_AVAILABLE: dict[str, tuple[tuple, str]] = {
    "data.push_dataset_to_hub": ((None, ""), "prepared data is never uploaded"),
    "data.dataloader_drop_last": ((False, None), "the last incomplete batch of an epoch is completed with padding "
                                                 "rows here, so every document is trained on"),
    "train.fsdp_reduce_dtype": (("fp32", None), "gradients are reduced in float32 here"),
    "train.moe_grad_reduce_mode": (("reduce_scatter", None), "expert gradients are reduced in float32 here"),
    "train.enable_activation_offload": ((False, None), "activations stay on the devices; train.remat_policy trades "
                                                       "memory for recomputation"),
    "train.save_epochs": ((0, None), "checkpoints are saved every train.save_steps updates and at the end"),
    "train.enable_profiling": ((False, None), _PROFILE),
    "train.muon_grad_dtype": ((None, "fp32"), "Muon reads the gradient in float32 here"),
    "train.muon_update_dtype": ((None, "fp32"), "Newton-Schulz runs in float32 here"),
}

# xorl features whose absence would change what is trained: key -> (accepted values, why); another value is an error.
UNSUPPORTED_SWITCHES: dict[str, tuple[tuple, str]] = {
    "model.foundation": ((None, {}), "extra model config is not supported; edit the checkpoint's config.json"),
    "model.encoders": ((None, {}), "multimodal encoders are not supported (text models only)"),
    "data.dataset_shard_num": ((None,), "training on a shard of the data is not supported; select files with "
                                        "data.datasets[].data_files"),
    "data.dataset_shard_idx": ((None,), "training on a shard of the data is not supported; select files with "
                                        "data.datasets[].data_files"),
    "data.val_set_size": ((None, 0), "a validation split carved out of the training data is not supported; give "
                                     "data.eval_datasets"),
    "data.datasets[].trust_remote_code": ((None, False), "remote dataset code is never run"),
    "data.datasets[].shards": ((None,), "training on a shard of a dataset is not supported; select files with "
                                        "data_files"),
    "data.datasets[].shards_idx": ((None,), "training on a shard of a dataset is not supported; select files with "
                                            "data_files"),
    "data.datasets[].activations_path": ((None,), "distillation is not supported"),
    "train.lr_start": ((0, None), "warmup starts from a learning rate of 0 here"),
    "train.muon_fallback_optimizer": (("adamw", None), "the parameters Muon leaves out are trained with AdamW here"),
    "train.cautious_weight_decay": ((False, None), "cautious weight decay is not supported"),
    "train.softmax_auxiliary_loss": ((False, None), "the z-loss is not supported"),
    "train.moe_global_load_balancing": ((False, None), "the load-balancing loss is computed per micro-batch (HF's "
                                                       "load_balancing_loss_func)"),
    "train.fp8_cfg": ((None, {}), "FP8 training is not supported"),
    "train.enable_fp8_training": ((False, None), "FP8 training is not supported"),
    "train.enable_qarl": ((False, None), "QARL is not supported"),
    "train.glm52_fullparam_fp8_training": ((False, None), "GLM-5.2 FP8 training is not supported"),
    "train.load_optimizer": ((True, None), "a resume always restores the optimizer state here"),
    "lora.lora_b_init_std": ((0, None), "LoRA B starts at zero here"),
    "lora.lora_target_manifest": ((None,), "give lora.lora_target_modules"),
    "lora.block_fp8_qlora_training": ((False, None), "QLoRA is not supported"),
    "lora.merge_lora_interval": ((0, None), "ReLoRA-style merging is not supported"),
    "lora.enable_aqn": ((False, None), "adaptive quantization noise is not supported"),
    "lora.moe_hybrid_shared_lora": ((False, None), "hybrid shared LoRA is not supported"),
    "distill.enable_distillation": ((False, None), "distillation is not supported; remove the distill section"),
}

# Recompute strategies of xorl (and the legacy alias moe_act) as the remat policies here: remat decides what is
# recomputed in the backward pass, never the result.
_XORL_REMAT = {"recompute_full_layer": "full", "recompute_before_dispatch": "dots_attention_saveable",
               "moe_act": "dots_attention_saveable", "no_recompute": "none"}


def _rename_remat(key):
    def rename(value):
        if value not in _XORL_REMAT:
            raise ConfigError(f"{key} {value!r} is not one of xorl's ({'|'.join(_XORL_REMAT)}); or set "
                              f"train.remat_policy")
        return [("train.remat_policy", _XORL_REMAT[value])]
    return rename


def _rename_adam_betas(value):
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ConfigError(f"train.adam_betas must be a list of two numbers [beta1, beta2], got {value!r}")
    return [("train.adam_beta1", value[0]), ("train.adam_beta2", value[1])]


# xorl keys of fields that exist here under another name or section: key -> (what it becomes, value -> [(key here,
# value)]).
RENAMED_KEYS: dict[str, tuple[str, Callable[[Any], list[tuple[str, Any]]]]] = {
    "data.test_datasets": ("data.eval_datasets", lambda v: [("data.eval_datasets", v)]),
    "data.shuffle_merged_datasets": ("data.shuffle", lambda v: [("data.shuffle", v)]),
    "train.gradient_checkpointing_method": (
        "train.remat_policy: " + ", ".join(f"{k} -> {v}" for k, v in _XORL_REMAT.items() if k != "moe_act"),
        _rename_remat("train.gradient_checkpointing_method")),
    "train.moe_checkpoint_method": ("train.remat_policy: moe_act -> dots_attention_saveable",
                                    _rename_remat("train.moe_checkpoint_method")),
    "train.skip_param_upcast": ("true: model.param_dtype bfloat16 (bf16 weights, updated with stochastic rounding)",
                                lambda v: [("model.param_dtype", "bfloat16")] if v else []),
    "train.adam_betas": ("train.adam_beta1, train.adam_beta2 (server format)", _rename_adam_betas),
    "train.adam_eps": ("train.adam_epsilon (server format)",
                       lambda v: [] if v is None else [("train.adam_epsilon", v)]),
}

# What the keys only xorl's training server reads are for. A flat (server format) config, or a `server` section,
# keeps them in Config.server for the server mode; `python -m xorl_jax.train` names them once and ignores them.
SERVER_KEYS: dict[str, str] = {
    "model_name": "model identifier the server reports and checks",
    "r3_payload_transport": "how routing-replay payloads reach the trainer",
    "r3_payload_dir": "routing-replay payload directory",
    "r3_payload_keep": "keep routing-replay payloads",
    "r3_payload_namespace_prefix": "routing-replay payload namespace",
    "storage_limit": "disk budget of saved sessions",
    "idle_session_timeout": "seconds before an idle session is unloaded",
    "log_level": "server log level",
    "enable_self_test": "run a self-test after loading the model",
    "skip_initial_checkpoint": "do not save a checkpoint at start-up",
    "log_gradient_norms": "log per-layer-type gradient norms",
    "log_router_stats": "log MoE router statistics",
    "worker_bind_host": "worker socket host",
    "worker_bind_port": "worker socket port",
    "engine_connect_host": "host the API server connects to",
    "worker_bind_address": "worker socket address",
    "worker_connection_timeout": "seconds to wait for workers",
    "worker_max_retries": "retries of failed worker operations",
    "enable_packing": "pack request datums into rows",
    "sample_packing_strategy": "how request datums are packed",
    "sample_packing_on_oversized": "what to do with a datum longer than a row",
    "max_lora_rank": "largest adapter rank a session may create",
    "adapter_gradient_ownership_bucket_bytes": "adapter gradient bucket size",
    "lora_export_format": "adapter export layout",
    "adapter_state_load_mode": "how adapter state is loaded",
    "sync_inference_method": "how weights reach the inference engine",
    "receiver_kv_cache_dtype": "KV-cache dtype expected of the inference engine",
}

# The server keys `python -m xorl_jax.server` reads (xorl_jax.server.settings); the others have no effect there
# (xorl's worker processes, packing, routing replay and inference weight sync have no counterpart here).
SERVER_KEYS_USED = frozenset({"model_name", "max_lora_rank", "log_level"})

# Defaults of xorl's training server that differ from its local trainer's; a flat config that omits the key gets
# the server's (as xorl's server would). data_parallel_shard_size and _replicate_size both 1 (the server's
# defaults) mean all devices there.
SERVER_DEFAULTS: dict[str, Any] = {"model.freeze_router": True, "lora.lora_rank": 32, "train.lr": 1e-5,
                                   "train.weight_decay": 0.01}


# Fields here with a note for xorl users (a default that is not xorl's, or more than xorl offers): key -> note.
XORL_FIELD_NOTES: dict[str, str] = {
    "model.train_router": "false (xorl's default) detaches the routing weights before the experts: the router "
                          "learns from the load-balancing loss only",
    "data.sample_packing_sequence_len": "documents are packed into this many tokens; the row is padded to a "
                                        "multiple of pad_to_multiple_of, as in xorl",
    "data.datasets[].type": "xorl reads `tokenized` rows only; `messages` and `text` are offered here too",
    "data.datasets[].name": "the HF dataset configuration, as xorl passes it to `datasets.load_dataset`",
    "data.datasets[].max_seq_len": "longer documents are dropped, as in xorl (data.long_sequence_policy `drop`, "
                                   "the default; `truncate` and `split` are offered here too)",
    "data.datasets[].num_samples": "the number of `dummy` documents (xorl: 4096 identical documents of max_seq_len "
                                   "tokens; here random ones, 1024 by default)",
    "model.attn_implementation": "xorl's null (FlashAttention 3, or 4 on its server) is `auto` here",
    "model.moe_implementation": "xorl's null is `auto` here",
    "model.router_fp32": "xorl's null means true, the default here",
    "model.lm_head_fp32": "xorl's null means true, the default here",
    "model.freeze_router": "the server format's default is true (applied to flat configs that omit it)",
    "data.dataset_prepared_path": "xorl: `last_prepared_dataset`; here null: documents are cached only where you say",
    "data.dataloader_num_workers": "xorl: 8 worker processes; here 0: batches are packed in the main thread between "
                                   "steps (> 0: one background thread packs ahead)",
    "data.dataloader_prefetch_factor": "xorl: 2; here null, which means 2",
    "data.datasets[].split": "xorl: null (the split named like the run's, train); here `train`",
    "train.output_dir": "xorl requires it; here `outputs`",
    "train.optimizer_dtype": "xorl: `bf16`, which its adamw ignores (torch's AdamW keeps float32 moments) and its "
                             "muon and anyprecision_adamw use; read the same way here: float32 for adamw and sgd, "
                             "bfloat16 for muon and anyprecision_adamw unless the config sets it",
    "train.data_parallel_replicate_size": "xorl: -1, which with data_parallel_shard_size -1 means one replica; here 1",
    "train.data_parallel_shard_size": "the server format's 1 together with data_parallel_replicate_size 1 means all "
                                      "devices (read as -1 in flat configs)",
    "train.lr": "the server format's default is 1e-5 (applied to flat configs that omit it)",
    "train.weight_decay": "the server format's default is 0.01 (applied to flat configs that omit it); here norms, "
                          "biases and vectors never decay, in xorl every parameter does",
    "train.ckpt_manager": "xorl: `dcp`; here `orbax` (xorl's `dcp` and `torch` are read as orbax)",
    "train.save_async": "xorl: false; here true (the same checkpoint, written in the background)",
    "train.use_wandb": "xorl: true; Weights & Biases is not available here (true: one warning; metrics go to "
                       "TensorBoard)",
    "lora.lora_rank": "the server format's default is 32 (applied to flat configs that omit it)",
    "lora.lora_target_modules": "xorl's null is the architecture's list (Qwen3.5 adds its `g_proj`); here the list "
                                "in docs/CONFIG.md",
    "lora.save_lora_only": "xorl: false, but its trainer does not read it: a LoRA run always exports a PEFT adapter "
                           "there; true here does the same (false exports merged full weights)",
    "lora.enable_qlora": "must stay false: QLoRA is not supported yet",
    "data.datasets[].path": "a local file or directory, a HF dataset saved to disk, a HF hub id or `dummy`; remote "
                            "filesystems (s3://, gs://, https://) are not read here",
    "train.max_grad_norm": "a value <= 0 means no clipping, as in xorl",
    "train.ulysses_parallel_size": "same meaning: context-parallel ranks on top of data_parallel_shard_size "
                                   "(world = replicate x shard x ring x ulysses x tensor); attention and Gated "
                                   "DeltaNet heads must divide it (KV heads are repeated when fewer)",
    "train.ringattn_parallel_size": "same meaning, zigzag load balancing as in xorl; also for Gated DeltaNet "
                                    "layers, which xorl refuses under ring",
    "train.pipeline_parallel_size": "must be 1 for now (pipeline parallelism is not supported yet)",
    "train.load_checkpoint_path": "xorl: null, a fresh start unless a path (or `auto`) is given; here "
                                  f"`{TrainConfig.load_checkpoint_path}`"
                                  + (": a run resumes from the newest checkpoint in output_dir, if any; null, "
                                     "`''` (xorl's server configs) or `none` start fresh"
                                     if TrainConfig.load_checkpoint_path == "auto" else ""),
}


def _xorl_section_of(name: str) -> str | None:
    for section, names in XORL_KEYS.items():
        if name in names and section != "data.datasets[]":
            return section
    return None


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
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
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
    elif typing.get_origin(tp) is dict:  # free-form mappings (template variables): string keys, YAML values
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
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


def _xorl_key(key: str, shown: str, value, no_effect: list[str]) -> list[tuple[str, Any]] | None:
    """How one xorl key arrives here: [(key here, value), ...] to set ([] = dropped), or None = keep it as it is.
    `key` is the table key (data.datasets[].x for dataset entries), `shown` the key as the config spells it."""
    if value is None and key in NULL_IS_DEFAULT:
        return []
    if key in NO_EFFECT_KEYS:
        no_effect.append(shown)
        return []
    if key in NOT_AVAILABLE:
        accepted, why = NOT_AVAILABLE[key]
        if value not in accepted:
            log.warning("config: %s: %r is not available here: %s", shown, value, why)
        return []
    if key in UNSUPPORTED_SWITCHES:
        accepted, why = UNSUPPORTED_SWITCHES[key]
        if value not in accepted:
            raise ConfigError(f"{shown}: {value!r}: {why}")
        return []
    if key in RENAMED_KEYS:
        moved = RENAMED_KEYS[key][1](value)
        log.info("config: %s %r -> %s", shown, value, ", ".join(f"{k} {v!r}" for k, v in moved) or "nothing")
        return moved
    mapped = XORL_VALUES.get(key, {})
    if isinstance(value, str) and value in mapped and key != "train.optimizer_dtype":
        new, why = mapped[value]
        log.info("config: %s %r -> %s (%s)", shown, value, new, why)
        return [(key, new)]
    return None


def _translate_dataset(entry, prefix: str, no_effect: list[str]):
    if not isinstance(entry, dict):
        return entry  # _build says what is wrong
    out = {}
    for name, value in entry.items():
        done = _xorl_key(f"data.datasets[].{name}", f"{prefix}.{name}", value, no_effect)
        if done is None:
            out[name] = value
    return out


def _xorl_train_values(train: dict):
    """optimizer_dtype as xorl reads it (its bf16 default and spelling only concern muon and anyprecision_adamw;
    torch's AdamW keeps float32 moments) and max_grad_norm <= 0 (no clipping)."""
    optimizer = train.get("optimizer", "adamw")
    low_precision_state = optimizer in ("muon", "anyprecision_adamw")
    value = train.get("optimizer_dtype")
    if value == "fp32":
        train["optimizer_dtype"] = "float32"
        log.info("config: train.optimizer_dtype 'fp32' -> float32 (xorl's spelling)")
    elif value == "bf16":
        train["optimizer_dtype"] = "bfloat16" if low_precision_state else "float32"
        if not low_precision_state:
            log.info("config: train.optimizer_dtype 'bf16' -> float32 (in xorl it sets the state of muon and "
                     "anyprecision_adamw; %s keeps float32 moments there)", optimizer)
    elif "optimizer_dtype" not in train and low_precision_state:
        train["optimizer_dtype"] = "bfloat16"
        log.info("config: train.optimizer_dtype -> bfloat16 (xorl's default for %s's state)", optimizer)
    norm = train.get("max_grad_norm")
    if isinstance(norm, (int, float)) and not isinstance(norm, bool) and norm < 0:
        log.info("config: train.max_grad_norm %s -> 0 (no clipping, as xorl reads a value <= 0)", norm)
        train["max_grad_norm"] = 0.0


def _check_section(section, value):
    if section not in SECTIONS and section not in ("distill", "server"):
        close = difflib.get_close_matches(str(section), [*SECTIONS, "server"], n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the sections are {', '.join(SECTIONS)}"
        raise ConfigError(f"unknown section '{section}'{hint}")
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {value!r}")
    return value or {}


def _server_section(values: dict) -> dict:
    for name in values:
        if name not in SERVER_KEYS:
            close = difflib.get_close_matches(str(name), list(SERVER_KEYS), n=1, cutoff=0.6)
            hint = f"; did you mean 'server.{close[0]}'?" if close else "; see docs/MIGRATING_FROM_XORL.md"
            raise ConfigError(f"unknown key 'server.{name}'{hint}")
    return dict(values)


def _translate_xorl(raw: dict) -> dict:
    """Sections of a config (xorl's keys or ours) as the dataclasses here read them: xorl's PyTorch values mapped
    (an info line each), keys with no effect dropped (one info line), features that are not available warned about
    or refused, renamed keys moved. Our own keys pass through unchanged."""
    out: dict[str, dict] = {}
    moved: list[tuple[str, Any, str, Any]] = []  # (xorl key, its value, key here, value)
    no_effect: list[str] = []
    for section, values in raw.items():
        values = _check_section(section, values)
        if section == "server":
            out["server"] = _server_section(values)
            continue
        kept = out.setdefault(section, {}) if section != "distill" else {}
        for name, value in values.items():
            key = f"{section}.{name}"
            if section == "distill" and name not in XORL_KEYS["distill"]:
                raise ConfigError(f"unknown key '{key}'; the distill section takes xorl's keys "
                                  f"({', '.join(XORL_KEYS['distill'])})")
            if section == "data" and name in ("datasets", "eval_datasets", "test_datasets") \
                    and isinstance(value, list):
                value = [_translate_dataset(entry, f"data.{name}[{i}]", no_effect) for i, entry in enumerate(value)]
            done = _xorl_key(key, key, value, no_effect)
            if done is None:
                kept[name] = value
            else:
                moved += [(key, value, new_key, new_value) for new_key, new_value in done]
    for source, source_value, target, value in moved:
        section, name = target.split(".", 1)
        target_values = out.setdefault(section, {})
        if name in target_values and target_values[name] != value:
            raise ConfigError(f"{source} ({source_value!r}) and {target} ({target_values[name]!r}) disagree; keep "
                              f"only {target}")
        target_values[name] = value
    _xorl_train_values(out.setdefault("train", {}))
    if no_effect:
        log.info("config: no effect here (xorl's PyTorch, runtime and switched-off options; "
                 "docs/MIGRATING_FROM_XORL.md says why): %s", ", ".join(no_effect))
    return out


def _flat_section(name: str) -> str | None:
    """The section of a key of a flat (xorl server format) config: xorl's, else the one field here of that name."""
    section = _xorl_section_of(name)
    if section is not None:
        return section
    owners = [s for s, cls in SECTIONS.items() if name in _hints(cls)]
    return owners[0] if len(owners) == 1 else None


def _sectioned(raw: dict) -> dict:
    """A flat (xorl server format: the same keys, no sections) config as sections, with the server's defaults where
    it omits them; a sectioned config as it is."""
    named = set(SECTIONS) | {"distill", "server"}
    outside = [k for k in raw if k not in named]
    if not outside:
        return raw
    for k in outside:
        if isinstance(raw[k], dict) and _flat_section(str(k)) is None:
            _check_section(k, raw[k])  # a misspelt section: says so, with the nearest
    if len(outside) < len(raw):
        k = outside[0]
        where = f"in section '{_flat_section(str(k))}'" if _flat_section(str(k)) else "in its section"
        raise ConfigError(f"'{k}' is a top-level key in a config with sections; put it {where} (or write every key "
                          f"flat, as xorl's server format does)")
    out: dict[str, dict] = {}
    for name, value in raw.items():
        section = _flat_section(str(name))
        if section is None:
            names = [n for s, ns in XORL_KEYS.items() if s != "data.datasets[]" for n in ns]
            names += [n for cls in SECTIONS.values() for n in _hints(cls)]
            close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else "; see docs/MIGRATING_FROM_XORL.md"
            raise ConfigError(f"unknown key '{name}' in a flat (xorl server format) config{hint}")
        out.setdefault(section, {})[name] = value
    for key, value in SERVER_DEFAULTS.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {}).setdefault(name, value)
    train = out.setdefault("train", {})
    if train.get("data_parallel_shard_size", 1) == 1 and train.get("data_parallel_replicate_size", 1) == 1:
        train["data_parallel_shard_size"], train["data_parallel_replicate_size"] = -1, 1
    log.info("config: a flat config (xorl's server format) read into sections; where it omits them, the server's "
             "defaults apply: %s, and data-parallel sizes 1 x 1 mean all devices",
             ", ".join(f"{k} {v}" for k, v in SERVER_DEFAULTS.items()))
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
    """The mesh sizes as the mesh builder reads them, after data_parallel_mode is applied."""
    shard, replicate = t.data_parallel_shard_size, t.data_parallel_replicate_size
    if t.data_parallel_mode == "ddp" and shard == -1:
        shard, replicate = 1, (-1 if replicate == 1 else replicate)
    elif t.data_parallel_mode == "none":
        shard, replicate = 1, 1
    return {"data_parallel_replicate_size": replicate, "data_parallel_shard_size": shard,
            "expert_parallel_size": t.expert_parallel_size, "tensor_parallel_size": t.tensor_parallel_size,
            "ringattn_parallel_size": t.ringattn_parallel_size, "ulysses_parallel_size": t.ulysses_parallel_size}


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
            _check_chat_options(ds, key)
    _need(d.sample_packing_sequence_len > 0,
          f"data.sample_packing_sequence_len must be > 0, got {d.sample_packing_sequence_len}")
    _need(d.pad_to_multiple_of >= 1, f"data.pad_to_multiple_of must be >= 1, got {d.pad_to_multiple_of}")
    for i, ds in enumerate(d.datasets):
        _need(ds.num_samples is None or ds.num_samples >= 1,
              f"data.datasets[{i}].num_samples must be >= 1, got {ds.num_samples}")
    _need(d.dataloader_num_workers >= 0, f"data.dataloader_num_workers must be >= 0, got {d.dataloader_num_workers}")
    _need(d.dataloader_prefetch_factor is None or d.dataloader_prefetch_factor >= 1,
          f"data.dataloader_prefetch_factor must be >= 1, got {d.dataloader_prefetch_factor}")

    # parallelism
    _need(t.pipeline_parallel_size == 1, f"train.pipeline_parallel_size={t.pipeline_parallel_size}: pipeline "
                                         f"parallelism is not supported yet; set it to 1 (and give its devices to "
                                         f"data, context, expert or tensor parallelism)")
    for name in ("ulysses_parallel_size", "ringattn_parallel_size"):
        value = getattr(t, name)
        _need(isinstance(value, int) and value >= 1, f"train.{name} must be an integer >= 1, got {value!r}")
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
        from xorl_jax.parallel.sizes import expert_context_span  # no JAX there either

        context = {"ring": t.ringattn_parallel_size, "ulysses": t.ulysses_parallel_size}
        _need(expert_context_span(ep, t.data_parallel_shard_size, context) is not None,
              f"train.expert_parallel_size={ep} must divide train.data_parallel_shard_size="
              f"{t.data_parallel_shard_size}, or be such a divisor times ulysses_parallel_size and/or "
              f"ringattn_parallel_size (expert ranks are carved out of the FSDP group and the context ranks)")

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
    if t.optimizer == "muon":
        _need(math.isfinite(t.muon_lr) and t.muon_lr > 0, f"train.muon_lr must be > 0, got {t.muon_lr}")
        _need(0 <= t.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {t.muon_momentum}")
        _need(1 <= t.muon_ns_steps < 100, f"train.muon_ns_steps must be in [1, 99], got {t.muon_ns_steps}")
        _need(t.muon_adjust_lr_fn in (None, "original", "match_rms_adamw"),
              f"train.muon_adjust_lr_fn must be original, match_rms_adamw or null, got {t.muon_adjust_lr_fn!r}")

    # numerics, checkpoints, logging
    _need(cfg.model.scan_layers in (True, False, "auto"),
          f"model.scan_layers must be true, false or auto, got {cfg.model.scan_layers!r}")
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
        from xorl_jax.lora_names import check_config_targets  # no JAX there either

        check_config_targets(cfg, ConfigError)  # against the model's config.json when it is readable
    return cfg


# ------------------------------------------------------------------------------------------------ loading
def config_from_dict(raw: dict | None, overrides: list[str] | tuple = ()) -> Config:
    """Config from plain data (a parsed YAML file, sectioned or xorl's flat server format, or `config_to_dict`
    output) plus CLI-style overrides."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _sectioned(raw).items()}
    for section, name, value in _parse_overrides(overrides):
        current = raw.setdefault(section, {})
        if current is None:
            current = raw[section] = {}
        if not isinstance(current, dict):
            raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {current!r}")
        current[name] = value
    raw = _translate_xorl(raw)
    server = raw.pop("server", {})
    cfg = Config(**{section: _build(SECTIONS[section], values, section) for section, values in raw.items()},
                 server=server)
    if cfg.server:
        log.info("config: kept for the server mode, not used by training: %s", ", ".join(sorted(cfg.server)))
    m = cfg.model
    if cfg.train.init_from == "auto" and not m.model_path and m.config_path:
        log.info("config: no model.model_path: random initialisation from %s (train.init_from scratch), as xorl "
                 "does", m.config_path)
        cfg.train.init_from = "scratch"
    validate(cfg)
    _warn_no_effect(cfg)
    _apply_data_parallel_mode(cfg.train)
    return cfg


def _warn_no_effect(cfg: Config):
    if not cfg.train.enable_full_shard:
        log.warning("config: train.enable_full_shard false has no effect: parameters stay sharded between uses")
    d = cfg.data
    if d.sample_packing_sequence_len % d.pad_to_multiple_of:
        log.info("config: data.sample_packing_sequence_len %d is not a multiple of data.pad_to_multiple_of %d: "
                 "documents are packed into %d tokens and each row is padded to %d, as xorl pads packed rows",
                 d.sample_packing_sequence_len, d.pad_to_multiple_of, d.sample_packing_sequence_len,
                 -(-d.sample_packing_sequence_len // d.pad_to_multiple_of) * d.pad_to_multiple_of)
    if cfg.train.use_wandb:
        log.warning("config: train.use_wandb: Weights & Biases is not available here; metrics go to the log and "
                    "TensorBoard (train.use_tensorboard)")


class _NoDuplicateKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: the plain loader keeps the
    last, so a second `train:` section would silently drop every key of the first."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"'{key}' is given twice in one mapping (the second would replace the first); merge them",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_NoDuplicateKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(path: str | None, overrides: list[str] | tuple = ()) -> Config:
    """Config from a YAML file (None = all defaults) plus `--section.key=value` / `--section.key value` overrides."""
    raw = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.load(f, Loader=_NoDuplicateKeys)  # noqa: S506 - a SafeLoader subclass
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


def _suggest_override(name: str) -> str:
    """'; did you mean --train.lr?' for a key given without its section, else how an override is written."""
    owners = [s for s, cls in SECTIONS.items() if name.replace("-", "_") in _hints(cls)]
    if len(owners) == 1:
        return f"; did you mean --{owners[0]}.{name.replace('-', '_')}?"
    return "; overrides look like --section.key=value (every key: docs/CONFIG.md)"


def _parse_overrides(overrides) -> list[tuple[str, str, Any]]:
    out = []
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        if not isinstance(arg, str) or not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        dotted = body.split("=", 1)[0]
        if "." not in dotted:  # an option this parser does not know (a flag typo), not a key lacking its value
            raise ConfigError(f"unknown option --{dotted}{_suggest_override(dotted)}")
        if "=" in body:
            text = body.split("=", 1)[1]
            i += 1
        else:
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


def parse_cli(argv: list[str], *, need_data: bool = True) -> Config:
    """`--config FILE` (or `--config=FILE`) plus overrides, checked for a runnable training job (`need_data` false:
    one that needs no data, such as the dry run)."""
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
    check_runnable(cfg, need_data=need_data)
    return cfg


def check_runnable(cfg: Config, *, need_data: bool = True) -> Config:
    """What a training run needs beyond a valid config: weights or an architecture, and data (`need_data`)."""
    m, t = cfg.model, cfg.train
    if t.init_from == "scratch":
        _need(bool(m.model_path or m.config_path),
              "train.init_from scratch needs model.config_path (or model.model_path) for the architecture")
    else:
        _need(bool(m.model_path), "model.model_path is not set; give a HF or Orbax checkpoint directory "
                                  "(or --model.model_path=DIR)")
    _need(bool(cfg.data.datasets) or not need_data, "data.datasets is empty; add at least one {path, type} entry")
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
        "A config is a YAML file with the sections `model`, `data`, `train` and `lora` (or xorl's flat server",
        "format: see Coming from xorl); every key is optional.",
        "Override any key on the command line with `--section.key=value` or `--section.key value`; the value is",
        "read as YAML (`--train.lr=2e-5`, `--train.save_hf_weights=true`,",
        "`--lora.lora_target_modules=[q_proj,v_proj]`, `--data.datasets='[{path: a.jsonl, type: messages}]'`).",
        "Unknown keys, keys given twice, wrong types, values out of range and impossible combinations are errors",
        "with one line naming the key; a training run (`python -m xorl_jax.train`) also needs `model.model_path` (or",
        "`model.config_path` with `train.init_from: scratch`) and at least one entry in `data.datasets`.",
        "",
    ]
    for section, cls in SECTIONS.items():
        out += [f"## `{section}`", "", *_table(cls), ""]
        if section == "data":
            out += ["### Entries of `data.datasets` and `data.eval_datasets`", "", *_table(DatasetConfig), ""]
    out += [
        "## Defaults",
        "",
        "Omitted keys take xorl's defaults, so a xorl YAML trains here as it trains in xorl: among them",
        "`train.lr` 5e-5, `train.lr_min` 1e-7, `train.lr_warmup_ratio` 0, `train.lr_decay_style` constant,",
        "`train.save_hf_weights` true, `data.sample_packing_sequence_len` 32000, `data.pad_to_multiple_of` 128,",
        "`data.long_sequence_policy` drop (xorl drops documents longer than `max_seq_len`) and",
        "`model.train_router` false. Where a default here is not xorl's, it is for a reason given in",
        "[MIGRATING_FROM_XORL.md](MIGRATING_FROM_XORL.md), which lists every xorl key; the one that matters most:",
        f"`train.load_checkpoint_path` is `{TrainConfig.load_checkpoint_path}` here (xorl: null, a fresh start).",
        "",
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
        "A xorl YAML runs as it is, sectioned (xorl's local trainer) or flat (xorl's training server: the same",
        "keys, no sections; the server-only keys are kept in `Config.server` for the server mode). Values that",
        "name PyTorch machinery map to the equivalent here with an info line (`flash_attention_3` -> `auto`,",
        "`quack` -> `triton`, `deepep` -> `alltoall`, `dcp` -> `orbax`, ...); keys with no effect here are",
        "named in one info line; a feature that is not available gives a warning (or an error where it would",
        "change what is trained). Every xorl key and what it does here:",
        "[MIGRATING_FROM_XORL.md](MIGRATING_FROM_XORL.md).",
    ]
    return "\n".join(out) + "\n"


def _xorl_key_text(key: str) -> str:
    """What a xorl key does here, for docs/MIGRATING_FROM_XORL.md."""
    section, _, name = key.rpartition(".")
    if key in NO_EFFECT_KEYS:
        return f"no effect: {NO_EFFECT_KEYS[key]}"
    if key in NOT_AVAILABLE:
        accepted, why = NOT_AVAILABLE[key]
        shown = " or ".join(f"`{yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}`"
                            for v in accepted)
        return f"not available: {why}; {shown} accepted, another value gives a warning"
    if key in UNSUPPORTED_SWITCHES:
        accepted, why = UNSUPPORTED_SWITCHES[key]
        shown = " or ".join(f"`{yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}`"
                            for v in accepted)
        return f"must be {shown}: {why}"
    if key in RENAMED_KEYS:
        return f"becomes {RENAMED_KEYS[key][0]}"
    if section == "server":
        if name in SERVER_KEYS_USED:
            return f"server mode: {SERVER_KEYS[name]}"
        return f"no effect (xorl's server: {SERVER_KEYS[name]})"
    parts = ["same field"]
    parts += [f"`{value}` refused: {why}" for value, why in PYTORCH_VALUES.get(key, {}).items()]
    mapped = XORL_VALUES.get(key, {})
    if mapped:
        parts.append("; ".join(f"{', '.join(f'`{v}`' for v in mapped if mapped[v][0] == new)} -> `{new}`"
                               for new in dict.fromkeys(new for new, _ in mapped.values())))
    if key in NULL_IS_DEFAULT:
        parts.append("null = the default")
    if key in XORL_FIELD_NOTES:
        parts.append(XORL_FIELD_NOTES[key])
    return "; ".join(parts)


MIGRATING_MARKER = ("<!-- generated from xorl_jax/config.py by `python -m xorl_jax.config migrating "
                    "docs/MIGRATING_FROM_XORL.md`; do not edit below -->")


def render_migration_keys() -> str:
    """The generated part of docs/MIGRATING_FROM_XORL.md: every xorl key and what it does here."""
    titles = {"model": "`model`", "data": "`data`", "data.datasets[]": "`data.datasets[]` entries",
              "train": "`train`", "lora": "`lora`", "distill": "`distill`",
              "server": "Server-only keys (flat server configs)"}
    out = [MIGRATING_MARKER, "", "## Every xorl key", ""]
    for section, names in XORL_KEYS.items():
        out += [f"### {titles[section]}", "", "| key | here |", "|---|---|"]
        for name in names:
            key = f"{section}.{name}"
            mark = " (server format)" if key in SERVER_FORMAT_ONLY else ""
            out.append(f"| `{name}`{mark} | {_xorl_key_text(key)} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["migrating"]:  # [FILE]: rewrite what follows the marker in FILE
        if len(sys.argv) == 3:
            import os

            with open(sys.argv[2], encoding="utf-8") as f:
                head = f.read().split(MIGRATING_MARKER)[0]
            with open(sys.argv[2] + ".tmp", "w", encoding="utf-8") as f:
                f.write(head + render_migration_keys())
            os.replace(sys.argv[2] + ".tmp", sys.argv[2])
        else:
            print(render_migration_keys(), end="")
    else:
        print(render_config_reference(), end="")
