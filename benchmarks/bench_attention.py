"""Time causal attention backends on the GPU: cuDNN (no segments, packed segments, masked fallback) and XLA.

python benchmarks/bench_attention.py [--batch 2 --seq 4096 --heads 32 --kv-heads 8 --head-dim 128 --docs 4]
Forward and forward+backward medians (ms) and TFLOP/s counting causal FLOPs only (2 * 2 * B * H * d * T^2 / 2 per
fwd for one document; documents reduce the real work, so packed rows are also reported as effective TFLOP/s).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from xorl_jax.kernels.attention import attention


def bench(fn, *args, iters=20):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--max-segments", default="64", help="comma-separated max_segments values of the packed case "
                   "(cuDNN's ragged layout is sized by it)")
    p.add_argument("--no-xla", action="store_true", help="skip the slow jnp reference")
    a = p.parse_args()
    B, T, H, K, d = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, K, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, K, d), jnp.bfloat16)
    seg = jnp.asarray(np.repeat(np.arange(1, a.docs + 1), T // a.docs)[None].repeat(B, 0).astype(np.int32))
    causal_flops = 2 * 2 * B * H * d * T * T / 2
    rows = []
    cases = [("cudnn, one document", "cudnn", None, 64)]
    cases += [(f"cudnn, {a.docs} docs packed, max {m}", "cudnn", seg, int(m)) for m in a.max_segments.split(",")]
    cases += [(f"cudnn, {a.docs} docs masked", "cudnn", seg, 1)]
    cases += [] if a.no_xla else [("xla, one document", "xla", None, 64)]
    for name, impl, s, m in cases:
        f = jax.jit(lambda q, k, v: attention(q, k, v, segment_ids=s, implementation=impl, max_segments=m))
        g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
            attention(q, k, v, segment_ids=s, implementation=impl, max_segments=m).astype(jnp.float32)),
            argnums=(0, 1, 2)))
        fwd, fb = bench(f, q, k, v), bench(g, q, k, v)
        rows.append((name, fwd, fb, causal_flops / fwd / 1e9, 3.5 * causal_flops / fb / 1e9))
    print(f"{jax.devices()[0].device_kind}, B{B} T{T} H{H} K{K} d{d}")
    print(f"{'case':36s} {'fwd ms':>8s} {'f+b ms':>8s} {'fwd TF/s':>9s} {'f+b TF/s':>9s}")
    for r in rows:
        print(f"{r[0]:36s} {r[1]:8.3f} {r[2]:8.3f} {r[3]:9.1f} {r[4]:9.1f}")


if __name__ == "__main__":
    main()
