r"""The MoE layer (router + dropless experts) forward + backward under expert parallelism, against one device.

Every device holds --tokens tokens; the EP runs split the experts over --ep devices (the rest of the devices
replicate them, as FSDP ranks of the expert group do) and move token copies with each exchange of
xorl_jax/parallel/expert.py: `padded` (fixed-size all_to_all, dropless) and `ragged` (ragged_all_to_all, GPU
only). The baseline is one device running the same per-device tokens through all experts with no exchange: the
same expert FLOPs per device, so the EP / one-device ratio is what the dispatch costs. Reports the median time of
a jitted forward + backward (gradients for tokens, router and expert weights), tokens/s per device and expert
TF/s per device (3 x 2 x tokens x k x 3 x hidden x moe_intermediate per step).

Shape: the Qwen3-30B-A3B MoE layer (hidden 2048, 128 experts, top-8, moe_intermediate 768), bf16.

One H100 (baseline only; EP needs 2+ devices):

    python benchmarks/bench_ep.py

Two or four H200s (NVLink multicast must stay off):

    NCCL_NVLS_ENABLE=0 python benchmarks/bench_ep.py                       # EP over every GPU
    NCCL_NVLS_ENABLE=0 python benchmarks/bench_ep.py --tokens 16384 --routing skewed
    NCCL_NVLS_ENABLE=0 python benchmarks/bench_ep.py --ep 2                # 4 GPUs: EP 2 x 2 expert replicas
    NCCL_NVLS_ENABLE=0 python benchmarks/bench_ep.py --experts 256 --moe-intermediate 512   # Qwen3.5-35B-A3B

--check compares with a one-device reference built from each device's tokens run on their own, and prints
the errors per leaf; also against the whole batch on one device, raw (`experts_sorted`) and through the layer's
token chunks (`in_token_chunks`, layers/experts.py).

Smoke run on CPU fake devices (tiny shape, fp32, also checks EP against one device):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_ep.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per device")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--moe", default="auto", help="experts' grouped GEMM: auto | triton | native")
    p.add_argument("--routing", default="random", choices=("random", "skewed"),
                   help="skewed: the experts of expert rank 0 win most tokens (the exchange's worst case)")
    p.add_argument("--devices", type=int, default=0, help="use the first N devices (0 = all)")
    p.add_argument("--ep", type=int, default=0, help="expert-parallel size (0 = every device used)")
    p.add_argument("--exchanges", default="padded,ragged", help="EP exchanges to time")
    p.add_argument("--capacity-factors", default="",
                   help="padded exchange: buffer rows per destination as multiples of the balanced share, e.g. "
                        "'2,1.25' (default: the library's PADDED_CAPACITY_FACTOR); above it every device takes the "
                        "worst-case buffer")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check", action="store_true", help="compare the EP outputs and gradients with one device")
    p.add_argument("--reference-chunk", type=int, default=0,
                   help="--check also builds the one-device reference from chunks of this many tokens, run one "
                        "after another (0 = --tokens: each device's tokens on their own), and reports the error "
                        "per leaf against it: which of the whole-batch reference and EP is off, and where")
    p.add_argument("--single-device-ep", action="store_true",
                   help="with one device: still run the EP path (a one-rank expert axis, no real exchange)")
    p.add_argument("--tiny", action="store_true", help="tiny fp32 shape for CPU smoke runs (implies --check)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.experts, args.top_k, args.moe_intermediate = 64, 8, 2, 32
        args.tokens, args.dtype, args.iters, args.warmup, args.check = 128, "float32", 2, 1, True
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from xorl_jax.layers.experts import experts_sorted, in_token_chunks, route
    from xorl_jax.layers.moe import resolve_moe_implementation
    from xorl_jax.parallel.expert import PADDED_CAPACITY_FACTOR, experts_ep
    from xorl_jax.parallel.mesh import build_mesh
    from xorl_jax.parallel.rules import batch_sharding

    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    n = len(devices)
    ep = args.ep or n
    if n % ep or args.experts % ep:
        raise SystemExit(f"--ep {ep} must divide the {n} devices and the {args.experts} experts")
    impl = resolve_moe_implementation(args.moe if args.moe != "eager" else "native")
    dt = jnp.dtype(args.dtype)
    D, E, k, F, N = args.hidden, args.experts, args.top_k, args.moe_intermediate, args.tokens

    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(ks[0], (n * N, D), jnp.float32).astype(dt)
    cot = jax.random.normal(ks[1], (n * N, D), jnp.float32).astype(dt)
    router = 0.02 * jax.random.normal(ks[2], (D, E), jnp.float32)
    bias = jnp.zeros((E,), jnp.float32)
    if args.routing == "skewed":  # rank 0's experts get a head start in every token's logits
        bias = bias.at[:E // ep].set(4.0)
    w_gu = (0.02 * jax.random.normal(ks[3], (E, D, 2, F), jnp.float32)).astype(dt)
    w_down = (0.02 * jax.random.normal(ks[4], (E, F, D), jnp.float32)).astype(dt)

    def objective(experts_fn):
        def loss(x, router, w_gu, w_down, cot):
            logits = jnp.dot(x.astype(jnp.float32), router) + bias
            _, top_w, top_i = route(logits, k, True)
            y = experts_fn(x, top_i, top_w.astype(x.dtype), w_gu, w_down)
            return jnp.sum((y * cot).astype(jnp.float32))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    def timed(fn, *a):
        out = fn(*a)
        jax.block_until_ready(out)
        for _ in range(args.warmup - 1):
            jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2], out

    one = jax.sharding.SingleDeviceSharding(devices[0])
    sorted_fn = objective(lambda *a: experts_sorted(*a, impl))
    local = [jax.device_put(a, one) for a in (x[:N], router, w_gu, w_down, cot[:N])]
    results = {}
    t, _ = timed(sorted_fn, *local)
    results["one device"] = {"ms": t * 1e3, "devices": 1}

    mesh = None
    if n > 1 or args.single_device_ep:
        mesh = build_mesh(data_parallel_shard_size=n, expert_parallel_size=ep, devices=devices)
        tok = batch_sharding(mesh)
        rep = NamedSharding(mesh, P())
        glob = [jax.device_put(x, tok), jax.device_put(router, rep),
                jax.device_put(w_gu, NamedSharding(mesh, P("expert", None, None, None))),
                jax.device_put(w_down, NamedSharding(mesh, P("expert", None, None))), jax.device_put(cot, tok)]
        reference = chunked = None
        if args.check:  # all n*N tokens through all experts on one device
            reference = sorted_fn(*[jax.device_put(a, one) for a in (x, router, w_gu, w_down, cot)])
            chunked = _chunked_reference(sorted_fn, one, x, router, w_gu, w_down, cot, args.reference_chunk or N)
            results["one device, whole batch"] = {"check_max_rel_err_vs_chunked": _max_rel_err(reference, chunked),
                                                  "per_leaf": _rel_errs(reference, chunked)}
            # the MoE layer's own path: whole batch, split by in_token_chunks where it is large
            layer_fn = objective(in_token_chunks(lambda *a: experts_sorted(*a, impl), k, D))
            layer = layer_fn(*[jax.device_put(a, one) for a in (x, router, w_gu, w_down, cot)])
            results["one device, layer"] = {"check_max_rel_err_vs_chunked": _max_rel_err(layer, chunked),
                                            "per_leaf": _rel_errs(layer, chunked)}
        factors = [float(f) for f in args.capacity_factors.split(",") if f] or [PADDED_CAPACITY_FACTOR]
        variants = [(ex, cf) for ex in filter(None, args.exchanges.split(","))
                    for cf in (factors if ex == "padded" else [PADDED_CAPACITY_FACTOR])]
        for exchange, cf in variants:
            name = f"EP{ep} {exchange}" + (f" cf {cf:g}" if len(factors) > 1 and exchange == "padded" else "")
            if exchange == "ragged" and jax.default_backend() == "cpu":
                results[name] = {"skipped": "ragged_all_to_all needs a GPU (XLA:CPU lacks it)"}
                continue
            fn = objective(lambda *a, ex=exchange, cf=cf: experts_ep(*a, mesh=mesh, implementation=impl, exchange=ex,
                                                                      capacity_factor=cf))
            try:
                t, out = timed(fn, *glob)
            except Exception as err:  # report and go on with the other exchanges
                results[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                continue
            results[name] = {"ms": t * 1e3, "devices": n}
            if reference is not None:
                results[name]["check_max_rel_err"] = _max_rel_err(out, reference)
                results[name]["check_max_rel_err_vs_chunked"] = _max_rel_err(out, chunked)
                results[name]["per_leaf"] = _rel_errs(out, chunked)

    flops = 3 * 2 * N * k * 3 * D * F  # forward + dgrad + wgrad of gate, up and down, per device
    base = results["one device"]["ms"]
    print(f"MoE layer fwd+bwd: hidden {D}, {E} experts top-{k}, moe_intermediate {F}, {args.dtype}, {N} tokens/device, "
          f"{n} {devices[0].platform} device(s) ({devices[0].device_kind}), EP {ep}, experts: {impl}, "
          f"routing {args.routing}")
    print(f"{'variant':18} {'ms':>9} {'tok/s/device':>13} {'expert TF/s/dev':>16} {'vs one device':>14}")
    for name, r in results.items():
        if "ms" not in r:
            print(f"{name:18} {r.get('skipped') or r.get('error') or ''}{_check_text(r)}")
            continue
        r.update(tokens_per_s_per_device=N / (r["ms"] / 1e3), expert_tflops_per_device=flops / (r["ms"] / 1e3) / 1e12,
                 ratio_vs_one_device=r["ms"] / base)
        check = f"   max rel err vs one device {r['check_max_rel_err']:.1e}" if "check_max_rel_err" in r else ""
        check += _check_text(r)
        print(f"{name:18} {r['ms']:9.3f} {r['tokens_per_s_per_device']:13,.0f} {r['expert_tflops_per_device']:16.2f} "
              f"{r['ratio_vs_one_device']:13.2f}x{check}")
    out = {"args": vars(args), "devices": n, "ep": ep, "implementation": impl, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


LEAVES = ("loss", "d_x", "d_router", "d_w_gate_up", "d_w_down")


def _chunked_reference(fn, device, x, router, w_gu, w_down, cot, chunk: int):
    """fn's (loss, grads) over all tokens, run as chunks of `chunk` tokens on one device: losses and weight
    gradients summed, token gradients concatenated (tokens do not interact in the MoE layer)."""
    import jax
    import jax.numpy as jnp

    put = lambda a: jax.device_put(a, device)  # noqa: E731
    parts = [fn(put(x[s:s + chunk]), put(router), put(w_gu), put(w_down), put(cot[s:s + chunk]))
             for s in range(0, x.shape[0], chunk)]
    loss = sum(p[0] for p in parts)
    grads = parts[0][1]
    d_x = jnp.concatenate([p[1][0] for p in parts])
    summed = [sum(p[1][i].astype(jnp.float32) for p in parts) for i in (1, 2, 3)]
    return loss, (d_x, *(s.astype(g.dtype) for s, g in zip(summed, grads[1:])))


def _rel_errs(got, want) -> dict:
    """Per leaf (loss and gradients): largest |got - want| relative to that leaf's largest |want|."""
    import jax
    import numpy as np

    errs = {}
    for name, g, w in zip(LEAVES, jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        errs[name] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
    return errs


def _max_rel_err(got, want) -> float:
    """Largest |got - want| over the leaves (loss and gradients), each relative to that leaf's largest |want|."""
    return max(_rel_errs(got, want).values())


def _check_text(r: dict) -> str:
    if "per_leaf" not in r:
        return ""
    leaves = ", ".join(f"{k} {v:.1e}" for k, v in r["per_leaf"].items())
    return f"\n{'':18} vs per-chunk reference {r['check_max_rel_err_vs_chunked']:.1e} ({leaves})"


if __name__ == "__main__":
    main()
