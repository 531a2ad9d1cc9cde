"""Gated delta rule benchmark: Pallas kernel vs the jnp chunked reference (jit) vs FLA 0.6.0 (torch), same GPU, same run.

Shapes are Qwen3.5-35B-A3B linear attention: Hk 16, Hv 32, dk = dv = 128, bf16 q/k/v/beta, fp32 g, l2norm in kernel.
  1) B 1, T 8192, 4 packed documents (segment_ids for JAX, cu_seqlens for FLA);  2) B 4, T 4096.
Prints forward and forward+backward medians, peak memory and ratios, and a correctness line per shape and intra mode (relative error
of the Pallas output and gradients against the fp32 jnp reference, and whether two runs agree bit for bit).

FLA 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (a Triton miscompile, FLA issue 640); for timing
only, `--fla-bypass-guard` (default on) flips that version flag. Its backward values are then not trusted.

Usage: PYTHONPATH=. python benchmarks/bench_gdn.py [--iters 20] [--no-fla] [--no-reference] [--skip-check]
           [--impls split,fused,jnp] [--check split] [--breakdown] [--breakdown-fused] [--tune all|state_fwd,...]
           [--hlo-summary] [--dump-hlo DIR]
FLA's first call of a shape autotunes its Triton kernels: 125 s for the packed shape on an H100 (2026-12-06), and the
B4 T4096 shape needs its own (over 65 s more), so a run with FLA at both shapes wants about 5 minutes.
Two processes can share one GPU call (FLA's autotuning takes minutes at its first call of a shape): each compiles
(and FLA autotunes) every shape first, touches --ready-file, waits for --wait-for, then times; --json writes the rows
and --fla-from reads another process's FLA rows into the ratio columns.
--breakdown times each kernel of the split path (the default); --breakdown-fused each kernel and custom_vjp backward
of the fused path; --tune times the named split kernels under several launch settings; --hlo-summary lists the
kernels XLA emits for each fwd+bwd program (fusions, GEMM calls, copies).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time

import numpy as np
import jax
import jax.numpy as jnp

from xorl_jax.kernels.gdn.pallas import FUSED_LAUNCH, LAUNCH
from xorl_jax.kernels.gdn.pallas_entry import gated_delta_rule_pallas
from xorl_jax.kernels.gdn.reference import gated_delta_rule_chunked

HK, HV, DK, DV = 16, 32, 128, 128
GIB = 2**30
INTERPRET = False  # the kernel-level timings run compiled Triton; True only for a CPU smoke test of this script


def _pallas(kernels="split", **kw):
    launch = dataclasses.replace(LAUNCH if kernels == "split" else FUSED_LAUNCH, **kw.pop("launch", {}))
    return functools.partial(gated_delta_rule_pallas, kernels=kernels, launch=launch, **kw)


# The JAX paths the benchmark can time. split: pallas_split.py (the default); fused: the one-pass-per-row layout with
# the intra and state-grads kernels (the default before); the fused variants with XLA pieces ("xla" intra terms,
# XLA einsum state grads) stay for reference.
IMPLS = {
    "split": _pallas(),
    "split-bf16inv": _pallas(launch=dict(inverse_dtype="bfloat16")),
    "split-bv64": _pallas(launch=dict(block_v_fwd=64, block_v_bwd=64)),
    "split-bv16": _pallas(launch=dict(block_v_fwd=16, block_v_bwd=16)),
    # the defaults before 2026-12-06 (afternoon): empty run slots computed, fp32 intra-backward gradients
    "split-before": _pallas(launch=dict(skip_empty_runs=False, intra_bwd_grads="float32")),
    "split-noskip": _pallas(launch=dict(skip_empty_runs=False)),
    "split-f32grads": _pallas(launch=dict(intra_bwd_grads="float32")),
    "split-fold": _pallas(launch=dict(fold_state_grads=True, skip_empty_runs=False)),
    "split-next": _pallas(launch=dict(fold_state_grads=True, skip_empty_runs=True)),
    "fused": _pallas("fused", intra="pallas", state_grads="pallas"),
    "fused-xla-intra": _pallas("fused", intra="xla", state_grads="pallas"),
    "fused-xla-sg": _pallas("fused", intra="pallas", state_grads="xla"),
}


def make_inputs(B, T, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, HK, DK), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, HK, DK), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, HV, DV), jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, HV)) + 2.0)  # decays mostly near 1, as trained models
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV))).astype(jnp.bfloat16)
    do = jax.random.normal(ks[5], (B, T, HV, DV), jnp.bfloat16)
    return q, k, v, g, beta, do


def segments_for(B, T, doc_lengths):
    if doc_lengths is None:
        return None, None
    assert B == 1 and sum(doc_lengths) == T
    seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(doc_lengths)])[None]
    cu = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    return jnp.asarray(seg), cu


def time_jax(fn, args, iters, next_args=None):
    """Median milliseconds of fn(*args) over `iters` calls after two warm-up calls. next_args(out, args): the next
    call's arguments, for functions whose inputs are donated (each call then takes the previous call's outputs)."""
    times = []
    for _ in range(iters + 2):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if next_args is not None:
            args = next_args(out, args)
    return statistics.median(times[2:]) * 1e3


def time_torch(step, iters):
    """Median milliseconds of step() on the current CUDA stream, timed with CUDA events (after a warm-up call)."""
    import torch

    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def compiled_peak_gib(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / GIB


def precompile(impls, seg, args):
    """{name: (compiled fwd, compiled fwd+bwd)} for each JAX path, compiled side by side in threads (Triton and XLA
    compile on the host's cores; the timings that follow then run one at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(name, i, fn, args[:5] if i == 0 else args) for name, impl in impls.items()
            for i, fn in enumerate(jax_fns(impl, seg))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        done = list(pool.map(lambda j: j[2].lower(*j[3]).compile(), jobs))
    out = {}
    for (name, i, _, _), exe in zip(jobs, done):
        out.setdefault(name, [None, None])[i] = exe
    return out


def jax_fns(impl, seg):
    def fwd(q, k, v, g, beta):
        return impl(q, k, v, g, beta, segment_ids=seg, use_qk_l2norm=True)[0]

    def fwd_bwd(q, k, v, g, beta, do):
        o, vjp = jax.vjp(fwd, q, k, v, g, beta)
        return vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


_REFERENCE = {}  # (B, T, id of q) -> the fp32 reference's output and gradients, computed once per shape


def _reference(seg, q, k, v, g, beta, do):
    key = (*q.shape[:2], id(q))
    if key not in _REFERENCE:
        with jax.default_matmul_precision("float32"):
            ref_fwd, ref_fb = jax_fns(gated_delta_rule_chunked, seg)
            f32 = [x.astype(jnp.float32) for x in (q, k, v, g, beta, do)]
            _REFERENCE[key] = ref_fwd(*f32[:5]), ref_fb(*f32)
    return _REFERENCE[key]


def check(B, T, seg, q, k, v, g, beta, do, impl, compiled=None):
    pallas_fwd, pallas_fb = compiled if compiled is not None else jax_fns(impl, seg)
    o_ref, g_ref = _reference(seg, q, k, v, g, beta, do)
    o1, o2 = pallas_fwd(q, k, v, g, beta), pallas_fwd(q, k, v, g, beta)
    g1, g2 = pallas_fb(q, k, v, g, beta, do), pallas_fb(q, k, v, g, beta, do)
    same = bool(np.array_equal(np.asarray(o1, np.float32), np.asarray(o2, np.float32))) and all(
        np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in zip(g1, g2))
    errs = {"o": rel(o1, o_ref)} | {f"d{n}": rel(a, b) for n, a, b in zip(["q", "k", "v", "g", "beta"], g1, g_ref)}
    finite = all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in (o1, *g1))
    return errs, same, finite


def fla_prepare(B, T, cu, q, k, v, g, beta, do):
    """FLA's fwd and fwd+bwd as torch closures, each called once (the first calls run FLA's Triton autotuning for the
    shape's keys: kept out of the timings)."""
    import torch
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # bypass the Hopper guard: timing only, values not trusted on Triton 3.6
    dev = "cuda"
    t = lambda x: torch.from_numpy(np.array(x.astype(jnp.float32))).to(dev)  # noqa: E731
    tq, tk, tv, tdo = (t(x).to(torch.bfloat16) for x in (q, k, v, do))
    tg, tb = t(g), t(beta).to(torch.bfloat16)
    cu_t = None if cu is None else torch.from_numpy(cu).to(dev)
    if cu is not None:  # FLA varlen takes B = 1 already
        assert B == 1
    leaves = [x.requires_grad_(True) for x in (tq, tk, tv, tg, tb)]

    def fwd():
        with torch.no_grad():
            return chunk_gated_delta_rule(tq, tk, tv, tg, tb, cu_seqlens=cu_t, use_qk_l2norm_in_kernel=True)[0]

    def fwd_bwd():
        o = chunk_gated_delta_rule(*leaves, cu_seqlens=cu_t, use_qk_l2norm_in_kernel=True)[0]
        o.backward(tdo)
        for x in leaves:
            x.grad = None

    t0 = time.perf_counter()
    fwd()
    fwd_bwd()
    torch.cuda.synchronize()
    print(f"[fla B{B} T{T}] first fwd and fwd+bwd (autotuning) {time.perf_counter() - t0:.1f} s", flush=True)
    return fwd, fwd_bwd


def fla_time(fns, iters):
    """Median fwd, fwd+bwd milliseconds (CUDA events, triton.testing.do_bench) and the fwd+bwd's peak GiB."""
    import torch
    import triton

    fwd, fwd_bwd = fns
    f = triton.testing.do_bench(fwd, warmup=25, rep=max(iters, 20) * 5, return_mode="median")
    fb = triton.testing.do_bench(fwd_bwd, warmup=25, rep=max(iters, 20) * 10, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    return f, fb, torch.cuda.max_memory_allocated() / GIB


def kernel_cases(B, T, seg, q, k, v, g, beta, do):
    """{kernel name: (function of (C, interpret) -> outputs, its arguments)} for each kernel of the
    `intra="pallas"` path, on the values it sees inside the fwd+bwd program; plus the residuals the breakdown
    needs (u, w, P, qd, ke, ed, v_new, h, intra inputs, X, cotangents)."""
    from xorl_jax.kernels.gdn import pallas as P
    from xorl_jax.kernels.gdn.reference import document_starts

    C, H, dd = 64, HV, jnp.bfloat16
    starts = document_starts(seg, T, B)
    prep = jax.jit(lambda *a: P._intra_kernel_inputs(*a, starts, C, None, True, dd))
    intra_in, ed = prep(q, k, v, g, beta)
    zero_state = jnp.zeros((B, H, DK, DV), jnp.float32)
    run = lambda f: jax.jit(functools.partial(f, C=C, interpret=INTERPRET))
    u, w, Pm, qd, ke, X = run(P._intra_fwd_call)(*intra_in)
    o, vn, h, _ = run(P._scan_fwd_call)(u, w, Pm, qd, ke, ed, zero_state)
    do_t = jnp.moveaxis(do, 1, 2).astype(jnp.float32)  # cotangent of the state pass's o [B, H, T, V]
    do_d = do_t.astype(dd)
    dh, dvn, _ = run(P._scan_bwd_call)(do_d, w, Pm, qd, ke, ed, zero_state)
    dw, dqd, dP, dke, _ = run(P._state_grads_call)(do_d, dvn, vn, h, dh)
    cases = {
        "intra_fwd": (P._intra_fwd_call, (*intra_in,)),
        "state_fwd": (P._scan_fwd_call, (u, w, Pm, qd, ke, ed, zero_state)),
        "state_bwd": (P._scan_bwd_call, (do_d, w, Pm, qd, ke, ed, zero_state)),
        "state_grads": (P._state_grads_call, (do_d, dvn, vn, h, dh)),
        "intra_bwd": (P._intra_bwd_call, (*intra_in, X, dvn, dw, dP, dqd, dke)),
    }
    residuals = dict(u=u, w=w, Pm=Pm, qd=qd, ke=ke, ed=ed, vn=vn, h=h, intra_in=intra_in, X=X, do_t=do_t,
                     zero_state=zero_state, dvn=dvn, dw=dw, dP=dP, dqd=dqd, dke=dke)
    return cases, residuals


def split_kernel_cases(B, T, seg, q, k, v, g, beta, do, launch=LAUNCH):
    """{kernel: (function of (C, interpret, launch) -> outputs, its arguments)} for each kernel of the split path, on
    the values it sees inside the fwd+bwd program."""
    from xorl_jax.kernels.gdn import pallas as P
    from xorl_jax.kernels.gdn import pallas_split as S
    from xorl_jax.kernels.gdn.reference import document_starts

    C, dd = 64, jnp.bfloat16
    starts = document_starts(seg, T, B)
    prep = jax.jit(lambda *a: P._intra_kernel_inputs(*a, starts, C, None, True, dd))
    intra_in, ed = prep(q, k, v, g, beta)
    qn, kn, vv, gam, bb, doc, carry = intra_in
    Tp = qn.shape[1]
    first, nxt = S.document_runs(carry, B, Tp // C, C, seg is not None)
    zero_state = jnp.zeros((B, HV, DK, DV), jnp.float32)
    run = lambda f: jax.jit(functools.partial(f, C=C, interpret=INTERPRET, launch=launch))  # noqa: E731
    u, w, X = run(S._intra_fwd)(*intra_in)
    vn, h, _ = run(S._state_fwd)(u, w, kn, gam, doc, ed, first, nxt, zero_state)
    do_d = do.astype(dd)
    dvl = run(S._dvl)(qn, kn, gam, doc, carry, do_d)
    dh, dvn, _ = run(S._state_bwd)(dvl, do_d, qn, kn, w, gam, doc, carry, ed, first, nxt, zero_state)
    dw, dqd, dP, dke, _ = run(S._state_grads)(do_d, dvn, vn, h, dh)
    out = functools.partial(S._out_fwd, out_dtype=dd)
    return {
        "intra_fwd": (S._intra_fwd, intra_in),
        "state_fwd": (S._state_fwd, (u, w, kn, gam, doc, ed, first, nxt, zero_state)),
        "out_fwd": (lambda *a, **kw: out(*a, **kw), (qn, kn, gam, doc, carry, h, vn)),
        "dvl": (S._dvl, (qn, kn, gam, doc, carry, do_d)),
        "state_bwd": (S._state_bwd, (dvl, do_d, qn, kn, w, gam, doc, carry, ed, first, nxt, zero_state)),
        "state_grads": (S._state_grads, (do_d, dvn, vn, h, dh)),
        "intra_bwd": (S._intra_bwd, (*intra_in, X, dvn, dw, dP, dqd, dke)),
        "intra_bwd_folded": (S._intra_bwd_folded, (*intra_in, X, dvn, do_d, vn, h, dh)),
    }


def split_breakdown_prepare(B, T, seg, q, k, v, g, beta, do):
    """Each kernel of the split path alone, compiled (side by side): {name: (compiled, its arguments)}."""
    from concurrent.futures import ThreadPoolExecutor

    cases = split_kernel_cases(B, T, seg, q, k, v, g, beta, do)
    jitted = {name: (jax.jit(functools.partial(f, C=64, interpret=INTERPRET, launch=LAUNCH)), fargs)
              for name, (f, fargs) in cases.items()}
    with ThreadPoolExecutor(max_workers=8) as pool:
        compiled = dict(zip(jitted, pool.map(lambda jf: jf[0].lower(*jf[1]).compile(), jitted.values())))
    return {name: (compiled[name], fargs) for name, (_, fargs) in jitted.items()}


def split_breakdown(B, T, cases, iters):
    """Times each kernel of the split path alone (forward kernels, then backward kernels, then the alternatives)."""
    t = {name: time_jax(exe, fargs, iters) for name, (exe, fargs) in cases.items()}
    fwd = sum(t[n] for n in ("intra_fwd", "state_fwd", "out_fwd"))
    default = fwd + sum(t[n] for n in ("dvl", "state_bwd", "state_grads", "intra_bwd"))
    print(f"[breakdown split B{B} T{T}] " + " | ".join(f"{n} {x:.3f}" for n, x in t.items())
          + f" | fwd kernels {fwd:.3f} ms, the default path's kernels {default:.3f} ms", flush=True)


TUNE_OPTIONS = {  # per split kernel: launch overrides tried, each against the defaults
    "intra_fwd": [dict(intra_fwd=(4, 1)), dict(intra_fwd=(8, 1)), dict(intra_fwd=(16, 1)),
                  dict(inverse_dtype="bfloat16")],
    "state_fwd": [dict(state_fwd=(2, 1)), dict(state_fwd=(4, 1)), dict(state_fwd=(8, 1)), dict(state_fwd=(4, 3)),
                  dict(prefetch_fwd=False), dict(prefetch_fwd=False, state_fwd=(4, 3)), dict(block_v_fwd=16),
                  dict(block_v_fwd=64), dict(block_v_fwd=64, skip_empty_runs=True)],
    "out_fwd": [dict(out_fwd=(4, 1)), dict(out_fwd=(8, 1))],
    "dvl": [dict(dvl=(4, 1)), dict(dvl=(8, 1))],
    "state_bwd": [dict(state_bwd=(2, 1)), dict(state_bwd=(4, 1)), dict(state_bwd=(8, 1)), dict(state_bwd=(4, 3)),
                  dict(prefetch_bwd=False), dict(prefetch_bwd=False, state_bwd=(4, 3)), dict(block_v_bwd=16),
                  dict(block_v_bwd=64), dict(prefetch_bwd=False, skip_empty_runs=True),
                  dict(prefetch_bwd=False, block_v_bwd=64)],
    "state_grads": [dict(state_grads=(4, 1)), dict(state_grads=(8, 1))],
    "intra_bwd": [dict(intra_bwd=(4, 1)), dict(intra_bwd=(8, 1)), dict(intra_bwd=(16, 1)),
                  dict(intra_bwd_staged=False)],
    # replaces state_grads + intra_bwd when fold_state_grads is on; compare with their sum (not merged into the best)
    "intra_bwd_folded": [dict(intra_bwd=(4, 1)), dict(intra_bwd=(8, 1))],
}


def split_tune(B, T, seg, q, k, v, g, beta, do, iters, kernels):
    """Times each named split kernel under each of its TUNE_OPTIONS (compiled in parallel threads, timed one by one)
    and returns the launch overrides of the fastest option per kernel."""
    from concurrent.futures import ThreadPoolExecutor

    cases = split_kernel_cases(B, T, seg, q, k, v, g, beta, do)
    jobs = []
    for name in kernels:
        f, fargs = cases[name]
        for opt in TUNE_OPTIONS[name]:
            launch = dataclasses.replace(LAUNCH, **opt)
            jobs.append((name, opt, jax.jit(functools.partial(f, C=64, interpret=INTERPRET, launch=launch)), fargs))

    def compile_job(job):
        try:
            return job[2].lower(*job[3]).compile()
        except Exception as e:  # noqa: BLE001 - a setting Triton rejects (e.g. out of shared memory)
            return e

    with ThreadPoolExecutor(max_workers=12) as pool:
        compiled = list(pool.map(compile_job, jobs))
    times = {}
    for (name, opt, _, fargs), exe in zip(jobs, compiled):
        key = " ".join(f"{k_}={v_}" for k_, v_ in opt.items())
        if isinstance(exe, Exception):
            print(f"[tune {name}] {key}: {type(exe).__name__}: {str(exe)[:200]}", flush=True)
            continue
        times.setdefault(name, []).append((time_jax(exe, fargs, iters), key, opt))
    best = {}
    for name, rows in times.items():
        t, key, opt = min(rows, key=lambda r: r[0])
        best |= {} if name == "intra_bwd_folded" else opt
        print(f"[tune split {name}] " + " | ".join(f"{kk} {tt:.3f}" for tt, kk, _ in rows)
              + f" | best {key} {t:.3f} ms", flush=True)
    return best


def breakdown(B, T, seg, q, k, v, g, beta, do, iters, fb_ms=None):
    """Each kernel of the `intra="pallas"` path alone, on the values it sees inside the fwd+bwd program, then the whole
    backward of each custom_vjp (kernels plus the XLA ops around them). fwd+bwd minus these sums is what runs outside
    both (l2norm, transposes, casts, the key-head sum)."""
    from xorl_jax.kernels.gdn import pallas as P

    C = 64
    cases, r = kernel_cases(B, T, seg, q, k, v, g, beta, do)
    t = {name.replace("_", " "): time_jax(jax.jit(functools.partial(f, C=C, interpret=INTERPRET)), fargs, iters)
         for name, (f, fargs) in cases.items()}
    u, w, Pm, qd, ke, ed, vn, h = (r[n] for n in ("u", "w", "Pm", "qd", "ke", "ed", "vn", "h"))
    intra_in, X, do_t, zero_state = r["intra_in"], r["X"], r["do_t"], r["zero_state"]
    dvn, dw, dP, dqd, dke = (r[n] for n in ("dvn", "dw", "dP", "dqd", "dke"))
    state_vjp = jax.jit(lambda res, cts: P._state_pass_bwd(C, INTERPRET, "pallas", P.FUSED_LAUNCH, res, cts))
    intra_vjp = jax.jit(lambda res, cts: P._intra_pass_bwd(C, INTERPRET, P.FUSED_LAUNCH, res, cts))
    whole = {
        "state-pass vjp bwd": time_jax(state_vjp, ((u, w, Pm, qd, ke, ed, vn, h), (do_t, zero_state)), iters),
        "intra-pass vjp bwd": time_jax(intra_vjp, ((*intra_in, X), (dvn, dw, dP, dqd, dke)), iters),
    }
    ksum = sum(t.values())
    print(f"[breakdown B{B} T{T}] kernels: " + " | ".join(f"{n} {x:.3f} ms" for n, x in t.items())
          + f" | sum {ksum:.3f} ms", flush=True)
    wsum = t["intra fwd"] + t["state fwd"] + sum(whole.values())
    print(f"[breakdown B{B} T{T}] whole custom_vjp backwards: " + " | ".join(f"{n} {x:.3f} ms" for n, x in whole.items())
          + f" | with both fwd kernels {wsum:.3f} ms"
          + ("" if fb_ms is None else f" | pallas fwd+bwd {fb_ms:.3f} ms, outside all of these {fb_ms - wsum:.3f} ms"),
          flush=True)


def hlo_summary(label, fn, args, top=25):
    """Kernels of the optimized fwd+bwd program: every fusion / custom call / copy outside fused computations, largest
    output first, with the fusion kind or call target, so a slow XLA piece (an fp32 GEMM, a transpose, a copy) shows."""
    import re

    compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    fused = set(re.findall(r"calls=(%[\w.\-]+)", text)) | set(re.findall(r"to_apply=(%[\w.\-]+)", text))
    dt_bytes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
    rows, comp = [], None
    for line in text.splitlines():
        m = re.match(r"\s*(?:ENTRY\s+)?(%[\w.\-]+)\s*\(.*\{\s*$", line)
        if m:
            comp = m.group(1)
            continue
        if comp in fused:
            continue
        m = re.match(r"\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.+?)\s+(fusion|custom-call|copy|transpose|dot|while|scatter|"
                     r"gather|sort|convolution|triangular-solve)\(", line)
        if not m:
            continue
        shape, op = m.group(1), m.group(2)
        nbytes = sum(dt_bytes.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape))
        what = [re.search(pat, line) for pat in (r'custom_call_target="([^"]+)"', r'"kind":"(\w+)"', r"kind=(\w+)")]
        what = next((m.group(1) for m in what if m), "")  # the GEMM backend (cuBLAS, Triton) before the fusion kind
        name = re.search(r'"name":"([^"]+)"|op_name="([^"]+)"', line)
        name = next((x for x in name.groups() if x), "")[-60:] if name else ""
        rows.append((nbytes, op, what, shape[:70], name))
    rows.sort(key=lambda r: -r[0])
    print(f"[hlo {label}] {len(rows)} kernels outside fused computations; largest outputs:")
    for nbytes, op, what, shape, name in rows[:top]:
        print(f"    {nbytes / 2**20:8.1f} MiB  {op:12} {what:28} {shape:72} {name}")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        print(f"[hlo {label}] XLA cost model: {cost.get('flops', float('nan')) / 1e9:.1f} GFLOP, "
              f"{cost.get('bytes accessed', float('nan')) / 2**30:.2f} GiB accessed (custom calls not counted)")


def run_fla(res, label, fns, iters):
    if fns is None:
        return
    try:
        res["fla"] = fla_time(fns, iters)
    except Exception as e:  # noqa: BLE001 - report and go on with the JAX numbers
        print(f"[fla {label}] failed: {type(e).__name__}: {e}")
        return
    f, fb, peak = res["fla"]
    print(f"[time {label}] fla: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms, peak {peak:.2f} GiB", flush=True)


def prepare_fla(label, B, T, cu, q, k, v, g, beta, do):
    try:
        return fla_prepare(B, T, cu, q, k, v, g, beta, do)
    except Exception as e:  # noqa: BLE001
        print(f"[fla {label}] failed: {type(e).__name__}: {e}")
        return None


def wait_for(path):
    """Blocks until `path` exists (another process on the GPU says it is done), then returns."""
    t0 = time.perf_counter()
    while not os.path.exists(path):
        time.sleep(0.2)
    print(f"[gate] {path} after {time.perf_counter() - t0:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--shapes", default="packed,batch")
    ap.add_argument("--breakdown", action="store_true", help="also time the Pallas path's pieces")
    ap.add_argument("--breakdown-fused", action="store_true", help="time the fused layout's pieces")
    ap.add_argument("--tune", default="", help="split kernels to time under several launch settings (comma list, or "
                    "'all'), at the first shape; the fastest settings then run as the impl 'split-tuned'")
    ap.add_argument("--impls", default="split,fused,jnp",
                    help="paths to time in this order, of: " + ", ".join(IMPLS) + ", jnp, split-tuned (after --tune), "
                    "fla (FLA runs after the JAX paths unless named)")
    ap.add_argument("--check", default="split", help="paths checked against the fp32 reference")
    ap.add_argument("--check-shapes", default="packed", help="shapes (packed, batch) the check runs at")
    ap.add_argument("--hlo-summary", action="store_true",
                    help="print the kernels of each optimized fwd+bwd program (largest outputs first)")
    ap.add_argument("--dump-hlo", metavar="DIR", help="XLA dump of the fwd+bwd programs (text HLO, every pass)")
    ap.add_argument("--ready-file", help="touched once every program is compiled and FLA autotuned (before timing)")
    ap.add_argument("--wait-for", help="time nothing until this file exists (another process is using the GPU)")
    ap.add_argument("--done-file", help="touched once the timings are done (before the check)")
    ap.add_argument("--json", help="write the timing rows here")
    ap.add_argument("--fla-from", help="a --json file of another process's FLA rows, for the ratio columns")
    args = ap.parse_args()
    if args.dump_hlo:  # read when the backend starts, which is below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump_hlo}"
                                   " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*fwd_bwd.*").strip()
    print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__)
    shapes = {"packed": (1, 8192, [1500, 3000, 2500, 1192]), "batch": (4, 4096, None)}
    wanted = args.impls.split(",")
    run_fla_here = not args.no_fla
    # Phase 1, every shape: inputs, the JAX programs compiled, FLA's autotuning calls (no timing yet).
    prepared = []
    for name in args.shapes.split(","):
        B, T, docs = shapes[name]
        seg, cu = segments_for(B, T, docs)
        q, k, v, g, beta, do = make_inputs(B, T)
        label = f"B{B} T{T}" + (f" {len(docs)} docs" if docs else "")
        impls = dict(IMPLS)
        impls |= {} if args.no_reference else {"jnp": gated_delta_rule_chunked}
        if args.tune and name == args.shapes.split(",")[0]:
            best = split_tune(B, T, seg, q, k, v, g, beta, do, args.iters,
                              list(TUNE_OPTIONS) if args.tune == "all" else args.tune.split(","))
            print(f"[tune] fastest settings: {dataclasses.replace(LAUNCH, **best)}", flush=True)
            IMPLS["split-tuned"] = _pallas(launch=best)
        impls |= {n: IMPLS[n] for n in ("split-tuned",) if n in IMPLS}
        t0 = time.perf_counter()
        compiled = precompile({n: impls[n] for n in wanted if n in impls}, seg, (q, k, v, g, beta, do))
        cases = split_breakdown_prepare(B, T, seg, q, k, v, g, beta, do) if args.breakdown else None
        print(f"[compile {label}] {time.perf_counter() - t0:.1f} s", flush=True)
        fla_fns = prepare_fla(label, B, T, cu, q, k, v, g, beta, do) if run_fla_here else None
        prepared.append((name, B, T, seg, label, (q, k, v, g, beta, do), impls, compiled, cases, fla_fns))
    if args.ready_file:
        open(args.ready_file, "w").close()
    if args.wait_for:
        wait_for(args.wait_for)
    # Phase 2: the timings, one at a time.
    rows = []
    for name, B, T, seg, label, (q, k, v, g, beta, do), impls, compiled, cases, fla_fns in prepared:
        res = {}
        for impl_name, impl in ((n, impls.get(n)) for n in wanted if n in impls or n == "fla"):
            if impl_name == "fla":
                run_fla(res, label, fla_fns, args.iters)
                continue
            fwd, fb = compiled[impl_name]
            if args.hlo_summary and impl_name != "jnp":
                hlo_summary(f"{label} {impl_name}", jax_fns(impl, seg)[1], (q, k, v, g, beta, do))
            res[impl_name] = (time_jax(fwd, (q, k, v, g, beta), args.iters),
                              time_jax(fb, (q, k, v, g, beta, do), args.iters),
                              compiled_peak_gib(fb))
            print(f"[time {label}] {impl_name}: fwd {res[impl_name][0]:.3f} ms, fwd+bwd {res[impl_name][1]:.3f} ms, "
                  f"peak {res[impl_name][2]:.2f} GiB", flush=True)
        if "fla" not in wanted:
            run_fla(res, label, fla_fns, args.iters)
        for impl_name, (f, fb, peak) in res.items():
            rows.append((label, impl_name, f, fb, peak))
        if cases is not None:
            split_breakdown(B, T, cases, args.iters)
        if args.breakdown_fused:
            breakdown(B, T, seg, q, k, v, g, beta, do, args.iters, res.get("fused", (None, None))[1])
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f)
        os.replace(args.json + ".tmp", args.json)
    if args.done_file:
        open(args.done_file, "w").close()
    if args.fla_from and os.path.exists(args.fla_from):  # FLA timed by another process in the same call
        with open(args.fla_from) as f:
            rows += [tuple(r) for r in json.load(f) if r[1] == "fla"]
    print(f"\n{'shape':<20}{'impl':<16}{'fwd ms':>9}{'f+b ms':>9}{'peak GiB':>10}{'fwd/FLA':>9}{'f+b/FLA':>9}")
    for label, impl_name, f, fb, peak in rows:
        fla = next((r for r in rows if r[0] == label and r[1] == "fla"), None)
        ratios = f"{f / fla[2]:9.2f}{fb / fla[3]:9.2f}" if fla else ""
        print(f"{label:<20}{impl_name:<16}{f:9.3f}{fb:9.3f}{peak:10.2f}{ratios}")
    # Phase 3: correctness against the fp32 reference (after the timings and the table: it compiles and runs the
    # reference).
    for name, B, T, seg, label, (q, k, v, g, beta, do), impls, compiled, _, _ in prepared:
        checked = not args.skip_check and name in args.check_shapes.split(",")
        for impl_name in args.check.split(",") if checked else []:
            errs, same, finite = check(B, T, seg, q, k, v, g, beta, do, impls[impl_name], compiled.get(impl_name))
            print(f"[check {label} {impl_name}] rel err vs fp32 reference: "
                  + " ".join(f"{n} {e:.2e}" for n, e in errs.items()) + f" | deterministic {same} | finite {finite}",
                  flush=True)


if __name__ == "__main__":
    main()
