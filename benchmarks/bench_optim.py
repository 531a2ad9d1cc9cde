"""The optimizer update alone (clip by global norm + AdamW + apply), on a parameter tree with Qwen3 1.7B's leaf
shapes: xorl_jax's variants against torch's fused AdamW on the same GPU, same run.

    PYTHONPATH=. python benchmarks/bench_optim.py [--layers 28 --hidden 2048 --ffn 6144 --vocab 151936] [--iters 10]

Variants: fp32 parameters and state (optax's AdamW); bf16 parameters and bf16 state, both rounded stochastically (as
the train step does) by the counter hash in `xorl_jax.optim` (the default for `optimizer_dtype: bfloat16`), and
rounded to nearest. (Threefry bits, a single hash and the direction from the stored moments were compared here until
2026-12-06: docs/PERFORMANCE.md, finished investigations.) Torch:
`AdamW(fused=True)` with fp32 and with bf16 parameters (its state follows the parameter dtype; no stochastic
rounding). Reports the median time of one update and the bytes it must move at least (read parameters, gradients
and state, write parameters and state) as an achieved bandwidth. `--tiny` is a CPU smoke run.
xorl_jax's parameters are stacked per weight across layers (13 leaves), as its models hold them; torch's are one
tensor per layer and weight (310), as HF holds them; `--per-layer-leaves` gives xorl_jax torch's layout.
`--donate` updates parameters and state in place as the train step does; `--profile DIR` prints each case's HLO
counts and kernel summary (on CPU a donated bf16 update copies both moments of every leaf before writing them, and
writes the clipped gradient once for its three readers: what the GPU compiler does is what the profile shows).
"""

from __future__ import annotations

import argparse
import os
import re

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch runs in the same process afterwards

import jax
import jax.numpy as jnp
import optax

from bench_gdn import time_jax, time_torch  # shared timers (this script's folder is on sys.path)
from xorl_jax import optim

GIB = 2**30


def leaf_shapes(layers, hidden, ffn, vocab, heads=16, kv_heads=8, head_dim=128, stacked=False):
    """Qwen3's trainable leaves plus the (tied) embedding and the final norm: one per layer and weight (as torch
    holds them), or stacked, each weight's layers in one [layers, ...] leaf (as xorl_jax's models hold them)."""
    per_layer = [(hidden, heads * head_dim), (hidden, kv_heads * head_dim), (hidden, kv_heads * head_dim),
                 (heads * head_dim, hidden), (hidden, ffn), (hidden, ffn), (ffn, hidden),
                 (hidden,), (hidden,), (head_dim,), (head_dim,)]
    layer_leaves = [(layers, *s) for s in per_layer] if stacked else per_layer * layers
    return layer_leaves + [(vocab, hidden), (hidden,)]


def jax_case(shapes, param_dtype, optimizer_dtype, iters, rounding="hash", donate=False, profile=None, label=""):
    tx = optim.build_optimizer(schedule=1e-4, weight_decay=0.1, optimizer_dtype=optimizer_dtype,
                               stochastic_rounding=rounding != "nearest")
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = [jax.random.normal(k, s, jnp.float32).astype(param_dtype) * 0.02 for k, s in zip(keys, shapes)]
    grads = [(p * 0.1).astype(param_dtype) for p in params]
    state = tx.init(params)

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        if rounding == "nearest":
            return optax.apply_updates(params, updates), state
        # the train step's way
        return optim.apply_updates(params, updates, jnp.ones((), jnp.int32)), state

    # donated: parameters and state updated in place, as the train step does (XLA must then order each leaf's reads
    # of the old moments before their writes, or copy them)
    fn = jax.jit(step, donate_argnums=(0, 2) if donate else ())
    compiled = fn.lower(params, grads, state).compile()
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes / GIB if mem is not None else float("nan")
    if donate:
        ms, params, state = time_donated(compiled, params, grads, state, iters)
    else:
        ms = time_jax(compiled, (params, grads, state), iters)
    if profile:
        print(profile_update(compiled, params, grads, state, donate, os.path.join(profile, label)), flush=True)
    n = sum(p.size for p in params)
    p_bytes, s_bytes = jnp.dtype(param_dtype).itemsize, 2 * jnp.dtype(optim._STATE_DTYPES[optimizer_dtype]).itemsize
    moved = n * (2 * p_bytes + p_bytes + 2 * s_bytes)  # read+write params, read grads, read+write mu and nu
    del params, grads, state
    return ms, temp, moved, n


def time_donated(compiled, params, grads, state, iters):
    """Median ms of an update whose parameters and state are donated (each call takes the previous outputs), and
    the last parameters and state (the ones passed in are gone)."""
    last = {}

    def next_args(out, args):
        last["params"], last["state"] = out
        return out[0], args[1], out[1]

    ms = time_jax(compiled, (params, grads, state), iters, next_args=next_args)
    return ms, last["params"], last["state"]


def profile_update(compiled, params, grads, state, donate, pdir, steps=3):
    """The compiled update's HLO counts and a trace of a few calls, summarised (kernels, calls, ms per update)."""
    import profiling  # benchmarks/profiling.py (this script's folder is on sys.path)

    hlo_text = compiled.as_text()
    with jax.profiler.trace(pdir, create_perfetto_trace=True):
        for _ in range(steps):
            out = compiled(params, grads, state)
            if donate:
                params, state = out
        jax.block_until_ready(out)
    summary = profiling.summarize_trace(profiling.find_trace(pdir), hlo_text=hlo_text, steps=steps, top=12)
    return (profiling.format_hlo_summary(profiling.hlo_summary(hlo_text, compiled.memory_analysis())) + "\n"
            + profiling.format_summary(summary, top=12))


def torch_case(shapes, dtype_name, iters):
    import torch

    dtype = getattr(torch, dtype_name)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.float32).to(dtype) * 0.02)
              for s in shapes]
    for p in params:
        p.grad = p.detach() * 0.1
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    step()
    ms = time_torch(step, iters)
    n = sum(p.numel() for p in params)
    b = params[0].element_size()
    moved = n * (2 * b + b + 4 * b)
    opt.state.clear()  # free the GPU memory before the next case
    params.clear()
    torch.cuda.empty_cache()
    return ms, moved, n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=6144)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: small shapes, no torch")
    p.add_argument("--donate", action="store_true", help="donate parameters and state, as the train step does")
    p.add_argument("--per-layer-leaves", action="store_true", help="xorl_jax cases on one leaf per layer and weight "
                   "(as torch holds them; this benchmark's layout before 2026-12-03) instead of stacked layers")
    p.add_argument("--cases", default=None, help="comma-separated subset of the xorl_jax cases by index (0-2)")
    p.add_argument("--profile", default=None, metavar="DIR", help="trace each xorl_jax case into DIR and print "
                   "its HLO counts and kernel summary")
    a = p.parse_args()
    if a.tiny:
        a.layers, a.hidden, a.ffn, a.vocab, a.iters, a.no_torch = 2, 64, 128, 500, 2, True
    heads = dict(heads=2, kv_heads=1, head_dim=32) if a.tiny else {}
    torch_shapes = leaf_shapes(a.layers, a.hidden, a.ffn, a.vocab, **heads)
    shapes = torch_shapes if a.per_layer_leaves else leaf_shapes(a.layers, a.hidden, a.ffn, a.vocab, stacked=True,
                                                                 **heads)
    print(f"{jax.devices()[0].device_kind}: AdamW update (clip + adam + decay + apply), layers {a.layers} hidden "
          f"{a.hidden} ffn {a.ffn} vocab {a.vocab}; xorl_jax {len(shapes)} leaves, torch {len(torch_shapes)}")
    print(f"{'case':50s} {'params':>8s} {'ms':>9s} {'GB/s':>8s} {'temp GiB':>9s}")
    cases = [("jax fp32 params + fp32 state (optax)", "float32", "float32", "hash"),
             ("jax bf16 params + bf16 state, hash rounding", "bfloat16", "bfloat16", "hash"),
             ("jax bf16 params + bf16 state, round to nearest", "bfloat16", "bfloat16", "nearest")]
    if a.cases:
        cases = [cases[int(i)] for i in a.cases.split(",")]
    for name, pd, od, rounding in cases:
        if a.donate:
            name += ", donated"
        label = re.sub(r"[^\w]+", "_", name)
        ms, temp, moved, n = jax_case(shapes, jnp.dtype(pd), od, a.iters, rounding, a.donate, a.profile, label)
        print(f"{name:50s} {n / 1e9:7.2f}B {ms:9.2f} {moved / ms / 1e6:8.0f} {temp:9.2f}")
    if not a.no_torch:
        for dt in ("float32", "bfloat16"):
            ms, moved, n = torch_case(torch_shapes, dt, a.iters)
            print(f"{'torch AdamW(fused) ' + dt + ' params + state':50s} {n / 1e9:7.2f}B {ms:9.2f} "
                  f"{moved / ms / 1e6:8.0f} {'-':>9s}")


if __name__ == "__main__":
    main()
