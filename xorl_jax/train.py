"""CLI: python -m xorl_jax.train --config FILE [--section.key=value ...] [--dry-run [--fake-devices N]]

--dry-run checks the config against the mesh and compiles the train step on abstract inputs (no weights, no data,
no training; full fine-tuning and LoRA; see xorl_jax/plan.py) and says whether it fits the GPU's memory.
--fake-devices N runs it on N CPU devices, e.g. an 8-GPU config on a laptop (GPU-only kernels are planned with their
jnp references, and the plan says so); --device-memory-gib G plans `auto` layer settings and the memory verdict for
GPUs of G GiB (default on CPU: an 80 GiB H100).

Exit codes: 0 done, 2 bad config or input, no space left to write a checkpoint or export, or a step larger than the
device's memory (one line on stderr says what and where), 1 the run stopped on purpose (e.g. too many non-finite steps; the last good checkpoint is intact),
75 stopped by SIGTERM/SIGUSR1 with a checkpoint of the last step saved (requeue and the same command resumes), 130
stopped by Ctrl-C (SIGINT; complete checkpoints stay, nothing half-written looks complete).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys

# The package's modules are imported inside the functions below: a bad config is reported before JAX starts, and
# the environment (XLA_FLAGS for --fake-devices, the device-memory claim) is set before JAX reads it.


def _input_errors():
    """Exception types that mean 'the user's config or input is wrong' (exit 2, one line, no traceback)."""
    from xorl_jax.checkpoint.hf import CheckpointError
    from xorl_jax.config import ConfigError
    from xorl_jax.parallel.mesh import MeshError

    errors = [ConfigError, CheckpointError, MeshError]
    try:
        from xorl_jax.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


class _ReportedElsewhere(logging.Filter):
    """Drops library records of what the CLI reports itself in one line: Orbax logs each failed write of a save
    from its threads when the disk is full, and the interrupted wait for a save on Ctrl-C, tracebacks included."""

    def filter(self, record: logging.LogRecord) -> bool:
        from xorl_jax.preflight import disk_full_error

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KeyboardInterrupt):
            return False
        return disk_full_error(exc) is None and disk_full_error(Exception(record.getMessage())) is None


def _drop_closed_loop_noise(previous):
    """After a failed save, late callbacks of Orbax's storage layer still try to reach its closed asyncio loop;
    Python reports each as an unraisable RuntimeError. Those say nothing to a user; anything else is reported."""

    def hook(args):
        if args.exc_type is RuntimeError and str(args.exc_value) == "Event loop is closed":
            return
        previous(args)

    hook.drops_closed_loop_noise = True
    return hook


def _quiet_library_logs():
    """Orbax and absl log every checkpoint detail at INFO; keep the run's own output readable."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    reported = _ReportedElsewhere()
    for target in (logging.getLogger("absl"), *logging.getLogger().handlers):
        target.addFilter(reported)
    if not getattr(sys.unraisablehook, "drops_closed_loop_noise", False):  # once per process (main may run again)
        sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)


_FLAGS = ("--dry-run", "--fake-devices", "--device-memory-gib")


def _dry_run_flags(argv: list[str]) -> tuple[list[str], bool, int, float | None]:
    """Split --dry-run, --fake-devices N and --device-memory-gib G off the config arguments."""
    from xorl_jax.config import ConfigError

    rest, dry, fake, memory = [], False, 0, None
    it = iter(argv)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and "." not in name and name not in (*_FLAGS, "--config"):
            close = difflib.get_close_matches(name, _FLAGS, n=1, cutoff=0.7)
            if close:  # a misspelt flag of this CLI, not a config override
                raise ConfigError(f"unknown option {name}; did you mean {close[0]}?")
        if arg == "--dry-run":
            dry = True
        elif arg == "--fake-devices" or arg.startswith("--fake-devices="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--fake-devices needs a positive device count, got {value!r}")
            fake = int(value)
        elif arg == "--device-memory-gib" or arg.startswith("--device-memory-gib="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            try:
                memory = float(value)
            except ValueError:
                memory = -1.0
            if not memory > 0 or memory == float("inf"):
                raise ConfigError(f"--device-memory-gib needs a GPU's memory in GiB (e.g. 80), got {value!r}")
        else:
            rest.append(arg)
    if fake and not dry:
        raise ConfigError("--fake-devices only goes with --dry-run (training on fake CPU devices is for tests)")
    if memory is not None and not dry:
        raise ConfigError("--device-memory-gib only goes with --dry-run (a run reads its devices' memory limit)")
    return rest, dry, fake, memory


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def main(argv=None) -> int:
    run_info = {}  # the output directory, once the config is read
    try:
        return _main(argv, run_info)
    except KeyboardInterrupt:
        # A save still in flight is cut off as the interpreter exits: it stays an unfinished (temporary) directory
        # that no resume takes for a checkpoint, and the next run removes it; its thread's complaints are not news.
        for name in ("absl", "orbax"):
            logging.getLogger(name).disabled = True
        where = f" in {os.path.join(run_info['output_dir'], 'checkpoints')}" if "output_dir" in run_info else ""
        print(f"stopped: interrupted (Ctrl-C); the complete checkpoints{where} are kept, an unfinished save is "
              "never taken for one (train.load_checkpoint_path: auto resumes from the last)", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED


def _main(argv, run_info: dict) -> int:
    # transformers advises at import that torch is missing; this project never needs torch (tokenizers only).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from xorl_jax.config import ConfigError, parse_cli

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\nEvery config key, its type, default and meaning: docs/CONFIG.md.")
        return 0
    try:
        argv, dry, fake_devices, device_memory_gib = _dry_run_flags(argv)
        if fake_devices:  # before JAX initialises its backends
            os.environ["JAX_PLATFORMS"] = "cpu"
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={fake_devices}".strip()
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # the config's notes on xorl keys show
        cfg = parse_cli(argv, need_data=not dry)  # a dry run compiles on abstract batches: no data needed
        if not dry:
            run_info["output_dir"] = cfg.train.output_dir
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _quiet_library_logs()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from xorl_jax.autotune import claim_device_memory

    claim_device_memory()  # before JAX's backends start
    from xorl_jax.preemption import EXIT_PREEMPTED
    from xorl_jax.trainer import Preempted, TrainingStopped, run

    try:
        if dry:
            from xorl_jax.plan import dry_run

            print("\n".join(dry_run(cfg, device_memory_gib).lines()), flush=True)
            return 0
        run(cfg)
    except _input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a full disk anywhere else (metrics, logs), or device memory: one line as well;
        from xorl_jax.preflight import disk_full_error, disk_full_message  # anything else: raised

        full = disk_full_error(e)
        if full is not None:
            print(f"error: {disk_full_message(full, cfg.train.output_dir)}", file=sys.stderr)
            return 2
        oom = _out_of_memory(e)
        if oom is None:
            raise
        print(f"error: {oom}", file=sys.stderr)
        return 2
    return 0


def _out_of_memory(exc: BaseException) -> str | None:
    """One line for XLA running out of device (or host, on CPU) memory while compiling or running a step: the
    config asks for more than the device holds; None for any other error."""
    text = str(exc)
    if "RESOURCE_EXHAUSTED" not in text or "memory" not in text.lower():
        return None
    first = next((line.strip() for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line), text.strip())
    return (f"out of memory ({first[:200]}); the step needs more than the device holds: lower "
            "train.micro_batch_size or data.sample_packing_sequence_len, or set train.remat_policy: full "
            "(--dry-run prints the memory the step plans per device)")


def cli() -> None:
    """The command (`python -m xorl_jax.train`, the `xorl-jax-train` script): main, then the process's exit."""
    code = main()
    if code == EXIT_INTERRUPTED:
        # A save may still be running in background threads (Orbax, tensorstore); the interpreter's teardown under
        # them can abort the process. Leave now: its files stay an unfinished save, removed by the next run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
