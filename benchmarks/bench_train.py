r"""Full training steps, xorl_jax against HF transformers + torch on the same GPU(s), same shapes and batch.

The xorl_jax side is the real training run: a YAML goes through `xorl_jax.config.parse_cli` and `Trainer` exactly as
`python -m xorl_jax.train --config FILE` takes it (its defaults, `auto` remat and layer settings included), and the
trainer's own loop runs the steps; the step time is the median of what that loop logs to metrics.jsonl after the
warm-up steps, so the number benchmarked is the number a user sees. Only what a benchmark must fix is overridden:
a temporary output directory, max_steps (warm-up + timed), no checkpoint, export, eval or resume, the compilation
cache off (the first step's time is a compile, never a hit left by an earlier run), a log line per step.

Each backend runs in its own subprocess (JAX and torch would fight over GPU memory). Reports tokens/s (total and
per GPU), MFU (989 TFLOP/s bf16 for H100/H200, causal attention counted as 6 * H * d * (T + 1) per layer, MoE on
active parameters), step time, time to first step (from process start: set-up, choosing and compilation included)
and peak device memory (the largest over the devices), plus the `auto` line of the run's start-up summary.

HF runs AutoModelForCausalLM.from_config (the same config.json, random init) in bf16 with sdpa, gradient
checkpointing (unless xorl_jax's remat is none) and fused AdamW, always on one GPU with the per-device rows of the
xorl_jax run (train.micro_batch_size) at its sequence length.

A YAML of yours (any `--section.key=value` after it overrides it, as on the train command line):

    python benchmarks/bench_train.py --config configs/qwen3_8b_full.yaml --train.max_steps=1 --backends jax

Shapes by name (`--model`): the script writes a YAML first (random init, dummy packed documents, bf16 compute,
one GPU unless mesh options say otherwise), prints where, and runs it the same way; option flags such as --remat,
--scan-layers, --batch, --seq and the mesh sizes become config overrides (on --config too). One H100:

    python benchmarks/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --backends jax,hf
    python benchmarks/bench_train.py --model qwen3_30b_a3b --layers 6 --backends jax,hf
    python benchmarks/bench_train.py --model qwen3_1.7b --backends jax --profile /tmp/prof --xla-dump /tmp/xla
    python benchmarks/bench_train.py --model qwen3_1.7b --backends jax \
        --sweep "remat=auto,full,dots_attention_saveable;scan_layers=true,false"

Several GPUs of one host (xorl_jax only uses them; --batch is rows per data-parallel rank, so the global batch is
--batch x (devices / tp)). NVLink multicast must stay off on these machines:

    NCCL_NVLS_ENABLE=0 python benchmarks/bench_train.py --model qwen3_8b --layers 8 --fsdp 2 --backends jax,hf
    NCCL_NVLS_ENABLE=0 python benchmarks/bench_train.py --model qwen3_30b_a3b --layers 8 --fsdp 4 --ep 4 \
        --backends jax --profile /tmp/prof_ep4
    NCCL_NVLS_ENABLE=0 python benchmarks/bench_train.py --model qwen3_8b --layers 8 --fsdp 2 --tp 2 --backends jax
    NCCL_NVLS_ENABLE=0 python benchmarks/bench_train.py --model qwen3_5_35b_a3b --layers 4 --fsdp -1 --ep 2 \
        --backends jax                                   # --fsdp -1: every visible GPU

Mesh options map to the train config: --fsdp = data_parallel_shard_size (expert ranks included), --ep =
expert_parallel_size (carved out of the FSDP group, must divide it), --tp = tensor_parallel_size, --dp =
data_parallel_replicate_size. With --model they default to one device; the run uses dp x fsdp x tp devices (the
first ones: CUDA_VISIBLE_DEVICES is set for the child, or the first of those already set there); -1 in one of them
takes every visible device. With --config and no mesh options the YAML's sizes and every visible device are used.

--profile DIR traces --profile-steps steady-state steps (after the trainer's loop, with its compiled step and state)
with jax.profiler into DIR/<run>/ (open perfetto_trace.json.gz in ui.perfetto.dev) and prints device time per
category (GEMM, cuDNN attention, Triton/Pallas kernels, fusions, collectives, copies) and the top ops
(benchmarks/profiling.py). --xla-dump DIR dumps the step's optimized HLO as text (XLA_FLAGS --xla_dump_to) and prints
a summary of the module: fusions, custom calls, collectives, compiled memory and the largest temporary buffers.

Smoke run on CPU fake devices (tiny model, a few seconds of compute):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_train.py \
        --model tiny_moe --layers 1 --batch 1 --seq 64 --backends jax --fsdp 4 --ep 4 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_BF16 = 989e12

SHAPES = {
    "qwen3_1.7b": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen3_8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     tie_word_embeddings=False),
    "qwen3_30b_a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], router_aux_loss_coef=0.001, vocab_size=151936,
                          tie_word_embeddings=False),
    "qwen3_5_35b_a3b": dict(model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40,
                            num_attention_heads=16, num_key_value_heads=2, head_dim=256, full_attention_interval=4,
                            linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                            linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=256,
                            num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            partial_rotary_factor=0.25, router_aux_loss_coef=0.001, vocab_size=248320,
                            tie_word_embeddings=False),
    # Tiny shapes for smoke runs on CPU fake devices (vocab covers the demo tokenizer the dummy data is drawn from).
    "tiny_dense": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=768,
                       tie_word_embeddings=False),
    "tiny_moe": dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], router_aux_loss_coef=0.001, vocab_size=768, tie_word_embeddings=False),
}
COMMON = dict(hidden_act="silu", max_position_embeddings=65536, rms_norm_eps=1e-6, rope_theta=1e6,
              attention_bias=False, attention_dropout=0.0, initializer_range=0.02, use_cache=False)


def shape_config(args) -> dict:
    """config.json of a --model shape (cut to --layers)."""
    cfg = dict(COMMON, **SHAPES[args.model])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if cfg["model_type"].startswith("qwen3_5"):
        n = cfg["num_hidden_layers"]
        k = cfg["full_attention_interval"]
        cfg["layer_types"] = ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)]
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}
    return cfg


def remat_choices() -> tuple[str, ...]:
    """The remat policies the config accepts (read from it, so new policies show up here)."""
    from xorl_jax.config import TrainConfig

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "remat_policy")
    return tuple(field.metadata["choices"])


def mesh_devices(args) -> int | None:
    """Devices the mesh needs, or None when one size is -1 or left to the YAML (every visible device)."""
    sizes = (args.dp, args.fsdp, args.tp)
    return None if -1 in sizes or None in sizes else args.dp * args.fsdp * args.tp


def apply_shape_defaults(args):
    """--model runs: 4 rows of 4096 tokens on one device unless the flags say otherwise (--config: the YAML's)."""
    if args.config is None and args.model is None:
        args.model = "qwen3_1.7b"
    if args.model is None:
        return
    for name, value in (("batch", 4), ("seq", 4096), ("dp", 1), ("fsdp", 1), ("ep", 1), ("tp", 1)):
        if getattr(args, name) is None:
            setattr(args, name, value)


def config_overrides(rest: list[str], p: argparse.ArgumentParser) -> list[str]:
    """Arguments argparse did not know: `--section.key=value` / `--section.key value` overrides of the config."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if key.split(".", 1)[0] not in BENCH_SECTIONS or "." not in key:
            p.error(f"unrecognized argument {arg!r} (config overrides look like --train.lr=2e-5)")
        if "=" in arg or i + 1 >= len(rest):
            out.append(arg)
            i += 1
        else:
            out += [arg, rest[i + 1]]
            i += 2
    return out


def _newest(pattern: str) -> str | None:
    import glob

    found = glob.glob(pattern, recursive=True)
    return max(found, key=os.path.getmtime) if found else None


def inspect_step(args, trainer, state, batch, step_s: float, label: str) -> dict:
    """--profile / --xla-dump: trace a few steps and summarise them; summarise the optimized HLO module."""
    import jax

    import profiling  # benchmarks/profiling.py (this script's folder is on sys.path)

    out = {}
    compiled = trainer.train_step.lower(state, batch).compile()  # cached: the step compiled already
    hlo_text = compiled.as_text()
    try:
        memory = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        memory = None
    if args.profile:
        pdir = os.path.join(args.profile, re.sub(r"[^\w.-]+", "_", label))
        with jax.profiler.trace(pdir, create_perfetto_trace=True):
            for _ in range(args.profile_steps):
                state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics["loss"])
        trace = profiling.find_trace(pdir)
        summary = profiling.summarize_trace(trace, hlo_text=hlo_text, steps=args.profile_steps, step_time_s=step_s,
                                            top=args.profile_top)
        out.update(profile=summary, profile_text=profiling.format_summary(summary, top=args.profile_top),
                   trace=trace)
    buffers = None
    if args.xla_dump:
        path = _newest(os.path.join(args.xla_dump, "**", "*train_step*after_optimizations-buffer-assignment.txt"))
        if path:
            with open(path) as f:
                buffers = f.read()
        out["hlo_dump"] = _newest(os.path.join(args.xla_dump, "**", "*train_step*after_optimizations.txt"))
    hlo = profiling.hlo_summary(hlo_text, memory, buffers)
    out.update(hlo=hlo, hlo_text=profiling.format_hlo_summary(hlo))
    return out


def experiments(args):
    """The experiment flags as the trainer takes them (unset flags: every run's defaults): the named values
    `dots_attention_saveable` keeps ("none" = only matmuls and attention), the slot counts the host may fix the packed
    attention layout at."""
    from xorl_jax.train_setup import Experiments

    changes = {}
    if args.remat_keep_names:
        names = args.remat_keep_names
        changes["remat_saved_names"] = () if names == "none" else tuple(names.split(","))
    if args.attn_sizes:
        changes["attn_slot_sizes"] = tuple(int(m) for m in args.attn_sizes.split(","))
    return Experiments(**changes)


BENCH_SECTIONS = ("model", "data", "train", "lora")


def write_shape_config(args, directory: str) -> str:
    """--model: config.json of the shape and a YAML that trains it from scratch on dummy packed documents; returns
    the YAML's path (what `python -m xorl_jax.train --config` would take)."""
    import yaml

    from xorl_jax.data.demo import DEMO_DIR

    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(shape_config(args), f)
    run = {
        # the demo tokenizer: dummy documents are drawn from its vocabulary, which every shape's covers
        "model": {"config_path": directory, "tokenizer_path": DEMO_DIR, "dtype": "bfloat16"},
        "data": {"datasets": [{"path": "dummy"}], "sample_packing_method": "multipack"},
        "train": {"init_from": "scratch", "gradient_accumulation_steps": 1, "lr": 1e-5},
    }
    path = os.path.join(directory, "bench.yaml")
    with open(path, "w") as f:
        f.write(f"# benchmarks/bench_train.py --model {args.model} --layers {args.layers}\n")
        yaml.safe_dump(run, f, sort_keys=False)
    return path


def flag_overrides(args, mesh: bool = True) -> list[str]:
    """The option flags given, as config overrides (applied to the YAML; unset flags leave it as it is)."""
    out = []

    def put(key, value):
        if value is not None:
            out.append(f"--{key}={value}")

    if args.remat is not None:
        put("train.enable_gradient_checkpointing", str(args.remat != "none").lower())
        if args.remat != "none":
            put("train.remat_policy", args.remat)
    put("model.scan_layers", args.scan_layers)
    put("model.attn_implementation", args.attn)
    put("model.moe_implementation", args.moe)
    put("model.gdn_implementation", args.gdn)
    put("model.param_dtype", args.param_dtype)
    put("train.optimizer_dtype", args.optimizer_dtype)
    put("train.ce_chunk_size", args.ce_chunk)
    put("train.micro_batch_size", args.batch)
    put("data.sample_packing_sequence_len", args.seq)
    if mesh:
        put("train.data_parallel_replicate_size", args.dp)
        put("train.data_parallel_shard_size", args.fsdp)
        put("train.expert_parallel_size", args.ep)
        put("train.tensor_parallel_size", args.tp)
    return out


def bench_overrides(args, out_dir: str) -> list[str]:
    """What a benchmark must fix on top of the user's config (nothing that changes the step)."""
    return [f"--train.output_dir={out_dir}", f"--train.max_steps={args.warmup + args.steps}",
            "--train.save_at_end=false", "--train.save_steps=0", "--train.save_hf_weights=false",
            "--train.load_checkpoint_path=null", "--train.eval_steps=0", "--data.eval_datasets=[]",
            "--train.sample_eval_prompts=0", "--train.log_steps=1", "--train.use_tensorboard=false",
            # off: the first step's time is a compile, never a hit left by an earlier run on the machine
            "--train.compilation_cache_dir=null"]


def resolve_mesh_flags(args, device_count: int):
    """--fsdp -1 takes the devices dp x tp leave; --ep -1 then spans the whole FSDP group (the config allows only one
    -1, so resolve them here where the device count is known)."""
    fsdp, ep = args.fsdp, args.ep
    dp, tp = args.dp or 1, args.tp or 1
    if ep == -1 and fsdp == -1 and dp > 0 and tp > 0:
        fsdp = device_count // (dp * tp)
    if ep == -1 and fsdp not in (-1, None):
        ep = fsdp
    args.fsdp, args.ep = fsdp, ep


def timed_steps(metrics_path: str, warmup: int) -> list[dict]:
    """The train rows the trainer's loop logged after the warm-up steps."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("split") == "train" and r.get("step_time_s") is not None]
    return rows[warmup:]


def run_jax(args, config_path: str, overrides: list[str]) -> dict:
    import logging

    import jax

    from xorl_jax.config import parse_cli
    from xorl_jax.train import _quiet_library_logs
    from xorl_jax.train_setup import backend_summary
    from xorl_jax.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the CLI: the run's own notes on stdout
    _quiet_library_logs()
    resolve_mesh_flags(args, jax.device_count())
    out_dir = os.path.join(tempfile.mkdtemp(prefix="bench_train_"), "out")
    argv = ["--config", config_path, *overrides, *flag_overrides(args), *bench_overrides(args, out_dir)]
    print("jax: python -m xorl_jax.train " + " ".join(argv), flush=True)
    trainer = Trainer(parse_cli(argv), experiments(args))
    if args.attn_layout == "device":  # the tier picked per layer on the device, as batches without a count are
        trainer.layout_planner = None
    probe = None
    if args.profile or args.xla_dump:  # a batch for the steps traced after the run (the loop may close its source)
        rows = next(trainer.train_iter)
        probe = rows if trainer.batches_on_device else trainer._device_batch(rows)
    run = trainer.train()
    rows = timed_steps(os.path.join(out_dir, "metrics.jsonl"), args.warmup)
    if not rows:
        raise SystemExit(f"jax: no timed step in {out_dir}/metrics.jsonl (--steps {args.steps})")
    times = sorted(r["step_time_s"] for r in rows)
    step_s = times[len(times) // 2]
    first = run.get("process_age_at_first_step_s")
    if first is None:  # no /proc: the trainer's set-up and its first step
        first = sum(v for v in trainer.startup_s.values() if v) + (run.get("time_to_first_step_s") or 0.0)
    peaks = [r["peak_memory_gib"] for r in rows if r.get("peak_memory_gib") is not None]
    choice = trainer.layer_choice
    result = {"step_s": step_s, "first_step_s": first, "loss": run.get("loss"), "peak_gib": max(peaks, default=None),
              "flops_per_token": trainer.model_config.flops_per_token(trainer.seq_len),
              "params": trainer.param_count, "n_devices": trainer.mesh.size, "mesh": dict(trainer.mesh.shape),
              "dp_size": trainer.dp_size, "tokens_per_step": trainer.tokens_per_step(),
              "device_kind": jax.devices()[0].device_kind, "backends": backend_summary(trainer.options),
              "remat_policy": trainer.options.remat_policy, "scan_layers": trainer.options.scan_layers,
              "auto": choice.line(), "auto_compile_s": choice.compile_s, "steps_timed": len(times),
              "startup_s": trainer.startup_s, "first_step_in_loop_s": run.get("time_to_first_step_s"),
              "command": "python -m xorl_jax.train " + " ".join(argv)}
    if probe is not None:
        result.update(inspect_step(args, trainer, trainer.state, probe, step_s, args.label))
    return result


def model_flops_per_token(cfg: dict, seq: int) -> float:
    """The FLOP count both backends are measured against (xorl_jax's family config; pure arithmetic)."""
    from xorl_jax.models.loading import build_config

    return float(build_config(cfg)[1].flops_per_token(seq))


def hf_side(args, config_path: str, overrides: list[str]) -> tuple[dict, int, int, bool]:
    """(config.json, rows, tokens per row, gradient checkpointing) of the xorl_jax run, for HF's side."""
    from xorl_jax.config import load_config
    from xorl_jax.checkpoint.orbax import read_hf_config

    cfg = load_config(config_path, [*overrides, *flag_overrides(args, mesh=False)])
    hf = read_hf_config(cfg.model.config_path or cfg.model.model_path)
    if isinstance(hf.get("text_config"), dict) and "model_type" in hf["text_config"]:  # multimodal wrapper
        hf = dict(hf["text_config"])
    checkpointing = cfg.train.enable_gradient_checkpointing and cfg.train.remat_policy != "none"
    return hf, cfg.train.micro_batch_size, cfg.data.sample_packing_sequence_len, checkpointing


def run_hf(args, cfg: dict, batch: int, seq: int, checkpointing: bool) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers

    hf = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items()})
    if "layer_types" in cfg:  # hybrid: HF runs its DeltaNet layers through FLA when it is installed
        try:
            import fla.ops.common.chunk_o as fla_chunk_o

            # FLA 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (a miscompile); for timing only
            fla_chunk_o.TRITON_ABOVE_3_7_1 = True
            print("hf: FLA found; its Hopper/Triton<3.7.1 backward guard is bypassed (timing only)", flush=True)
        except ImportError:
            print("hf: FLA not installed; HF uses its slow torch DeltaNet path", flush=True)
    kwargs = dict(torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model = None
    for experts in (("grouped_mm",) if "num_experts" in cfg else ()) + (None,):
        try:  # transformers >= 5 picks a fused experts kernel by name; older versions take no such argument
            with torch.device("cuda"):  # random init on the GPU, not on the host and then copied (same step)
                model = transformers.AutoModelForCausalLM.from_config(
                    hf, **kwargs, **({"experts_implementation": experts} if experts else {}))
            break
        except (TypeError, ValueError):
            continue
    model = model.cuda()
    if checkpointing:  # HF has one checkpointing mode: the whole layer
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device="cuda", generator=g)

    def step():
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + (getattr(out, "aux_loss", None) or 0) * cfg.get("router_aux_loss_coef", 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    deadline = time.perf_counter() + args.hf_time_limit
    for _ in range(args.warmup - 1):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        if time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"step_s": sorted(times)[len(times) // 2] if times else None, "first_step_s": first,
            "loss": float(loss), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "params": sum(p.numel() for p in model.parameters()), "steps_timed": len(times), "n_devices": 1,
            "flops_per_token": model_flops_per_token(cfg, seq),
            "mesh": None, "dp_size": 1, "tokens_per_step": batch * seq, "gradient_checkpointing": checkpointing,
            "device_kind": torch.cuda.get_device_name(0)}


def child(args, overrides: list[str]):
    if args.child == "jax":
        result = run_jax(args, args.config, overrides)
    else:
        result = run_hf(args, *hf_side(args, args.config, overrides))
    print("RESULT " + json.dumps(result), flush=True)


def child_env(args, backend: str) -> dict:
    """The child's environment: the device count the mesh needs, and the XLA dump flags."""
    env = dict(os.environ)
    n = mesh_devices(args) if backend == "jax" else 1
    flags = env.get("XLA_FLAGS", "")
    if n is not None:
        # Fake CPU devices follow the mesh; on GPU machines, the first n GPUs (of those the caller made visible).
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
        flags += f" --xla_force_host_platform_device_count={n}"
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
    if backend == "jax" and args.xla_dump:
        flags += f" --xla_dump_to={args.xla_dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=train_step"
    if backend == "jax" and args.no_command_buffers:
        flags += " --xla_gpu_enable_command_buffer="
    env["XLA_FLAGS"] = flags.strip()
    if backend == "jax":
        from xorl_jax.autotune import claim_device_memory

        claim_device_memory(env)  # as python -m xorl_jax.train does
    if backend == "hf":  # the torch child imports xorl_jax only for the FLOP count: keep JAX off the GPU
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def parse_sweep(spec: str | None) -> list[list[str]]:
    """"remat=full,dots_saveable;ce_chunk=1024,4096" -> the argv suffix of each point of the product."""
    if not spec:
        return [[]]
    axes = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, _, values = part.partition("=")
        if not values:
            raise SystemExit(f"--sweep: {part!r} is not key=v1,v2,...")
        flag = "--" + key.strip().replace("_", "-")
        axes.append([(flag, v.strip()) for v in values.split(",") if v.strip()])
    return [[x for pair in point for x in pair] for point in itertools.product(*axes)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a training YAML, run as python -m xorl_jax.train takes it (any "
                   "--section.key=value arguments override it)")
    p.add_argument("--model", choices=sorted(SHAPES), default=None, help="a shape by name instead of --config "
                   "(default qwen3_1.7b): the script writes the YAML")
    p.add_argument("--layers", type=int, default=0, help="--model: cut the depth to this many layers (0 = full)")
    p.add_argument("--batch", type=int, default=None, help="train.micro_batch_size: packed rows per data-parallel "
                   "rank (HF: rows on its GPU); --model default 4")
    p.add_argument("--seq", type=int, default=None, help="data.sample_packing_sequence_len; --model default 4096")
    p.add_argument("--steps", type=int, default=8, help="timed steps (their median is the step time)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the timed ones (the first compiles)")
    p.add_argument("--backends", default="jax,hf")
    p.add_argument("--fsdp", type=int, default=None, help="train.data_parallel_shard_size (-1 = every visible "
                   "device); --model default 1")
    p.add_argument("--ep", type=int, default=None, help="train.expert_parallel_size (divides --fsdp; -1 = all of "
                   "it); --model default 1")
    p.add_argument("--tp", type=int, default=None, help="train.tensor_parallel_size; --model default 1")
    p.add_argument("--dp", type=int, default=None, help="train.data_parallel_replicate_size (HSDP replicas); "
                   "--model default 1")
    p.add_argument("--remat", default=None, choices=remat_choices(), help="train.remat_policy (none also turns "
                   "gradient checkpointing off, HF's too); default: the config's (auto)")
    p.add_argument("--scan-layers", default=None, choices=("true", "false", "auto"), help="model.scan_layers "
                   "(false: unrolled layers); default: the config's (auto)")
    p.add_argument("--attn", default=None, help="model.attn_implementation")
    p.add_argument("--attn-layout", default="host", choices=("host", "device"), help="the packed attention layout "
                   "fixed per batch on the host (what the trainer does) or picked per layer on the device")
    p.add_argument("--remat-keep-names", default=None, help="experiment: the named values dots_attention_saveable "
                   "keeps, comma-separated, or none (default: models.common.SAVED_NAMES, the weights' casts to the "
                   "compute dtype, expert_weights and compute_weights, kept with unrolled layers only; "
                   "grouped_matmul,mlp_activation,expert_weights keeps the dense weights' casts no longer)")
    p.add_argument("--attn-sizes", default=None, help="experiment: comma-separated slot counts the host may fix the "
                   "packed cuDNN attention layout at (default: kernels.attention.segment_tiers, 8 and 64)")
    p.add_argument("--moe", default=None, help="model.moe_implementation")
    p.add_argument("--gdn", default=None, help="model.gdn_implementation")
    p.add_argument("--ce-chunk", type=int, default=None, help="train.ce_chunk_size (tokens per chunk of the "
                   "chunked cross-entropy)")
    p.add_argument("--param-dtype", default=None, help="model.param_dtype")
    p.add_argument("--optimizer-dtype", default=None, help="train.optimizer_dtype")
    p.add_argument("--hf-time-limit", type=float, default=240.0)
    p.add_argument("--profile", default=None, metavar="DIR", help="trace steady-state steps into DIR and summarise")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--no-command-buffers", action="store_true", help="XLA GPU command buffers off, so the profile "
                   "names each fusion (and its JAX op and source line) instead of the CUDA graph holding it")
    p.add_argument("--profile-top", type=int, default=25, help="ops listed in the profile summary")
    p.add_argument("--xla-dump", default=None, metavar="DIR", help="dump the step's optimized HLO into DIR")
    p.add_argument("--sweep", default=None, help='run every combination, e.g. "remat=full,dots_saveable;'
                   'ce_chunk=1024,4096" (keys are option names)')
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str]):
    args, rest = p.parse_known_args(argv)
    overrides = config_overrides(rest, p)
    apply_shape_defaults(args)
    return args, overrides


def main():
    p = build_parser()
    args, overrides = parse(p, sys.argv[1:])
    if args.child:
        return child(args, overrides)
    if args.config is not None and args.model is not None:
        p.error("give --config FILE or --model NAME, not both")
    if args.ep not in (None, 1, -1) and args.fsdp not in (None, -1) and args.fsdp % args.ep:
        p.error(f"--ep {args.ep} must divide --fsdp {args.fsdp} (expert ranks are carved out of the FSDP group)")
    argv = sys.argv[1:]
    if args.config is None:  # --model: the YAML the children (and a user, to reproduce) run
        config = write_shape_config(args, tempfile.mkdtemp(prefix="bench_train_"))
        print(f"config: {config} (python -m xorl_jax.train --config {config} trains the same)", flush=True)
        argv = argv + ["--config", config]
        args.config = config
    results, run_args = {}, {}
    for extra in parse_sweep(args.sweep):
        point, _ = parse(p, argv + extra)
        suffix = " ".join(f"{extra[i][2:]}={extra[i + 1]}" for i in range(0, len(extra), 2))
        for backend in point.backends.split(","):
            label = f"{backend} {suffix}".strip()
            cmd = [sys.executable, os.path.abspath(__file__), *argv, *extra, "--child", backend, "--label", label]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=point.hf_time_limit + 1200,
                                  env=child_env(point, backend))
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{label}: failed (exit {proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}",
                      flush=True)
                continue
            for note in (ln for ln in proc.stdout.splitlines() if ln.startswith(f"{backend}: ")):
                print(note, flush=True)  # the child's notes: the train command, the path HF took (e.g. FLA)
            results[label] = json.loads(line[7:])
            run_args[label] = point
    fpt = next((r["flops_per_token"] for r in results.values() if r.get("flops_per_token")), None)
    what = f"{args.model} layers={args.layers or 'full'}" if args.model else args.config
    print(f"\n{what}{' ' + ' '.join(overrides) if overrides else ''}")
    w = max([8] + [len(k) for k in results])
    print(f"{'run':{w}} {'GPUs':>4} {'step ms':>9} {'tokens/step':>11} {'tok/s':>10} {'tok/s/GPU':>10} {'MFU':>6} "
          f"{'first step s':>12} {'peak GiB':>8} {'params':>14}")
    for name, r in results.items():
        if r.get("step_s") is None:
            print(f"{name:{w}} did not finish a timed step in {run_args[name].hf_time_limit:.0f} s")
            continue
        n = r.get("n_devices") or 1
        tps = r["tokens_per_step"] / r["step_s"]
        r.update(tokens_per_s=tps, tokens_per_s_per_device=tps / n)
        r["mfu"] = tps / n * fpt / PEAK_BF16 if fpt else None
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        print(f"{name:{w}} {n:4d} {r['step_s'] * 1e3:9.1f} {r['tokens_per_step']:11,} {tps:10,.0f} {tps / n:10,.0f} "
              f"{mfu:>6} {r['first_step_s']:12.1f} {peak:>8} {r['params']:14,}")
    for name, r in results.items():
        if "remat_policy" in r:
            scan = "scanned" if r["scan_layers"] else "unrolled"
            print(f"[{name}] {r['backends']}, remat={r['remat_policy']}, layers={scan}"
                  + (f"\n[{name}] {r['auto']}" if r.get("auto") else ""))
        elif "gradient_checkpointing" in r:
            print(f"[{name}] gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}")
    if "jax" in results and results.get("hf", {}).get("tokens_per_s"):
        ratio = results["jax"]["tokens_per_s_per_device"] / results["hf"]["tokens_per_s"]
        print(f"xorl_jax / HF throughput per GPU: {ratio:.2f}x")
    for name, r in results.items():
        if r.get("profile_text"):
            print(f"\n[{name}] profile ({r['trace']}):\n{r['profile_text']}")
        if r.get("hlo_text"):
            print(f"\n[{name}] {r['hlo_text']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "overrides": overrides, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
