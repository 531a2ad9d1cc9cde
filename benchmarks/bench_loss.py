"""The LM-head cross-entropy alone, forward + backward: xorl_jax's chunked loss (token chunks at several sizes, and
vocabulary chunks) against the full-logits jnp reference and HF's way in torch (bf16 logits, upcast,
F.cross_entropy), same GPU, same run.

    PYTHONPATH=. python benchmarks/bench_loss.py [--tokens 16384 --hidden 2048 --vocab 151936]
        [--chunks 1024,2048,4096] [--vocab-chunk 8192] [--iters 10] [--no-torch] [--no-reference]

Reports the median fwd+bwd time, the rate of the head matmuls actually run (token chunks and the full-logits paths
run three: logits, dh, dW; vocabulary chunks four: forward, recompute, two gradients) and the temporaries of the
compiled JAX program (torch: its peak allocation above the inputs). `--tiny` is a CPU smoke run of this script.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch runs in the same process afterwards

import jax  # noqa: E402
import jax.numpy as jnp

from bench_gdn import time_jax, time_torch  # noqa: E402  (shared timers; this script's folder is on sys.path)
from xorl_jax.loss import _plan, chunked_cross_entropy, cross_entropy_reference  # noqa: E402

GIB = 2**30


def inputs(n, d, v, dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (d, v), jnp.float32) * d**-0.5).astype(dtype)
    labels = jax.random.randint(k3, (n,), 0, v)
    return h, w, labels


def jax_case(loss_fn, h, w, labels, iters):
    grad = jax.jit(jax.value_and_grad(lambda h, w: loss_fn(h, w, labels)[0], argnums=(0, 1)))
    temp = grad.lower(h, w).compile().memory_analysis()
    temp_gib = temp.temp_size_in_bytes / GIB if temp is not None else float("nan")
    return time_jax(grad, (h, w), iters), temp_gib, grad(h, w)


def torch_case(h, w, labels, iters):
    """HF transformers' loss path: bf16 logits from the head, upcast to fp32, cross_entropy; fwd + bwd."""
    import numpy as np
    import torch

    dev = "cuda"
    th = torch.tensor(np.asarray(h.astype(jnp.float32)), device=dev, dtype=torch.bfloat16, requires_grad=True)
    tw = torch.tensor(np.asarray(w.astype(jnp.float32)).T.copy(), device=dev, dtype=torch.bfloat16,
                      requires_grad=True)
    tl = torch.tensor(np.asarray(labels), device=dev, dtype=torch.long)

    def step():
        th.grad = tw.grad = None
        logits = torch.nn.functional.linear(th, tw)
        torch.nn.functional.cross_entropy(logits.float(), tl, reduction="sum").backward()

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = time_torch(step, iters)
    return ms, (torch.cuda.max_memory_allocated() - base) / GIB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunks", default="1024,2048,4096", help="ce_chunk_size values (tokens per chunk)")
    p.add_argument("--vocab-chunk", type=int, default=8192, help="columns per chunk of the vocabulary-chunked "
                   "loss (0: skip it)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the full-logits jnp reference")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: small shapes, no torch")
    a = p.parse_args()
    if a.tiny:
        a.tokens, a.hidden, a.vocab, a.chunks, a.vocab_chunk, a.iters, a.no_torch = 64, 32, 1000, "16,40", 300, 2, True
    n, d, v = a.tokens, a.hidden, a.vocab
    h, w, labels = inputs(n, d, v, jnp.dtype(a.dtype))
    head_flop = 2 * n * d * v
    print(f"{jax.devices()[0].device_kind}, tokens {n}, hidden {d}, vocab {v}, {a.dtype}")
    print(f"{'case':34s} {'fwd+bwd ms':>10s} {'head TF/s':>10s} {'temp GiB':>9s} {'loss rel err':>12s}")
    ref_loss = None

    def show(name, ms, flop, temp, err):  # each row as soon as it is measured (a later case may fail)
        print(f"{name:34s} {ms:10.3f} {flop / ms / 1e9:10.1f} {temp:9.2f} {err:12.2e}", flush=True)

    if not a.no_reference:
        ms, temp, (ref_loss, _) = jax_case(cross_entropy_reference, h, w, labels, a.iters)
        show("jnp reference (full fp32 logits)", ms, 3 * head_flop, temp, 0.0)
    cases = [(f"chunked, {c} tokens per chunk", 3, dict(method="tokens", chunk_size=int(c)))
             for c in a.chunks.split(",")]
    if a.vocab_chunk:
        plan = _plan(v, a.vocab_chunk, jnp.float32, None)
        cases.append((f"chunked, vocab {plan.n_chunks} x {plan.chunk}", 4,
                       dict(method="vocab", vocab_chunk=a.vocab_chunk)))
    for name, matmuls, kw in cases:
        fn = lambda h, w, labels, kw=kw: chunked_cross_entropy(h, w, labels, **kw)  # noqa: E731
        ms, temp, (loss, _) = jax_case(fn, h, w, labels, a.iters)
        err = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)) if ref_loss is not None else float("nan")
        show(name, ms, matmuls * head_flop, temp, err)
    if not a.no_torch:
        ms, peak = torch_case(h, w, labels, a.iters)
        show("torch: bf16 logits, fp32 CE (HF)", ms, 3 * head_flop, peak, float("nan"))


if __name__ == "__main__":
    main()
