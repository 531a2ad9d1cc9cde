"""Checkpoint conversion CLI.

    python -m xorl_jax.convert to-orbax --model-path HF_DIR --output DIR [--dtype bfloat16] [mesh options]
    python -m xorl_jax.convert to-hf --checkpoint DIR --output HF_DIR [--dtype D] [--expert-layout per-expert|fused]
                                     [--text-only] [--max-shard-gb 5] [--overwrite]

to-hf writes a drop-in replacement of the HF checkpoint the run started from (docs/CHECKPOINTS.md): tensors the run
did not train (a vision tower, an MTP head) copied unchanged from it, trained ones in its dtypes, LoRA merged.
Outputs are written under a temporary name and renamed when complete.

Exit codes: 0 done, 2 bad input (one line on stderr). JAX is imported only after the arguments parse.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xorl_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("to-orbax", help="HF safetensors directory -> sharded Orbax model directory")
    o.add_argument("--model-path", required=True, help="HF directory (config.json + safetensors)")
    o.add_argument("--output", required=True)
    o.add_argument("--dtype", default=None, help="stored dtype (default: the source's)")
    o.add_argument("--data-parallel-replicate-size", default=1)
    o.add_argument("--data-parallel-shard-size", default=-1)
    o.add_argument("--expert-parallel-size", default=1)
    o.add_argument("--tensor-parallel-size", default=1)
    o.add_argument("--no-mesh", action="store_true", help="store unsharded arrays from one device")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (only once the new "
                                                               "one is complete; never one that holds the input)")
    h = sub.add_parser("to-hf", help="Orbax model directory or training step directory -> HF safetensors")
    h.add_argument("--checkpoint", required=True)
    h.add_argument("--output", required=True)
    h.add_argument("--dtype", default=None,
                   help="dtype of the trained tensors (default: each tensor's dtype in the source checkpoint; "
                        "model.dtype for a run from scratch); copied tensors keep theirs")
    h.add_argument("--expert-layout", choices=("per-expert", "fused"), default=None,
                   help="MoE expert tensors (default: the layout of the original HF checkpoint)")
    h.add_argument("--text-only", action="store_true",
                   help="write the language model alone (no vision tower or MTP tensors; a Qwen3.5 multimodal "
                        "checkpoint becomes its *_text model), e.g. when the source checkpoint is gone")
    h.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="safetensors shard size in GB (default 5, as HF); host memory is about one shard")
    h.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (only once the new "
                                                               "one is complete; never one that holds the input)")
    return p


# The package's modules are imported inside the functions below, once the arguments parse: --help and a bad argument
# answer without starting JAX (tests/test_convert.py checks it).


def _mesh(args):
    from types import SimpleNamespace

    from xorl_jax.parallel import mesh as mesh_lib
    from xorl_jax.parallel import rules as rules_lib

    train = SimpleNamespace(
        data_parallel_replicate_size=args.data_parallel_replicate_size,
        data_parallel_shard_size=args.data_parallel_shard_size,
        expert_parallel_size=args.expert_parallel_size,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    mesh = mesh_lib.build_mesh(train)
    return mesh, rules_lib.rules_for(train, mesh)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" advice: not needed
    try:
        from xorl_jax.checkpoint.hf import CheckpointError
        from xorl_jax.checkpoint import export
        from xorl_jax.checkpoint import orbax as ckpt
    except ImportError as e:  # pragma: no cover - broken install
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        if args.command == "to-orbax":
            mesh = rules = None
            if not args.no_mesh:
                mesh, rules = _mesh(args)
            meta = ckpt.convert_hf_to_orbax(args.model_path, args.output, dtype=args.dtype, mesh=mesh, rules=rules,
                                            overwrite=args.overwrite)
            print(f"wrote {args.output} ({meta.get('family')}, {meta.get('dtype')}, "
                  f"{meta.get('total_bytes', 0) / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
        else:
            layout = {"per-expert": "per_expert", "fused": "fused", None: None}[args.expert_layout]
            if args.max_shard_gb <= 0:
                raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
            export.convert_checkpoint_to_hf(args.checkpoint, args.output, dtype=args.dtype, expert_layout=layout,
                                          overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 1e9),
                                          text_only=args.text_only)
            print(f"wrote {args.output} in {time.time() - t0:.1f}s")
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
