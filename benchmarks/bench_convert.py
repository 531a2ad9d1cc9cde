"""Benchmark `convert to-orbax` / `to-hf` on a synthetic Qwen3 checkpoint: throughput and peak host memory.

    python benchmarks/bench_convert.py --gb 4 --workdir DIR [--dtype bfloat16] [--to-hf]

Writes a random Qwen3-shaped safetensors checkpoint of about --gb GB (bf16, 2 GB shards), then runs the
conversion in a fresh process and reports MB/s and peak RSS against the bound "largest stored parameter + 1 GB"
(the resident memory the process had before converting is subtracted: Python, JAX and Orbax themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_config(gb: float, *, hidden=2048, inter=6144, vocab=32768, heads=16, kv_heads=4, head_dim=128):
    """A Qwen3 config whose bf16 weights take about `gb` GB."""
    D, F, V = hidden, inter, vocab
    per_layer = D * heads * head_dim * 2 + D * kv_heads * head_dim * 2 + 3 * D * F + 2 * D + 2 * head_dim
    layers = max(1, int(round((gb * 1e9 / 2 - 2 * V * D) / per_layer)))
    return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": V, "hidden_size": D,
            "intermediate_size": F, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": False, "max_position_embeddings": 4096, "hidden_act": "silu", "dtype": "bfloat16"}


def hf_shapes(cfg):
    D, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, K, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    yield "model.embed_tokens.weight", (V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (H * hd, D)
        yield p + "self_attn.k_proj.weight", (K * hd, D)
        yield p + "self_attn.v_proj.weight", (K * hd, D)
        yield p + "self_attn.o_proj.weight", (D, H * hd)
        yield p + "self_attn.q_norm.weight", (hd,)
        yield p + "self_attn.k_norm.weight", (hd,)
        yield p + "mlp.gate_proj.weight", (F, D)
        yield p + "mlp.up_proj.weight", (F, D)
        yield p + "mlp.down_proj.weight", (D, F)
        yield p + "input_layernorm.weight", (D,)
        yield p + "post_attention_layernorm.weight", (D,)
    yield "model.norm.weight", (D,)
    yield "lm_head.weight", (V, D)


def write_synthetic(directory: str, cfg: dict, *, seed=0, max_shard_bytes=2 * 10**9, tiled=False) -> int:
    """Random bf16 tensors streamed into shards (one shard in memory at a time); returns total bytes."""
    import ml_dtypes

    sys.path.insert(0, ROOT)
    from xorl_jax.checkpoint.hf import write_sharded

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)

    block = (rng.standard_normal(1 << 24, np.float32) * 0.02).astype(ml_dtypes.bfloat16) if tiled else None

    def tensors():
        for key, shape in hf_shapes(cfg):
            if tiled:  # one random block repeated: fast for multi-GB checkpoints whose values do not matter
                n = int(np.prod(shape))
                yield key, np.resize(block, n).reshape(shape)
            else:
                yield key, (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    write_sharded(directory, tensors(), max_shard_bytes=max_shard_bytes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    return sum(int(np.prod(s)) * 2 for _, s in hf_shapes(cfg))


_CHILD = r"""
import json, sys, time
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096
def hwm():  # VmHWM: peak RSS of this process image (ru_maxrss would carry the parent's peak across exec)
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM'))
import jax, orbax.checkpoint, xorl_jax.checkpoint.orbax as ck, xorl_jax.checkpoint.export as ex
base = rss()
t0 = time.time()
if sys.argv[1] == 'to-orbax':
    kw = {'part_bytes': int(sys.argv[5])} if len(sys.argv) > 5 else {}
    ck.convert_hf_to_orbax(sys.argv[2], sys.argv[3], dtype=sys.argv[4] or None, overwrite=True, **kw)
else:
    ex.convert_checkpoint_to_hf(sys.argv[2], sys.argv[3], overwrite=True, max_shard_bytes=int(float(sys.argv[4]) * 1e9))
dt = time.time() - t0
peak = hwm()
print(json.dumps({"seconds": dt, "base_rss": base, "peak_rss": peak}))
"""


def run_child(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_stored_param(cfg, itemsize=2) -> int:
    """Bytes of the largest parameter as stored (layer-stacked: one Orbax array holds every layer's copy)."""
    D, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, hd = cfg["num_attention_heads"], cfg["head_dim"]
    return itemsize * max(V * D, L * 2 * D * F, L * D * F, L * D * H * hd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dtype", default="")
    ap.add_argument("--to-hf", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="to-hf output shard size (GB)")
    args = ap.parse_args()
    cfg = synthetic_config(args.gb)
    src, dst, back = (os.path.join(args.workdir, n) for n in ("hf", "orbax", "hf_back"))
    t = time.time()
    total = write_synthetic(src, cfg)
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB, {cfg['num_hidden_layers']} layers, written in "
          f"{time.time() - t:.0f}s")
    largest_hf = max(int(np.prod(s)) * 2 for _, s in hf_shapes(cfg))
    r = run_child("to-orbax", src, dst, args.dtype)
    delta = r["peak_rss"] - r["base_rss"]
    print(f"to-orbax: {r['seconds']:.1f}s, {total / 1e6 / r['seconds']:.0f} MB/s, peak RSS {r['peak_rss'] / 2**30:.2f} "
          f"GiB (base {r['base_rss'] / 2**30:.2f} GiB, +{delta / 2**30:.2f} GiB)")
    for what, size in (("largest HF tensor", largest_hf), ("largest stored (layer-stacked) param",
                                                           largest_stored_param(cfg))):
        bound = size + 2**30
        print(f"  bound {what} {size / 2**20:.0f} MiB + 1 GiB = {bound / 2**30:.2f} GiB: "
              f"{'OK' if delta <= bound else 'EXCEEDED'}")
    if args.to_hf:
        r = run_child("to-hf", dst, back, str(args.shard_gb))
        print(f"to-hf: {r['seconds']:.1f}s, {total / 1e6 / r['seconds']:.0f} MB/s, peak RSS "
              f"{r['peak_rss'] / 2**30:.2f} GiB (+{(r['peak_rss'] - r['base_rss']) / 2**30:.2f} GiB)")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
