r"""Sampling throughput of `xorl_jax.sampling.Sampler` (prefill + KV-cache decoding) on a random model of a named shape.

Every row runs to --new tokens (no stop sequence), so the count is exact: tokens/s = batch x new / wall time of one
`sample` call (prefill, decode loop and the host's unpacking included), the median of --repeats calls after a
compiling one. Also reported: the prefill alone (a call with max_tokens=1), hence the decode steps' share, per-step
time and decode tokens/s, compile time, and peak device memory. Weights are random (bf16 unless --dtype says
otherwise), drawn on the device one tensor at a time.

One GPU, the issue's shape (Qwen3-8B, batch 64, prompt 128, 128 new tokens, bf16):

    python benchmarks/bench_sample.py --model qwen3_8b --batch 64 --prompt 128 --new 128
    python benchmarks/bench_sample.py --model qwen3_8b --batch 64 --prompt 128 --new 128 --scan-layers false

Smoke run on CPU (seconds):

    JAX_PLATFORMS=cpu python benchmarks/bench_sample.py --model tiny_dense --batch 4 --prompt 16 --new 16 --repeats 1
    JAX_PLATFORMS=cpu python benchmarks/bench_sample.py --model tiny_qwen3_5 --batch 4 --prompt 16 --new 16 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "qwen3_8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936),
    "qwen3_1.7b": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen3_30b_a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936),
    "qwen3_5_35b_a3b": dict(model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40,
                            num_attention_heads=16, num_key_value_heads=2, head_dim=256, full_attention_interval=4,
                            linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                            linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=256,
                            num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            partial_rotary_factor=0.25, vocab_size=248320),
    "tiny_dense": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=768),
    "tiny_qwen3_5": dict(model_type="qwen3_5_text", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, full_attention_interval=2, intermediate_size=128,
                         linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                         linear_value_head_dim=16, partial_rotary_factor=0.5, vocab_size=768),
}


def random_model(hf: dict, dtype: str, seed: int = 0):
    """(graphdef, params) of a random model: the structure traced without running the initialisers, then each
    parameter drawn on the device in `dtype` (norm weights 1) so no fp32 copy of the whole model ever exists."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xorl_jax.models.common import ModelOptions
    from xorl_jax.models.registry import model_class

    cls = model_class(hf)
    cfg = cls.config_class.from_hf(hf)
    opts = ModelOptions(dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, opts, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    key = jax.random.PRNGKey(seed)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def draw(k, shape, is_norm):
        if is_norm:
            return jnp.ones(shape, dtype)
        return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    for i, (path, var) in enumerate(flat):
        var.set_value(draw(jax.random.fold_in(key, i), tuple(var.shape), path[-1] == "weight"))
    return graphdef, nnx.from_flat_state(flat), cfg


def peak_memory_gib() -> float | None:
    import jax

    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
    return max(peaks) / 2**30 if peaks else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="qwen3_8b")
    p.add_argument("--layers", type=int, default=0, help="cut the depth to this many layers (0 = full)")
    p.add_argument("--batch", type=int, default=64, help="sequences per call (rows): prompts x --samples")
    p.add_argument("--samples", type=int, default=1, help="samples per prompt (they share the prompt's prefill)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=128, help="new tokens per row (no stops: every row runs to this)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype")
    p.add_argument("--scan-layers", choices=("true", "false"), default="true",
                   help="false: prefill and decode steps unroll the layers (Sampler(scan_layers=False))")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the compiling one (median)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from xorl_jax.sampling import Sampler, SamplingParams

    hf = dict(SHAPES[args.model], rms_norm_eps=1e-6, rope_theta=1e6)
    if args.layers:
        hf["num_hidden_layers"] = args.layers
    t0 = time.perf_counter()
    graphdef, params, cfg = random_model(hf, args.dtype)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    sampler = Sampler(graphdef, params, max_batch=args.batch, scan_layers=args.scan_layers == "true")
    rng = np.random.default_rng(0)
    if args.batch % args.samples:
        p.error(f"--batch {args.batch} is not a multiple of --samples {args.samples}")
    prompts = rng.integers(0, cfg.vocab_size, (args.batch // args.samples, args.prompt)).tolist()

    def call(new: int) -> float:
        sp = SamplingParams(max_tokens=new, temperature=args.temperature, top_p=args.top_p, stop=[], seed=0)
        t = time.perf_counter()
        out = sampler.sample(prompts, sp, num_samples=args.samples)
        elapsed = time.perf_counter() - t
        assert all(len(s.tokens) == new for r in out for s in r.sequences)
        return elapsed

    first_s = call(args.new)
    full = statistics.median(call(args.new) for _ in range(args.repeats))
    call(1)  # compiles the one-token variant (its own new-token bucket)
    prefill = statistics.median(call(1) for _ in range(args.repeats))
    decode_steps = args.new - 1
    decode_s = max(full - prefill, 1e-9)
    result = dict(
        model=args.model, layers=hf["num_hidden_layers"], scan_layers=args.scan_layers, batch=args.batch,
        samples=args.samples, prompt=args.prompt, new=args.new,
        dtype=args.dtype, temperature=args.temperature, top_p=args.top_p, device=jax.devices()[0].device_kind,
        init_s=round(init_s, 2), first_call_s=round(first_s, 2), call_s=round(full, 4),
        tokens_per_s=round(args.batch * args.new / full, 1), prefill_s=round(prefill, 4),
        decode_step_ms=round(1e3 * decode_s / decode_steps, 3) if decode_steps else None,
        decode_tokens_per_s=round(args.batch * decode_steps / decode_s, 1) if decode_steps else None,
        peak_memory_gib=peak_memory_gib(),
    )
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return result


if __name__ == "__main__":
    main()
