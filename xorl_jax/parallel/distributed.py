"""Multi-process start-up: SLURM auto-detection, explicit JAX_* env as fallback, one process otherwise.

One JAX process drives all the accelerators it sees (one process per host, or per GPU when the launcher restricts
each task to one GPU); `jax.distributed.initialize` connects the processes before any backend exists. On CPU
(tests, SLURM CPU mode) cross-process collectives go through gloo, which must be chosen before the CPU client is
created; on GPU the collectives are NCCL and nothing here changes them.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("xorl_jax")

_done = False


def detect(env=None) -> dict | None:
    """kwargs for jax.distributed.initialize, or None for a single process."""
    env = os.environ if env is None else env
    if all(k in env for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
        n = int(env["JAX_NUM_PROCESSES"])
        return None if n <= 1 else dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                        process_id=int(env["JAX_PROCESS_ID"]))
    if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1 and "SLURM_PROCID" in env:
        if _slurm_one_task_per_node(env) and not env.get("JAX_LOCAL_DEVICE_IDS"):
            # JAX's own SLURM detection binds each process to the one GPU number SLURM_LOCALID (it assumes one
            # task per GPU): with one task per node that would leave every process a single GPU. Give the
            # parameters explicitly and switch the detection off, so each process drives all its local devices.
            return dict(coordinator_address=slurm_coordinator_address(env),
                        num_processes=int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])),
                        process_id=int(env["SLURM_PROCID"]), cluster_detection_method="deactivate")
        return {}  # one task per GPU: jax's SLURM cluster detection fills in the rest (GPU = SLURM_LOCALID)
    return None


def _slurm_one_task_per_node(env) -> bool:
    tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    nodes = env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES")))
    return tasks is not None and nodes is not None and int(tasks) == int(nodes)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'n001' of 'n001,x', 'n[001-004,7],x' or 'gpu-a[03,05]'."""
    cut = next((i for i, ch in enumerate(nodelist) if ch in ",["), len(nodelist))
    if cut == len(nodelist) or nodelist[cut] == ",":
        return nodelist[:cut]
    rest = nodelist[cut + 1:]
    end = next((i for i, ch in enumerate(rest) if ch in ",-]"), len(rest))
    return nodelist[:cut] + rest[:end]


def slurm_coordinator_address(env) -> str:
    """host:port of process 0, as JAX's SLURM detection would choose it (port from the job id unless
    JAX_COORDINATOR_PORT is set), so that both ways agree."""
    nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    if not nodelist:
        raise RuntimeError("SLURM multi-task run without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST; "
                           "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID instead")
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
    return f"{first_slurm_host(nodelist)}:{port}"


def _platforms(env) -> str:
    """The platforms the user asked for ('' = JAX's default choice): JAX_PLATFORMS, else jax.config's value."""
    try:
        configured = jax.config.jax_platforms or ""
    except AttributeError:
        configured = ""
    return (env.get("JAX_PLATFORMS", "") or configured or env.get("JAX_PLATFORM_NAME", "")).lower()


def use_cpu_collectives(env=None) -> bool:
    """Choose gloo for cross-process CPU collectives (JAX 0.10 and 0.11 name: jax_cpu_collectives_implementation).

    Only when the run may use the CPU backend (JAX_PLATFORMS unset or containing 'cpu'); an explicit
    JAX_CPU_COLLECTIVES_IMPLEMENTATION (e.g. mpi) wins. Returns whether it set the option."""
    env = os.environ if env is None else env
    platforms = _platforms(env)
    if platforms and "cpu" not in platforms.split(","):
        return False
    if env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        return False
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError, KeyError) as e:  # option renamed or gone in some future JAX
        log.warning("could not select gloo CPU collectives (%s); cross-process CPU collectives may fail", e)
        return False
    return True


def initialize(env=None) -> None:
    global _done
    if _done:
        return
    env = os.environ if env is None else env
    kwargs = detect(env)
    if kwargs is not None:
        use_cpu_collectives(env)
        jax.distributed.initialize(**kwargs)
    _done = True


def is_main_process() -> bool:
    """Only process 0 logs and writes shared files; every process writes its own checkpoint shards."""
    return jax.process_index() == 0
