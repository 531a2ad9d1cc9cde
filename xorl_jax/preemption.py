"""Stop cleanly on SIGTERM / SIGUSR1: finish the step, save a checkpoint, exit with EXIT_PREEMPTED.

SLURM sends SIGTERM at pre-emption and, with `sbatch --signal=B:USR1@180` (or `--signal=USR1@180` for the
tasks), a warning signal before the time limit. The handler only sets a flag; the training loop checks it
between steps, so a signal never interrupts a half-written checkpoint. With several processes the flag is
agreed on (any process signalled -> all stop at the same step), otherwise one process would enter the checkpoint's
collectives alone and the run would hang. The exit code tells the batch script to requeue the job; the next start
of the same command resumes from that checkpoint (`train.load_checkpoint_path: auto`, the default).
"""
from __future__ import annotations

import signal
import threading

import numpy as np

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = ("SIGTERM", "SIGUSR1")


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 set `received` instead of killing the process."""

    def __init__(self, names=SIGNALS):
        self.names = [n for n in names if hasattr(signal, n)]
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for name in self.names:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()
        return False

    def should_stop(self) -> bool:
        """True on every process as soon as any process got a signal (one tiny all-gather when multi-process)."""
        import jax

        local = self.received is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.any(flags))
