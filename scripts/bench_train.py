r"""Full training steps, xorl_jax against HF transformers + torch on the same GPU(s), same shapes and batch.

Each backend runs in its own subprocess (JAX and torch would fight over GPU memory), from a random init:
forward, backward, AdamW update, gradient checkpointing. Reports tokens/s (total and per GPU), MFU (989 TFLOP/s
bf16 for H100/H200, causal attention counted as 6 * H * d * (T + 1) per layer, MoE on active parameters), step
time, time to first step (set-up and compilation included) and peak device memory (the largest over the devices).

xorl_jax runs its real training step (Trainer: packed dummy documents, chunked cross-entropy, remat policy from
--remat); HF runs AutoModelForCausalLM.from_config in bf16 with sdpa, gradient checkpointing (unless --remat none)
and fused AdamW, always on one GPU with --batch rows.

One H100 (the default mesh is one device, whatever is visible):

    python scripts/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --backends jax,hf
    python scripts/bench_train.py --model qwen3_30b_a3b --layers 6 --backends jax,hf
    python scripts/bench_train.py --model qwen3_1.7b --backends jax --profile /tmp/prof --xla-dump /tmp/xla
    python scripts/bench_train.py --model qwen3_1.7b --backends jax \
        --sweep "remat=full,dots_saveable,dots_with_no_batch_dims_saveable;ce_chunk=1024,4096"

Several GPUs of one host (xorl_jax only uses them; --batch is rows per data-parallel rank, so the global batch is
--batch x (devices / tp)). NVLink multicast must stay off on these machines:

    NCCL_NVLS_ENABLE=0 python scripts/bench_train.py --model qwen3_8b --layers 8 --fsdp 2 --backends jax,hf
    NCCL_NVLS_ENABLE=0 python scripts/bench_train.py --model qwen3_30b_a3b --layers 8 --fsdp 4 --ep 4 \
        --backends jax --profile /tmp/prof_ep4
    NCCL_NVLS_ENABLE=0 python scripts/bench_train.py --model qwen3_8b --layers 8 --fsdp 2 --tp 2 --backends jax
    NCCL_NVLS_ENABLE=0 python scripts/bench_train.py --model qwen3_5_35b_a3b --layers 4 --fsdp -1 --ep 2 \
        --backends jax                                   # --fsdp -1: every visible GPU

Mesh options map to the train config: --fsdp = data_parallel_shard_size (expert ranks included), --ep =
expert_parallel_size (carved out of the FSDP group, must divide it), --tp = tensor_parallel_size, --dp =
data_parallel_replicate_size. The run uses dp x fsdp x tp devices (the first ones: CUDA_VISIBLE_DEVICES is set for
the child, or the first of those already set there); -1 in one of them takes every visible device.

--profile DIR traces --profile-steps steady-state steps (after the timed ones) with jax.profiler into DIR/<run>/
(open perfetto_trace.json.gz in ui.perfetto.dev) and prints device time per category (GEMM, cuDNN attention,
Triton/Pallas kernels, fusions, collectives, copies) and the top ops (xorl_jax/profiling.py). --xla-dump DIR dumps
the step's optimized HLO as text (XLA_FLAGS --xla_dump_to) and prints a summary of the module: fusions, custom
calls, collectives, compiled memory and the largest temporary buffers.

Smoke run on CPU fake devices (tiny model, a few seconds of compute):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/bench_train.py \
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


def hf_config(args) -> dict:
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
    """Devices the mesh needs, or None when one size is -1 (every visible device)."""
    sizes = (args.dp, args.fsdp, args.tp)
    return None if -1 in sizes else args.dp * args.fsdp * args.tp


def _newest(pattern: str) -> str | None:
    import glob

    found = glob.glob(pattern, recursive=True)
    return max(found, key=os.path.getmtime) if found else None


def inspect_step(args, trainer, state, batch, step_s: float, label: str) -> dict:
    """--profile / --xla-dump: trace a few steps and summarise them; summarise the optimized HLO module."""
    import jax

    from xorl_jax import profiling

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


def _remat_keep_names(names: str):
    """Experiment: the named values `dots_attention_saveable` keeps ("none" = only matmuls and attention)."""
    from xorl_jax.models import common

    common.SAVED_NAMES = () if names == "none" else tuple(names.split(","))


def _adam_direction(direction: str):
    """Experiment: AdamW's direction from the stored (rounded) bf16 moments or from them before rounding (the
    default)."""
    import functools

    from xorl_jax import optim

    optim.scale_by_adam_low_precision = functools.partial(optim.scale_by_adam_low_precision,
                                                          direction_from_stored=direction == "stored")


def run_jax(args, cfg: dict) -> dict:
    t0 = time.perf_counter()
    import jax

    from xorl_jax.config import config_from_dict
    from xorl_jax.data.demo import DEMO_DIR
    from xorl_jax.metrics import peak_memory_gib
    from xorl_jax.train_setup import backend_summary
    from xorl_jax.trainer import Trainer

    if args.remat_keep_names:
        _remat_keep_names(args.remat_keep_names)
    if args.adam_direction:
        _adam_direction(args.adam_direction)
    if args.attn_sizes:  # experiment: the slot counts the host may fix the packed attention layout at
        from xorl_jax.kernels import attention

        attention.HOST_SIZES = tuple(int(m) for m in args.attn_sizes.split(","))
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    # --fsdp -1 takes the devices dp x tp leave; --ep -1 then spans the whole FSDP group (the config allows only
    # one -1, so resolve them here where the device count is known)
    fsdp, ep = args.fsdp, args.ep
    if ep == -1 and fsdp == -1 and args.dp > 0 and args.tp > 0:
        fsdp = jax.device_count() // (args.dp * args.tp)
    if ep == -1 and fsdp != -1:
        ep = fsdp
    run_cfg = config_from_dict({
        "model": {"config_path": tmp, "tokenizer_path": DEMO_DIR, "attn_implementation": args.attn,
                  "moe_implementation": args.moe, "gdn_implementation": args.gdn, "dtype": "bfloat16",
                  "param_dtype": args.param_dtype, "scan_layers": args.scan_layers == "true"},
        "data": {"datasets": [{"path": "dummy"}], "sample_packing_sequence_len": args.seq,
                 "sample_packing_method": "multipack"},
        "train": {"output_dir": os.path.join(tmp, "out"), "init_from": "scratch", "micro_batch_size": args.batch,
                  "gradient_accumulation_steps": 1, "max_steps": args.steps + args.warmup + args.profile_steps,
                  "lr": 1e-5, "enable_gradient_checkpointing": args.remat != "none", "remat_policy": args.remat,
                  "ce_chunk_size": args.ce_chunk, "optimizer_dtype": args.optimizer_dtype, "use_tensorboard": False,
                  "data_parallel_replicate_size": args.dp, "data_parallel_shard_size": fsdp,
                  "expert_parallel_size": ep, "tensor_parallel_size": args.tp,
                  # off: the first step's time is a compile, never a hit left by an earlier run on the machine
                  "compilation_cache_dir": None},
    })
    trainer = Trainer(run_cfg)
    if args.attn_layout == "device":  # the tier picked per layer on the device, as batches without a count are
        trainer.host_attention_layout = False
    batches = [trainer._device_batch(next(trainer.train_iter)) for _ in range(2)]
    state, metrics = trainer.train_step(trainer.state, batches[0])
    jax.block_until_ready(metrics["loss"])
    first = time.perf_counter() - t0
    for i in range(args.warmup - 1):
        state, metrics = trainer.train_step(state, batches[i % 2])
    jax.block_until_ready(metrics["loss"])
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, metrics = trainer.train_step(state, batches[i % 2])
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    result = {"step_s": step_s, "first_step_s": first, "loss": float(metrics["loss"]),
              "peak_gib": peak_memory_gib(), "flops_per_token": trainer.model_config.flops_per_token(args.seq),
              "params": trainer.param_count, "n_devices": trainer.mesh.size, "mesh": dict(trainer.mesh.shape),
              "dp_size": trainer.dp_size, "tokens_per_step": trainer.tokens_per_step(),
              "device_kind": jax.devices()[0].device_kind, "backends": backend_summary(trainer.options)}
    if args.profile or args.xla_dump:
        result.update(inspect_step(args, trainer, state, batches[0], step_s, args.label))
    return result


def model_flops_per_token(cfg: dict, seq: int) -> float:
    """The FLOP count both backends are measured against (xorl_jax's family config; pure arithmetic)."""
    from xorl_jax.models.loading import build_config

    return float(build_config(cfg)[1].flops_per_token(seq))


def run_hf(args, cfg: dict) -> dict:
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
            model = transformers.AutoModelForCausalLM.from_config(
                hf, **kwargs, **({"experts_implementation": experts} if experts else {}))
            break
        except (TypeError, ValueError):
            continue
    model = model.cuda()
    if args.remat != "none":  # HF has one checkpointing mode: the whole layer
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), device="cuda", generator=g)

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
            "flops_per_token": model_flops_per_token(cfg, args.seq),
            "mesh": None, "dp_size": 1, "tokens_per_step": args.batch * args.seq,
            "device_kind": torch.cuda.get_device_name(0)}


def child(args):
    cfg = hf_config(args)
    result = run_jax(args, cfg) if args.child == "jax" else run_hf(args, cfg)
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
    p.add_argument("--model", choices=sorted(SHAPES), default="qwen3_1.7b")
    p.add_argument("--layers", type=int, default=0, help="cut the depth to this many layers (0 = full)")
    p.add_argument("--batch", type=int, default=4, help="packed rows per data-parallel rank (HF: rows on its GPU)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backends", default="jax,hf")
    p.add_argument("--fsdp", type=int, default=1, help="train.data_parallel_shard_size (-1 = every visible device)")
    p.add_argument("--ep", type=int, default=1, help="train.expert_parallel_size (divides --fsdp; -1 = all of it)")
    p.add_argument("--tp", type=int, default=1, help="train.tensor_parallel_size")
    p.add_argument("--dp", type=int, default=1, help="train.data_parallel_replicate_size (HSDP replicas)")
    p.add_argument("--remat", default="full", choices=remat_choices(), help="train.remat_policy (none also turns "
                   "HF's gradient checkpointing off)")
    p.add_argument("--scan-layers", default="true", choices=("true", "false"), help="model.scan_layers (false: "
                   "unrolled layers)")
    p.add_argument("--attn", default="auto", help="model.attn_implementation")
    p.add_argument("--attn-layout", default="host", choices=("host", "device"), help="the packed attention layout "
                   "fixed per batch on the host (what the trainer does) or picked per layer on the device")
    p.add_argument("--remat-keep-names", default=None, help="experiment: the named values dots_attention_saveable "
                   "keeps, comma-separated, or none (default: models.common.SAVED_NAMES)")
    p.add_argument("--attn-sizes", default=None, help="experiment: comma-separated slot counts the host may fix the "
                   "packed cuDNN attention layout at (default: kernels.attention.segment_tiers, 8 and 64)")
    p.add_argument("--adam-direction", choices=("stored", "fresh"), default=None,
                   help="experiment, bf16 optimizer state: AdamW's direction from the stored moments or from the "
                   "moments before rounding (the default)")
    p.add_argument("--moe", default="auto", help="model.moe_implementation")
    p.add_argument("--gdn", default="auto", help="model.gdn_implementation")
    p.add_argument("--ce-chunk", type=int, default=2048, help="train.ce_chunk_size (tokens per chunk of the "
                   "chunked cross-entropy)")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--optimizer-dtype", default="float32")
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


def main():
    p = build_parser()
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.ep not in (1, -1) and args.fsdp not in (-1,) and args.fsdp % args.ep:
        p.error(f"--ep {args.ep} must divide --fsdp {args.fsdp} (expert ranks are carved out of the FSDP group)")
    results, run_args = {}, {}
    for extra in parse_sweep(args.sweep):
        point = p.parse_args(sys.argv[1:] + extra)
        suffix = " ".join(f"{extra[i][2:]}={extra[i + 1]}" for i in range(0, len(extra), 2))
        for backend in point.backends.split(","):
            label = f"{backend} {suffix}".strip()
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], *extra, "--child", backend,
                   "--label", label]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=point.hf_time_limit + 1200,
                                  env=child_env(point, backend))
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{label}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                continue
            for note in (ln for ln in proc.stdout.splitlines() if ln.startswith(f"{backend}: ")):
                print(note, flush=True)  # the child's notes on the path it took (e.g. FLA for HF's DeltaNet)
            results[label] = json.loads(line[7:])
            run_args[label] = point
    fpt = next((r["flops_per_token"] for r in results.values() if r.get("flops_per_token")), None)
    mesh = f"dp={args.dp} fsdp={args.fsdp} ep={args.ep} tp={args.tp}"
    print(f"\n{args.model} layers={args.layers or 'full'} batch={args.batch}/rank seq={args.seq} xorl_jax mesh {mesh}"
          f" remat={args.remat} ce_chunk={args.ce_chunk}")
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
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
