"""Full training steps, xorl_jax against HF transformers + torch on the same GPU, same shapes and batch.

Each backend runs in its own subprocess (JAX and torch would fight over GPU memory), from a random init:
forward, backward, AdamW update, gradient checkpointing. Reports tokens/s/GPU, MFU (989 TFLOP/s bf16 for
H100/H200, causal attention counted as 6 * H * d * (T + 1) per layer, MoE on active parameters), step time, time to
first step (set-up and compilation included) and peak device memory.

    python scripts/bench_train.py --model qwen3_1.7b --batch 4 --seq 4096 --backends jax,hf
    python scripts/bench_train.py --model qwen3_30b_a3b --layers 6 --backends jax,hf

xorl_jax runs its real training step (Trainer: packed dummy documents, chunked cross-entropy, remat policy from
--remat); HF runs AutoModelForCausalLM.from_config in bf16 with sdpa, gradient checkpointing and fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

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


def peak_memory_gib_jax() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def run_jax(args, cfg: dict) -> dict:
    t0 = time.perf_counter()
    import jax

    from xorl_jax.config import config_from_dict
    from xorl_jax.data.demo import DEMO_DIR
    from xorl_jax.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="bench_train_")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    run_cfg = config_from_dict({
        "model": {"config_path": tmp, "tokenizer_path": DEMO_DIR, "attn_implementation": args.attn,
                  "moe_implementation": args.moe, "dtype": "bfloat16", "param_dtype": args.param_dtype},
        "data": {"datasets": [{"path": "dummy"}], "sample_packing_sequence_len": args.seq,
                 "sample_packing_method": "multipack"},
        "train": {"output_dir": os.path.join(tmp, "out"), "init_from": "scratch", "micro_batch_size": args.batch,
                  "gradient_accumulation_steps": 1, "max_steps": args.steps + args.warmup, "lr": 1e-5,
                  "enable_gradient_checkpointing": args.remat != "none", "remat_policy": args.remat if
                  args.remat != "none" else "full", "ce_chunk_size": args.ce_chunk,
                  "optimizer_dtype": args.optimizer_dtype, "use_tensorboard": False},
    })
    trainer = Trainer(run_cfg)
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
    return {"step_s": sorted(times)[len(times) // 2], "first_step_s": first, "loss": float(metrics["loss"]),
            "peak_gib": peak_memory_gib_jax(), "flops_per_token": trainer.model_config.flops_per_token(args.seq),
            "params": trainer.param_count}


def run_hf(args, cfg: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers

    hf = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items()})
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
            "params": sum(p.numel() for p in model.parameters()), "steps_timed": len(times)}


def child(args):
    cfg = hf_config(args)
    result = run_jax(args, cfg) if args.child == "jax" else run_hf(args, cfg)
    print("RESULT " + json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="qwen3_1.7b")
    p.add_argument("--layers", type=int, default=0, help="cut the depth to this many layers (0 = full)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backends", default="jax,hf")
    p.add_argument("--remat", default="full", help="xorl_jax remat policy (none|full|dots_saveable|...)")
    p.add_argument("--attn", default="auto")
    p.add_argument("--moe", default="auto")
    p.add_argument("--ce-chunk", type=int, default=8192)
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--optimizer-dtype", default="float32")
    p.add_argument("--hf-time-limit", type=float, default=240.0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    results = {}
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", backend]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hf_time_limit + 600)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{backend}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[backend] = json.loads(line[7:])
    tokens = args.batch * args.seq
    fpt = results.get("jax", {}).get("flops_per_token")
    print(f"\n{args.model} layers={args.layers or 'full'} batch={args.batch} seq={args.seq} (tokens/step {tokens:,})")
    print(f"{'backend':8} {'step ms':>9} {'tok/s/GPU':>11} {'MFU':>7} {'first step s':>13} {'peak GiB':>9} {'params':>14}")
    for name, r in results.items():
        if r.get("step_s") is None:
            print(f"{name:8} did not finish a timed step in {args.hf_time_limit:.0f} s")
            continue
        tps = tokens / r["step_s"]
        r["tokens_per_s"] = tps
        r["mfu"] = tps * fpt / PEAK_BF16 if fpt else None
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        print(f"{name:8} {r['step_s'] * 1e3:9.1f} {tps:11,.0f} {mfu:>7} {r['first_step_s']:13.1f} {peak:>9} "
              f"{r['params']:14,}")
    if "jax" in results and results.get("hf", {}).get("tokens_per_s"):
        print(f"xorl_jax / HF throughput: {results['jax']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
