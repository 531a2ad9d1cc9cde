"""Checkpoint conversion CLI.

    python -m xorl_jax.convert to-orbax --model-path HF_DIR --output DIR [--dtype bfloat16] [mesh options]
    python -m xorl_jax.convert to-hf --checkpoint DIR --output HF_DIR [--dtype D] [--expert-layout per-expert|fused]
                                     [--text-only] [--max-shard-gb 5] [--overwrite]

to-hf writes a drop-in replacement of the HF checkpoint the run started from (docs/CHECKPOINTS.md): tensors the run
did not train (a vision tower, an MTP head) copied unchanged from it, trained ones in its dtypes, LoRA merged.
Outputs are written under a temporary name and renamed when complete.

Exit codes: 0 done, 2 bad input or a full disk (one line on stderr), 130 stopped by Ctrl-C (one line; the unfinished
output removed, an existing one unchanged). JAX is imported only after the arguments parse.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import threading
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


def _in_cli_terms(message: str) -> str:
    """The shared loaders and mesh name the config's keys (`model.model_path`, `train.expert_parallel_size`); here
    the culprit is this command's flag (`--model-path`, `--expert-parallel-size`)."""
    message = re.sub(r"model\.model_path \(or model\.config_path\)|\bmodel\.model_path\b|(?<=point )model_path\b",
                     "--model-path", message)
    return re.sub(r"\btrain\.(\w+_size)\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _unfinished(output: str) -> set[str]:
    """The temporary siblings a conversion to `output` writes (`.<name>.incomplete-<id>`, convert_ops.temp_dir_for)
    and the `.old` copy an --overwrite moves aside just before the rename."""
    parent, name = os.path.split(os.path.abspath(output.rstrip(os.sep)))
    pattern = re.compile(rf"^\.{re.escape(name)}\.incomplete-[0-9a-f]{{8}}(\.old)?$")
    try:
        return {os.path.join(parent, n) for n in os.listdir(parent) if pattern.match(n)}
    except OSError:
        return set()


def _discard_interrupted(output: str, before: set[str], existed: bool) -> str:
    """After Ctrl-C: remove this run's half-written temporary output (Orbax's writer threads may still add files
    for a moment, hence the retries); of an --overwrite cut off between its two renames, keep the old output under
    its name. Returns what `output` now is."""
    target = os.path.abspath(output.rstrip(os.sep))
    state = "unchanged" if existed else "not written"
    for _ in range(5):
        mine = sorted(_unfinished(output) - before)
        for path in mine:
            if not path.endswith(".old"):
                shutil.rmtree(path, ignore_errors=True)
            elif not os.path.exists(target):
                os.replace(path, target)  # the previous output, complete
            else:  # the new output was already renamed in: the old one is superseded
                shutil.rmtree(path, ignore_errors=True)
                state = "replaced by the new conversion (it had completed)"
        if not mine:
            break
        time.sleep(0.2)
    if not existed and os.path.isdir(target) and os.listdir(target):
        state = "complete (the conversion had finished)"
    return state


def _interrupt(signum, frame):
    """Ctrl-C: the save it cuts off fails in Orbax's threads, which log it with tracebacks; the one line below says
    what happened."""
    for name in ("absl", "orbax"):
        logging.getLogger(name).disabled = True
    raise KeyboardInterrupt


def _unraisable_but_interrupts(previous):
    """A Ctrl-C that lands in a garbage-collection callback cannot stop anything (Python reports it and goes on, and
    the conversion completes): no traceback for it."""

    def hook(args):
        if not issubclass(args.exc_type, KeyboardInterrupt):
            previous(args)

    return hook


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    output = args.output
    before, existed = _unfinished(output), os.path.isdir(output) and bool(os.listdir(output))
    handlers = None
    if threading.current_thread() is threading.main_thread():
        handlers = signal.signal(signal.SIGINT, _interrupt), sys.unraisablehook
        sys.unraisablehook = _unraisable_but_interrupts(sys.unraisablehook)
    try:
        return _convert(args)
    except KeyboardInterrupt:
        state = _discard_interrupted(output, before, existed)
        print(f"stopped: interrupted (Ctrl-C); {output} is {state}, the unfinished conversion was removed",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if handlers is not None:  # main() called from Python (tests, scripts): leave the process as it was
            signal.signal(signal.SIGINT, handlers[0])
            sys.unraisablehook = handlers[1]


def _convert(args) -> int:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" advice: not needed
    try:
        from xorl_jax.checkpoint.hf import CheckpointError
        from xorl_jax.checkpoint import export
        from xorl_jax.checkpoint import orbax as ckpt
        from xorl_jax.preflight import disk_full_error, disk_full_message
        from xorl_jax.train import _quiet_library_logs
    except ImportError as e:  # pragma: no cover - broken install
        print(f"error: {e}", file=sys.stderr)
        return 2
    _quiet_library_logs()  # Orbax logs each failed write of a full disk from its threads; the error line says it
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
    except Exception as e:
        full = disk_full_error(e)  # a full disk or quota (Orbax reports it as a ValueError): one line
        if full is not None:
            message = disk_full_message(full, args.output, "the conversion").replace("train.output_dir", "--output")
            print(f"error: {message}; the unfinished output was removed", file=sys.stderr)
            return 2
        if not isinstance(e, (CheckpointError, ValueError, FileNotFoundError)):
            raise
        print(f"error: {_in_cli_terms(str(e).splitlines()[0]) if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The command (`python -m xorl_jax.convert`, the `xorl-jax-convert` script): main, then the process's exit."""
    code = main()
    if code == EXIT_INTERRUPTED:  # Orbax's writer threads may still run; the interpreter's teardown under them can
        sys.stdout.flush()        # abort the process: leave now, the unfinished output is already removed
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
