"""Multi-process start-up: SLURM auto-detection, explicit JAX_* env as fallback, one process otherwise."""

from __future__ import annotations

import os

import jax

_done = False


def detect(env=None) -> dict | None:
    """kwargs for jax.distributed.initialize, or None for a single process."""
    env = os.environ if env is None else env
    if all(k in env for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
        n = int(env["JAX_NUM_PROCESSES"])
        return None if n <= 1 else dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                        process_id=int(env["JAX_PROCESS_ID"]))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return {}  # jax's SLURM cluster detection fills in the rest
    return None


def initialize(env=None) -> None:
    global _done
    if _done:
        return
    kwargs = detect(env)
    if kwargs is not None:
        jax.distributed.initialize(**kwargs)
    _done = True


def is_main_process() -> bool:
    """Only process 0 logs and writes shared files; every process writes its own checkpoint shards."""
    return jax.process_index() == 0
