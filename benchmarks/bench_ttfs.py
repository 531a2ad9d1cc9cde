"""Time to first step of a real training command: `python -m xorl_jax.train` on an HF checkpoint with Qwen3-8B
shapes (synthetic bf16 weights, written once into --workdir), loading, sharding, compilation and one step included.

    python benchmarks/bench_ttfs.py --workdir DIR [--layers N] [--seq 4096] [--param-dtype bfloat16]

Prints the trainer's own timings (the process's age at the first step, the step's compile-included time) and the
wall time of the command. One GPU holds Qwen3-8B with bf16 parameters and AdamW state (~66 GB); fp32 state needs
FSDP over several GPUs (`--fsdp -1`). The XLA compilation cache is off here so every run compiles (pass
--compilation-cache DIR to measure a warm restart).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_convert import synthetic_config, write_synthetic  # noqa: E402

QWEN3_8B = dict(hidden=4096, inter=12288, vocab=151936, heads=32, kv_heads=8, head_dim=128)
TINY = dict(hidden=256, inter=512, vocab=4096, heads=4, kv_heads=2, head_dim=64)  # a CPU smoke test of the script


def write_checkpoint(directory: str, layers: int, shapes: dict) -> dict:
    cfg = synthetic_config(1.0, **shapes)
    cfg.update(num_hidden_layers=layers, max_position_embeddings=40960)
    marker = os.path.join(directory, "config.json")
    if os.path.exists(marker) and json.load(open(marker)) == cfg:
        return cfg
    t0 = time.time()
    total = write_synthetic(directory, cfg, tiled=True, max_shard_bytes=5 * 10**9)
    print(f"synthetic checkpoint (hidden {cfg['hidden_size']}, {layers} layers): {total / 1e9:.1f} GB in {time.time() - t0:.0f}s",
          flush=True)
    return cfg


def run_config(args, hf_dir: str) -> dict:
    demo = os.path.join(ROOT, "xorl_jax", "assets", "demo")
    return {
        "model": {"model_path": hf_dir, "tokenizer_path": demo, "dtype": "bfloat16", "param_dtype": args.param_dtype},
        "data": {"datasets": [{"path": os.path.join(demo, "train.jsonl"), "type": "messages"}],
                 "sample_packing_sequence_len": args.seq},
        "train": {"output_dir": os.path.join(args.workdir, "run"), "init_from": "hf", "max_steps": args.steps,
                  "micro_batch_size": 1, "gradient_accumulation_steps": 1, "optimizer_dtype": args.param_dtype,
                  "data_parallel_shard_size": args.fsdp, "save_at_end": False, "save_hf_weights": False,
                  "log_steps": 1, "compilation_cache_dir": args.compilation_cache, "use_tensorboard": False},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--layers", type=int, default=36, help="Qwen3-8B has 36")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--fsdp", type=int, default=-1, help="train.data_parallel_shard_size")
    ap.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes instead of Qwen3-8B (checks the script on CPU)")
    ap.add_argument("--compilation-cache", default=None, help="train.compilation_cache_dir (default: off)")
    args = ap.parse_args()
    hf_dir = os.path.join(args.workdir, "hf")
    write_checkpoint(hf_dir, args.layers, TINY if args.tiny else QWEN3_8B)
    cfg_path = os.path.join(args.workdir, "ttfs.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(run_config(args, hf_dir), f)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "xorl_jax.train", "--config", cfg_path], env=env,
                          capture_output=True, text=True)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode:
        why = " (killed: out of host memory?)" if proc.returncode == -9 else ""
        raise SystemExit(f"training command failed (exit {proc.returncode}){why}:\n{log[-4000:]}")
    first = re.search(r"first step \(compile included\): ([\d.]+)s(?:; ([\d.]+)s since the process started)?", log)
    print("\n".join(ln for ln in log.splitlines() if re.search(r"load|first step|backends|mesh|memory|startup", ln))[-3000:])
    print(f"\ntime to first step: {first.group(2) if first and first.group(2) else '?'} s since the process started "
          f"(first step itself, compile included: {first.group(1) if first else '?'} s); whole command "
          f"({args.steps} steps + exit): {wall:.1f} s")


if __name__ == "__main__":
    main()
